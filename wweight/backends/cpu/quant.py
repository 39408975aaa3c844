"""Backend ``cpu`` of the quantization family: the C++/OpenMP kernels of ``csrc/cpu/quant_cpu.cpp``
(``wweight._cpu``). Contract: ``wweight/backends/__init__.py`` (``quantize``, ``dequantize``).

One pass per cache-resident tile for quantize (statistics, stored scale / zero, codes and packing
of each block while it is in L1; blocks whose lcm with 8 exceeds 65536 elements take a statistics
pass and a code pass) and one for dequantize; same bits as :mod:`wweight.reference.quant` and the
torch backend (element formulas: ``csrc/quant_elem.h``). Cases the kernels do not take go to the
torch backend explicitly: float64 weights or outputs, float64 (or other) scale dtypes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..._ext import DTYPE_CODES, cpu_extension, dtype_code, host_buffer, host_tensor, ptr
from ...quant.outliers import outlier_indices
from ...quant.scales import packed_bytes
from ..torch import quant as _torch

#: a NaN among a block's kept elements makes its scale NaN (wweight.quantize relies on it)
NAN_PROPAGATES = True
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: how many calls each path took (tests check the kernels really ran)
stats = {"quantize": 0, "dequantize": 0, "fallback": 0}


def available() -> bool:
    ext = cpu_extension()
    return ext is not None and hasattr(ext, "quant_quantize")


def _takes(x_dtype, scale_dtype=torch.float32) -> bool:
    return available() and x_dtype in _DTYPES and scale_dtype in _DTYPES


def quantize(x: torch.Tensor, mask: Optional[torch.Tensor], thr: float, bits: int, bs: int, symmetric: bool,
             clip: Optional[float], scale_dtype: torch.dtype, one_pass: Optional[bool] = None):
    """Flat contiguous CPU ``x`` -> (codes, scale, zero or None, sorted outlier flat indices int64).
    ``one_pass`` is accepted for the common contract (the kernel picks its path by block size)."""
    if not _takes(x.dtype, scale_dtype):
        stats["fallback"] += 1
        return _torch.quantize(x, mask, thr, bits, bs, symmetric, clip, scale_dtype, one_pass)
    n = x.numel()
    nb = -(-n // bs)
    codes = host_buffer(packed_bytes(n, bits))   # huge pages when large: its first touch is the kernel's
    scale = torch.empty(nb, dtype=scale_dtype)
    zero = None if symmetric else torch.empty(nb, dtype=scale_dtype)
    m = None
    if mask is not None:
        m = mask.contiguous().view(torch.uint8)
    cpu_extension().quant_quantize(ptr(x), dtype_code(x), ptr(m), float(thr) if math.isfinite(thr) else math.inf,
                                   int(bits), int(bs), bool(symmetric), float(clip) if clip is not None else -1.0,
                                   ptr(scale), ptr(zero), DTYPE_CODES[scale_dtype], ptr(codes), n)
    stats["quantize"] += 1
    return codes, scale, zero, outliers(x, thr, mask)


_OUT_CHUNK = 1 << 16   # == csrc/cpu/quant_cpu.cpp kOutChunk


def outliers(x: torch.Tensor, thr: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`wweight.quant.outliers.outlier_indices` (sorted int64 flat indices of float32
    ``|x| >= thr`` or ``mask``) in two C++ passes over ``x``: per-chunk counts, then the indices at
    each chunk's offset (torch's abs, compare and serial nonzero took four, e.g. 42 ms of a 76 ms
    4-bit quantize of a 4096^2 float32 weight with 0.1 % outliers)."""
    if (not math.isfinite(thr) and mask is None) or not available() or x.dtype not in _DTYPES \
            or not hasattr(cpu_extension(), "quant_outliers"):
        return outlier_indices(x, thr, mask)
    n = x.numel()
    m = mask.contiguous().view(torch.uint8) if mask is not None else None
    t = float(thr) if math.isfinite(thr) else math.inf
    counts = torch.empty(max(1, -(-n // _OUT_CHUNK)), dtype=torch.int64)
    ext = cpu_extension()
    ext.quant_outliers(ptr(x), dtype_code(x), ptr(m), t, n, counts.data_ptr(), 0)
    total = int(counts.sum()) if n else 0
    out = torch.empty(total, dtype=torch.int64)
    if total:
        offs = torch.cumsum(counts, 0) - counts
        ext.quant_outliers(ptr(x), dtype_code(x), ptr(m), t, n, offs.data_ptr(), out.data_ptr())
    return out


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], n: int,
               dtype: torch.dtype, bits: int, bs: int) -> torch.Tensor:
    """Flat dense CPU tensor of ``dtype`` (outliers are restored above the backends)."""
    if not _takes(dtype):
        stats["fallback"] += 1
        return _torch.dequantize(packed, scale, zero, n, dtype, bits, bs)
    if packed.numel() < packed_bytes(n, bits):
        raise ValueError(f"codes: expected {packed_bytes(n, bits)} bytes for {n} {bits}-bit codes, "
                         f"got {packed.numel()}")
    # a fresh 64 MB output on 4 KB pages costs ~20 ms of page faults here, 5x the unpacking itself
    # (3.7 ms into touched memory): large outputs get transparent huge pages (wweight._ext.host_buffer)
    out = host_tensor(n * dtype.itemsize, dtype, (n,))
    s32 = scale.float().contiguous()
    z32 = zero.float().contiguous() if zero is not None else None
    nb = -(-n // bs) if n else 0
    if s32.numel() < nb or (z32 is not None and z32.numel() < nb):
        raise ValueError(f"scale / zero: expected {nb} blocks, got {s32.numel()}")
    p = packed.contiguous()  # held in a name: the kernel reads its memory
    cpu_extension().quant_dequantize(ptr(p), ptr(s32), ptr(z32), ptr(out), dtype_code(out), n,
                                     int(bs), int(bits))
    stats["dequantize"] += 1
    return out
