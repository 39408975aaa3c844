"""Sparse masks and task-vector merges (TIES, DARE, Model Breadcrumbs, DELLA; mergekit 0.1.5 semantics).

* :mod:`.ops`    ``sparsify`` and ``kth_largest_abs``: contract, validation, ``torch.library`` ops;
* :mod:`.merge`  the task-arithmetic merge of one tensor / a model (reached through ``wweight.merge``);
* :mod:`.fused`  both written once on the four primitives every backend provides;
* :mod:`.plan`   radix-select thresholds, tie windows and rescale factors (shared by every backend).

Backends: ``wweight/backends/{torch,cpu,cuda,triton}/sparse.py``; kernels: ``wweight/kernels/sparse.py``
(Triton), ``csrc/sparse.cu`` (CUDA), ``csrc/cpu/sparse_cpu.cpp`` (C++/OpenMP), sharing
``csrc/sparse_elem.h``; reference: ``wweight/reference/sparse.py``.
"""
from .ops import SPARSIFY_METHODS, key_seed, kth_largest_abs, sparsify

__all__ = ["sparsify", "kth_largest_abs", "key_seed", "SPARSIFY_METHODS"]
