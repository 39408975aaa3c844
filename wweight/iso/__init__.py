"""Isotropic merging of fine-tuned models: Iso-C, Iso-CTS and TSV-M, batched over all 2-D keys.

Papers: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML 2025, Iso-C / Iso-CTS, github.com/danielm1405/iso-merging) and
Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025,
TSV-M). The exact definitions, and the two places where they had to be made well defined
(rank-deficient matrices, Iso-CTS with many tasks), are in :mod:`wweight.reference.iso`.

Task vectors are ``Delta_t = finetuned[t][key] - base[key]`` and the result is
``base + alpha * merged_delta``. 2-D floating keys get the spectral merge (embeddings and LM heads
included), other floating keys the mean of their task vectors, non-floating keys are copied.

How it is fast (``backend="torch"`` / ``"triton"``; ``"reference"`` runs the per-key loop):

* keys are grouped by shape and processed in batches whose size follows ``memory_budget`` /
  ``batch_size``; each batch is one set of batched GEMMs and batched symmetric eigendecompositions,
  with the task vectors visited one task at a time so the float64 working set is ~9 m n per key;
* every SVD is computed from the eigendecomposition of the *smaller* Gram matrix
  (``r x r``, ``r = min(m, n)``), formed and decomposed in float64: one GEMM of ``m n r`` flops
  plus an ``r x r`` ``eigh`` instead of a full SVD. In float64 this is *more* accurate than the
  authors' float32 SVD (it adds ~``1e-16 kappa^2`` relative error where a float32 SVD adds
  ~``6e-8 kappa``); what remains is the float32 rounding of the task vectors and of the result
  (benchmark: 2e-7 vs the float64 reference, where the authors' float32 loop has 3e-6 ... 7e-5);
* only the singular triplets that are used are formed (top ``(r-k)/T`` per task for Iso-CTS,
  ``int(r/T)`` for TSV-M; on CPU only those eigenpairs are computed, by LAPACK ``syevr``);
* Iso-CTS with ``m <= n``: ``(I - U_k U_k^T) Delta_t = U_perp (U_perp^T Delta_t)`` with ``U_perp``
  the remaining ``m - k`` left singular vectors of ``M`` (all of them are available from the
  ``m x m`` Gram matrix), so each task's SVD is that of an ``(m - k) x n`` matrix (~0.2 m rows);
* the orthogonal (polar) factors ``U V^T`` are ``A W`` with ``W = V Sigma^{-1} V^T`` from the
  same Gram eigendecomposition (no second SVD);
* on CPU each key runs in one thread with torch, MKL and SciPy's OpenBLAS at one thread, and the
  2-D keys of all shapes run side by side as one pool, the most expensive first (:mod:`._threads`):
  SciPy's and torch's thread pools no longer spin against each other, and a key's result does not
  depend on the thread count or the batch size; the eigensolves call LAPACK without the GIL
  (:mod:`._lapack`), so they overlap too;
* Iso-CTS with ``m <= n``: ``polar([U_perp X, U_k]) = [U_perp polar(X), U_k]`` (the blocks are
  orthogonal), an ``(r-k) x (r-k)`` eigendecomposition instead of ``r x r``;
* the task vectors and their sum are built by one fused Triton kernel per fine-tuned tensor on
  GPU (``wweight/kernels/iso.py``; under ``TRITON_INTERPRET=1`` on CPU in the tests), which also
  counts NaN/Inf; the torch backend does the same with torch ops (``wweight/backends/<b>/iso.py``).
  There is no CUDA-extension kernel for this family: cuBLAS / cuSOLVER (through torch) already
  run the GEMMs and eigendecompositions at peak.

Modules: :mod:`.ops` (contract, batching, ``torch.library`` ops), :mod:`.spectral` (the batched
merges); reference :mod:`wweight.reference.iso`; kernels ``wweight/kernels/iso.py``.
"""
from .ops import ISO_METHODS, RANK_RTOL, iso_merge_state_dicts, iso_merge_tensors

__all__ = ["ISO_METHODS", "iso_merge_tensors", "iso_merge_state_dicts", "RANK_RTOL"]
