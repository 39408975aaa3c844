"""wweight: GPU kernels for operations on neural-network weights.

Op families (public op / reference / Triton kernel / CUDA kernel / test / benchmark share a name):

* sparse masks and task-vector merges (TIES, DARE, Breadcrumbs, DELLA, magnitude):
  :func:`sparsify`, :func:`kth_largest_abs`, :func:`merge_tensors`, :func:`merge_state_dicts`
* isotropic merging (Iso-C, Iso-CTS, TSV-M): through :func:`merge_tensors` / :func:`merge_state_dicts`
* permutation weight matching (Git Re-Basin): :class:`PermutationSpec`, :func:`weight_matching`,
  :func:`apply_permutation`, :func:`linear_sum_assignment`
* quantization with outlier preservation: :func:`quantize`, :func:`dequantize`, :class:`QuantizedTensor`

Backends: ``wweight.use_backend("cuda"|"triton"|"cpu"|"torch"|"reference")`` or ``backend=`` per call.
Merge methods: the registry :mod:`wweight.methods`. Re-exports only: the code lives in the family
packages (``sparse/``, ``iso/``, ``permute/``, ``quant/``), ``merge.py`` and ``checkpoint/``.
"""
from . import _startup  # noqa: F401 - first: it sets an OpenMP policy before torch loads
from ._dispatch import use_backend, strict, BACKENDS
from .sparse import sparsify, kth_largest_abs, key_seed
from .merge import merge_tensors, merge_state_dicts, MERGE_METHODS
from .iso import ISO_METHODS, iso_merge_tensors, iso_merge_state_dicts
from .permute import (
    PermutationSpec,
    weight_matching,
    apply_permutation,
    linear_sum_assignment,
    random_permutation,
    mlp_spec,
    cnn_spec,
    resnet_spec,
    gpt2_spec,
    llama_spec,
)
from .quant import (
    QuantizedTensor,
    quantize,
    dequantize,
    quantize_state_dict,
    dequantize_state_dict,
    save_quantized,
    load_quantized,
    error_report,
    find_super_weights,
    known_super_weights,
    dequant_matmul,
)

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint, run_merge, plan_merge
from .config import load_config, MergeConfig

__version__ = "0.1.0"

__all__ = [
    "use_backend", "strict", "BACKENDS",
    "sparsify", "kth_largest_abs", "merge_tensors", "merge_state_dicts", "MERGE_METHODS", "key_seed",
    "ISO_METHODS", "iso_merge_tensors", "iso_merge_state_dicts",
    "PermutationSpec", "weight_matching", "apply_permutation", "linear_sum_assignment", "random_permutation",
    "mlp_spec", "cnn_spec", "resnet_spec", "gpt2_spec", "llama_spec",
    "QuantizedTensor", "quantize", "dequantize", "quantize_state_dict", "dequantize_state_dict",
    "save_quantized", "load_quantized", "error_report", "find_super_weights", "known_super_weights", "dequant_matmul",
    "Checkpoint", "load_checkpoint", "save_checkpoint", "run_merge", "plan_merge", "load_config", "MergeConfig",
]
