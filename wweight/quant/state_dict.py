"""Whole state dicts: quantize every eligible tensor, dequantize them back, and measure the error.

The file format of a quantized state dict is :func:`wweight.quant.format.save_quantized`;
``wweight quantize`` / ``dequantize`` (``wweight/checkpoint/quantize.py``) stream checkpoints through
these functions shard by shard.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

from .. import _validate
from .format import QuantizedTensor
from .ops import dequantize, quantize
from .super_weights import check_super_weights

def _skip(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def quantize_state_dict(sd: Mapping[str, torch.Tensor], bits: int = 4, block_size: Union[int, str, None] = 64, *,
                        outliers=None, super_weights: Optional[Mapping[str, torch.Tensor]] = None,
                        skip: Union[str, Sequence[str]] = (), min_ndim: int = 2, symmetric: bool = False,
                        clip: Optional[float] = None, scale_dtype: Optional[torch.dtype] = None,
                        backend: Optional[str] = None) -> Dict[str, Union[QuantizedTensor, torch.Tensor]]:
    """Quantize every floating tensor with ``ndim >= min_ndim`` whose name matches no ``skip``
    regular expression (``re.search``); other entries are returned unchanged (not copied).

    ``outliers`` applies to every quantized tensor; ``super_weights`` maps tensor names to
    ``(N, ndim)`` coordinates held out in addition (see :func:`known_super_weights`).
    """
    if not isinstance(sd, Mapping):
        raise TypeError(f"sd must be a mapping of names to tensors, got {type(sd).__name__}")
    patterns = [skip] if isinstance(skip, str) else list(skip)
    super_weights = dict(super_weights or {})
    check_super_weights(super_weights, sd)  # names and coordinates fit this model's shapes
    out: Dict[str, Union[QuantizedTensor, torch.Tensor]] = {}
    for name, t in sd.items():
        if (isinstance(t, torch.Tensor) and t.dtype in _validate.FLOAT_DTYPES and t.dim() >= min_ndim
                and t.numel() and not _skip(name, patterns)):
            spec = outliers
            if name in super_weights:
                spec = [super_weights[name]] + ([] if outliers is None else (outliers if isinstance(outliers, list) else [outliers]))
            try:
                out[name] = quantize(t, bits, block_size, symmetric, spec, clip, scale_dtype=scale_dtype, backend=backend)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{name}: {e}") from None
        else:
            out[name] = t
    return out


def dequantize_state_dict(qsd: Mapping[str, Union[QuantizedTensor, torch.Tensor]], *,
                          backend: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`quantize_state_dict`: every QuantizedTensor dequantized, tensors passed through."""
    return {k: (dequantize(v, backend=backend) if isinstance(v, QuantizedTensor) else v) for k, v in qsd.items()}


def error_report(w: torch.Tensor, q: Union[QuantizedTensor, torch.Tensor]) -> Dict[str, float]:
    """Quantization error of ``q`` (a QuantizedTensor or its dequantized tensor) against ``w``.

    Returns ``mse``, ``max_abs_err``, ``sqnr_db`` (10 log10(sum w^2 / sum err^2); inf when
    exact), ``rel_fro_err`` (||w - q|| / ||w||), computed in float64, plus ``bits_per_param``
    when ``q`` is a QuantizedTensor.
    """
    _validate.tensor("w", w)
    extra = {}
    if isinstance(q, QuantizedTensor):
        extra["bits_per_param"] = q.bits_per_param
        q = dequantize(q)
    _validate.tensor("q", q)
    if q.shape != w.shape:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected {tuple(w.shape)} (the shape of w)")
    a = w.detach().to(torch.float64)
    e = q.detach().to(device=a.device, dtype=torch.float64) - a
    se = float((e * e).sum())
    sw = float((a * a).sum())
    n = max(a.numel(), 1)
    rep = {
        "mse": se / n,
        "max_abs_err": float(e.abs().max()) if e.numel() else 0.0,
        "sqnr_db": (10 * math.log10(sw / se)) if se > 0 and sw > 0 else (math.inf if se == 0 else -math.inf),
        "rel_fro_err": math.sqrt(se / sw) if sw > 0 else (0.0 if se == 0 else math.inf),
    }
    rep.update(extra)
    return rep


