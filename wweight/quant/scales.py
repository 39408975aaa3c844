"""Blockwise RTN arithmetic shared by every backend of the quantization family.

The kernels reduce each block (or each column chunk of a large block) to float32 statistics of
its non-outlier elements; these O(blocks) steps turn them into the stored scale / zero with the
formula of :mod:`wweight.reference.quant`.
"""
from __future__ import annotations

from typing import Optional

import torch


#: float16's smallest normal number: a scale below it is stored subnormal (few significant bits) or 0
FP16_TINY = 2.0 ** -14


def fp16_loses(scale32: torch.Tensor) -> bool:
    """Whether float16 storage would lose some block's scale (computed in float32): a nonzero
    scale under float16's normal range rounds to 0 (the block collapses to a constant) or to a
    subnormal with a few significant bits (the block's range comes back wrong), silently. The
    quantizer then falls back to float32 scales, as it does for overflow."""
    return bool(((scale32 > 0) & (scale32 < FP16_TINY)).any())


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of the big-endian bitstream of ``n`` codes: whole groups of 8 codes, ``bits`` bytes each."""
    return -(-n // 8) * bits


def reduce_partials(pmin: torch.Tensor, pmax: torch.Tensor, nb: int, nchunks: int, symmetric: bool):
    """Per-(block, chunk) partial min / max -> per-block (lo, hi, None) or (None, None, absmax)."""
    if symmetric:
        return None, None, pmax.view(nb, nchunks).amax(1)
    lo, hi = zero_empty_blocks(pmin.view(nb, nchunks).amin(1), pmax.view(nb, nchunks).amax(1))
    return lo, hi, None


def zero_empty_blocks(lo: torch.Tensor, hi: torch.Tensor):
    """A block whose elements are all outliers has lo > hi (inf, -inf): its statistics become 0 (in place)."""
    empty = lo > hi
    return lo.masked_fill_(empty, 0.0), hi.masked_fill_(empty, 0.0)


def finalize(lo, hi, amax, bits: int, symmetric: bool, clip: Optional[float], scale_dtype: torch.dtype):
    """float32 statistics -> stored (scale, zero); the formula of the reference, O(blocks)."""
    if symmetric:
        a = amax * clip if clip is not None else amax
        return (a / float((1 << (bits - 1)) - 1)).to(scale_dtype), None
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    return ((hi - lo) / float((1 << bits) - 1)).to(scale_dtype), lo.to(scale_dtype)
