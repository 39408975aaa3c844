"""Quantization with outlier preservation: blockwise RTN at 2-8 bits, outliers / super weights kept exactly.

Modules: :mod:`.ops` (``quantize``, ``dequantize``, ``dequant_matmul``: contract, ``torch.library`` ops,
dispatch), :mod:`.format` (:class:`QuantizedTensor`, safetensors files), :mod:`.outliers` (outlier
specs), :mod:`.scales` (the O(blocks) arithmetic shared by the backends), :mod:`.state_dict`
(whole models, error report), :mod:`.super_weights`. Backends: ``wweight/backends/{torch,triton,cuda}/quant.py``;
kernels: ``wweight/kernels/quant.py`` (Triton), ``csrc/quant.cu`` (CUDA); reference:
``wweight/reference/quant.py``.
"""
from .format import QuantizedTensor, load_quantized, save_quantized
from .ops import dequant_matmul, dequantize, quantize
from .state_dict import dequantize_state_dict, error_report, quantize_state_dict
from .super_weights import find_super_weights, known_super_weights

__all__ = [
    "QuantizedTensor", "quantize", "dequantize", "quantize_state_dict", "dequantize_state_dict",
    "save_quantized", "load_quantized", "error_report", "find_super_weights", "known_super_weights",
    "dequant_matmul",
]
