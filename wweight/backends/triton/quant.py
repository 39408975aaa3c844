"""Backend ``triton`` of the quantization family: launches the kernels of ``wweight/kernels/quant.py``.

Contract: ``wweight/backends/__init__.py`` (``quantize``, ``dequantize``, ``dequant_matmul``). The
one-pass kernel serves ``block_size % 8 == 0`` up to :data:`FUSED_MAX_BLOCK`; other block sizes take
the statistics kernel, the shared O(blocks) scale formula and the pack kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ...kernels.quant import _dequant_kernel, _dq_matmul_kernel, _pack_kernel, _quant_fused_kernel, _stats_kernel
from ...quant.outliers import outlier_indices
from ...quant.scales import finalize, packed_bytes, reduce_partials
from .launch import launch

FUSED_MAX_BLOCK = 4096
_SD_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def fused_ok(bs: int, scale_dtype: torch.dtype) -> bool:
    return bs % 8 == 0 and bs <= FUSED_MAX_BLOCK and scale_dtype in _SD_CODE


def quantize_fused(x: torch.Tensor, bs: int, bits: int, symmetric: bool, thr: float, mask: Optional[torch.Tensor],
                   clip: Optional[float], scale_dtype: torch.dtype):
    """One-pass quantize (see ``_quant_fused_kernel``) -> (packed, scale, zero or None)."""
    n = x.numel()
    nb = -(-n // bs)
    ngroups = -(-n // 8)
    gp = triton.next_power_of_2(bs // 8)
    rows = max(1, 256 // gp)
    out = torch.empty(packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
    scale = torch.empty(nb, dtype=scale_dtype, device=x.device)
    zero = None if symmetric else torch.empty(nb, dtype=scale_dtype, device=x.device)
    excl = thr != float("inf")
    launch(_quant_fused_kernel, fused_grid(nb, rows),
        x, mask if mask is not None else x, scale, zero if zero is not None else scale, out, n, bs, nb, ngroups,
        float(thr) if excl else 0.0, float(clip) if clip is not None else 1.0,
        BITS=bits, SYM=symmetric, HAS_MASK=mask is not None, EXCL=excl, HAS_CLIP=clip is not None,
        SD=_SD_CODE[scale_dtype], ROWS=rows, GP=gp)
    return out, scale, zero


def fused_grid(nb: int, rows: int):
    """One program per ``rows`` whole blocks."""
    return (triton.cdiv(nb, rows),)


def stats_grid(nb: int, bs: int):
    """1-D grid of (row tile, column chunk) pairs of the statistics kernel (see ``_stats_kernel``)."""
    rows, cols = _tile(bs)
    return (triton.cdiv(nb, rows) * triton.cdiv(bs, cols),)


def group_grid(ngroups: int):
    """Pack / dequantize: one program per ``_G`` groups of 8 codes."""
    return (triton.cdiv(ngroups, _G),)


def matmul_grid(M: int, N: int, BM: int, BN: int):
    return (triton.cdiv(M, BM) * triton.cdiv(N, BN),)


def _tile(bs: int):
    cols = min(triton.next_power_of_2(max(bs, 1)), 1024)
    rows = max(1, 2048 // cols)
    return rows, cols


def block_stats(x: torch.Tensor, bs: int, symmetric: bool, thr: float, mask: Optional[torch.Tensor]):
    """float32 per-block (lo, hi, amax) over non-outliers; ``x`` flat and contiguous."""
    n = x.numel()
    nb = -(-n // bs)
    rows, cols = _tile(bs)
    nchunks = -(-bs // cols)
    pmin = torch.empty(nb * nchunks, device=x.device, dtype=torch.float32)
    pmax = torch.empty_like(pmin)
    excl = thr != float("inf")
    launch(_stats_kernel, stats_grid(nb, bs), x, mask if mask is not None else x, pmin, pmax, n, bs, nb, nchunks,
           float(thr) if excl else 0.0,
           HAS_MASK=mask is not None, EXCL=excl, SYM=symmetric, ROWS=rows, COLS=cols)
    return reduce_partials(pmin, pmax, nb, nchunks, symmetric)


_G = 128  # groups of 8 codes per program: 1024 elements


def quantize_pack(x: torch.Tensor, bs: int, bits: int, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    n = x.numel()
    ngroups = -(-n // 8)
    out = torch.empty(packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
    launch(_pack_kernel, group_grid(ngroups), x, scale, zero if zero is not None else scale, out,
           n, bs, ngroups, BITS=bits, SYM=zero is None, G=_G, ALIGNED=bs % 8 == 0)
    return out


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], n: int,
               dtype: torch.dtype, bits: int, bs: int) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype, device=packed.device)
    ngroups = -(-n // 8)
    launch(_dequant_kernel, group_grid(ngroups), packed, scale, zero if zero is not None else scale, out,
           n, bs, ngroups, BITS=bits, SYM=zero is None, G=_G, ALIGNED=bs % 8 == 0)
    return out


def dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                   N: int, K: int, bits: int, bs: int) -> torch.Tensor:
    """float32 ``x[M, K] @ W_hat[N, K]^T`` (outliers not included)."""
    M = x.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=torch.float32)
    BM = 16 if M <= 16 else 64
    BN, BK = 64, 32
    # (launch turns contraction off: the unpacked tile must equal what dequantize returns, c * s then + z)
    launch(_dq_matmul_kernel, matmul_grid(M, N, BM, BN), x, packed, scale, zero if zero is not None else scale, y,
           M, N, K, bs, packed.numel(), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
           BITS=bits, SYM=zero is None, W_F32=x.dtype == torch.float32, BM=BM, BN=BN, BK=BK)
    return y


def quantize(x: torch.Tensor, mask: Optional[torch.Tensor], thr: float, bits: int, bs: int, symmetric: bool,
             clip: Optional[float], scale_dtype: torch.dtype, one_pass: Optional[bool] = None):
    """Flat contiguous ``x`` -> (codes, scale, zero or None, outlier flat indices int64).

    ``one_pass``: None picks the one-pass kernel where it applies; False forces the three-kernel path."""
    if fused_ok(bs, scale_dtype) and one_pass is not False:  # one pass: stats, scale, codes, packing
        codes, scale, zero = quantize_fused(x, bs, bits, symmetric, thr, mask, clip, scale_dtype)
    else:
        lo, hi, amax = block_stats(x, bs, symmetric, thr, mask)
        scale, zero = finalize(lo, hi, amax, bits, symmetric, clip, scale_dtype)
        codes = quantize_pack(x, bs, bits, scale, zero)
    return codes, scale, zero, outlier_indices(x, thr, mask)
