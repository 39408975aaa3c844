"""Plain-PyTorch reference of blockwise round-to-nearest quantization with outliers held out.

Small and obviously right; every fast path (``wweight/backends/{torch,triton,cuda}/quant.py`` and
their kernels ``wweight/kernels/quant.py``, ``csrc/quant.cu``) is tested against these functions.

Semantics (shared by every backend, documented in :func:`wweight.quantize`):

* Blocks are contiguous runs of ``block_size`` elements of the row-major flattened tensor
  (the Super Weight paper's blocking, Yu et al. 2024, arXiv:2411.07191); the last block may
  be shorter.
* Statistics are computed in float32 over the block's *non-outlier* elements.
* Asymmetric (default, min-max RTN as in the paper's ``quantize_blockwise``):
  ``lo, hi = min, max`` (times ``clip`` if given), ``scale = (hi - lo) / (2**bits - 1)``,
  ``zero = lo``; both are rounded to the storage dtype first and the codes are computed with
  the *stored* values: ``code = clamp(round((w - zero) / scale), 0, 2**bits - 1)``,
  ``w_hat = code * scale + zero``.
* Symmetric (absmax): ``scale = absmax / (2**(bits-1) - 1)``,
  ``code = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1) + 2**(bits-1)``,
  ``w_hat = (code - 2**(bits-1)) * scale``.
* ``round`` is round-half-to-even (``torch.round``); a block whose scale is 0 (constant, or
  all outliers) gets code 0 (asymmetric) / ``2**(bits-1)`` (symmetric) everywhere.
* Outlier positions get codes by the same formula (clamped); their exact values are stored
  separately and overwrite the dequantized values.
* Packing: the codes, in element order, form one big-endian bitstream (the first code in the
  most significant bits of byte 0; for 4 bits that is bitsandbytes' "high nibble first"),
  padded with zero codes to a multiple of 8 codes, so ``ceil(n / 8) * bits`` bytes.

Deviation from the paper's public code (``outliers/functional/quantization.py``): its active
INT branch truncates ``w / scale + zeros`` to int8 and reconstructs at ``trunc + 0.5``
(bucket midpoints); we use plain round-to-nearest (the formula left commented out there),
and instead of clamping outliers to a threshold we hold them out exactly (SpQR style).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def levels(bits: int) -> int:
    return (1 << bits) - 1


def block_stats(w: torch.Tensor, block_size: int, outlier_mask: Optional[torch.Tensor]):
    """Per-block (min, max, absmax) of the non-outlier elements, float32; empty block -> 0."""
    x = w.reshape(-1).float()
    n = x.numel()
    nb = (n + block_size - 1) // block_size
    excl = torch.zeros(n, dtype=torch.bool) if outlier_mask is None else outlier_mask.reshape(-1).cpu()
    lo = torch.zeros(nb)
    hi = torch.zeros(nb)
    amax = torch.zeros(nb)
    for b in range(nb):  # a Python loop on purpose: obviously right, only used on small inputs
        seg = x[b * block_size:(b + 1) * block_size].cpu()
        keep = seg[~excl[b * block_size:(b + 1) * block_size]]
        if keep.numel():
            lo[b] = keep.min()
            hi[b] = keep.max()
            amax[b] = keep.abs().max()
    return lo, hi, amax


def scales(lo, hi, amax, bits: int, symmetric: bool, clip: Optional[float], scale_dtype: torch.dtype):
    """Stored (scale, zero) of every block; zero is None for symmetric quantization."""
    if clip is not None:
        lo, hi, amax = lo * clip, hi * clip, amax * clip
    if symmetric:
        scale = (amax / float((1 << (bits - 1)) - 1)).to(scale_dtype)
        return scale, None
    scale = ((hi - lo) / float(levels(bits))).to(scale_dtype)
    return scale, lo.to(scale_dtype)


def codes(w: torch.Tensor, block_size: int, bits: int, scale: torch.Tensor,
          zero: Optional[torch.Tensor]) -> torch.Tensor:
    """Unpacked uint8 codes of the flattened tensor (one per element)."""
    x = w.reshape(-1).float().cpu()
    n = x.numel()
    blk = torch.arange(n) // block_size
    s = scale.float().cpu()[blk]
    if zero is None:
        half = 1 << (bits - 1)
        q = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(x))
        q = q.clamp(-half, half - 1) + half
    else:
        z = zero.float().cpu()[blk]
        q = torch.where(s > 0, torch.round((x - z) / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(x))
        q = q.clamp(0, levels(bits))
    return q.to(torch.uint8)


def pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Big-endian bitstream of ``bits``-bit codes, padded to a multiple of 8 codes."""
    c = c.reshape(-1).to(torch.int64).cpu()
    n = c.numel()
    pad = (-n) % 8
    c = torch.cat([c, torch.zeros(pad, dtype=torch.int64)])
    shifts = torch.arange(bits - 1, -1, -1)
    bitstream = ((c[:, None] >> shifts) & 1).reshape(-1, 8)  # MSB of each code first
    weights = 1 << torch.arange(7, -1, -1)
    return (bitstream * weights).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    p = packed.reshape(-1).to(torch.int64).cpu()
    bitstream = ((p[:, None] >> torch.arange(7, -1, -1)) & 1).reshape(-1)
    per = bitstream[: (bitstream.numel() // bits) * bits].reshape(-1, bits)
    vals = (per * (1 << torch.arange(bits - 1, -1, -1))).sum(1)
    return vals[:n].to(torch.uint8)


def outlier_mask_fraction(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``k = max(1, int(fraction * n))`` largest-|w| elements (ties at the k-th value included),
    found with a full sort (independent of the radix select the fast paths use)."""
    a = w.reshape(-1).float().abs()
    k = max(1, int(fraction * a.numel()))
    t = torch.sort(a, descending=True).values[k - 1]
    return (a >= t).reshape(w.shape)


def outlier_mask_zscore(w: torch.Tensor, z: float) -> torch.Tensor:
    """``|w| > mean(|w|) + z * std(|w|)`` over the whole tensor (the paper code's ``zscore`` clip rule,
    applied per tensor)."""
    a = w.float().abs()
    return a > a.mean() + z * a.std()


def quantize(w: torch.Tensor, bits: int, block_size: int, symmetric: bool = False,
             outlier_mask: Optional[torch.Tensor] = None, clip: Optional[float] = None,
             scale_dtype: torch.dtype = torch.float16):
    """-> (packed uint8, scale, zero or None, outlier flat indices int64, outlier values)."""
    lo, hi, amax = block_stats(w, block_size, outlier_mask)
    scale, zero = scales(lo, hi, amax, bits, symmetric, clip, scale_dtype)
    c = codes(w, block_size, bits, scale, zero)
    flat = w.reshape(-1)
    if outlier_mask is None:
        idx = torch.zeros(0, dtype=torch.int64)
    else:
        idx = torch.nonzero(outlier_mask.reshape(-1).cpu()).reshape(-1)
    return pack(c, bits), scale, zero, idx, flat.cpu()[idx]


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
               outlier_idx: torch.Tensor, outlier_val: torch.Tensor, shape, dtype: torch.dtype,
               bits: int, block_size: int) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    c = unpack(packed, bits, n).float()
    blk = torch.arange(n) // block_size
    s = scale.float().cpu()[blk]
    if zero is None:
        x = (c - float(1 << (bits - 1))) * s
    else:
        x = c * s + zero.float().cpu()[blk]
    out = x.to(dtype)
    out[outlier_idx.cpu().long()] = outlier_val.cpu().to(dtype)
    return out.reshape(tuple(shape))


def quantize_dequantize(w, bits, block_size, symmetric=False, outlier_mask=None, clip=None,
                        scale_dtype=torch.float16) -> Tuple[torch.Tensor, tuple]:
    parts = quantize(w, bits, block_size, symmetric, outlier_mask, clip, scale_dtype)
    return dequantize(*parts, w.shape, w.dtype, bits, block_size), parts
