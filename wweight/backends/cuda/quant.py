"""Backend ``cuda`` of the quantization family: the kernels of ``csrc/quant.cu`` (``wweight._cuda``).

Contract: ``wweight/backends/__init__.py`` (``quantize``, ``dequantize``). The one-pass kernel (one
warp per block) serves ``block_size % 8 == 0`` up to :data:`FUSED_MAX_BLOCK`; other block sizes take
the statistics kernel, the shared O(blocks) scale formula and the pack kernel. :data:`SELFTESTS`
runs the first time each kernel set is picked on a device (``wweight._dispatch``).
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch

from ..._ext import DTYPE_CODES, cuda_extension, dtype_code, on_tensor_device, ptr, stream
from ...quant.outliers import outlier_indices
from ...quant.scales import finalize, packed_bytes, reduce_partials
from ...reference import quant as _ref

#: a NaN among a block's kept elements makes its scale NaN (wweight.quantize relies on it, self-tested)
NAN_PROPAGATES = True
FUSED_MAX_BLOCK = 16384  # one warp per block: larger blocks go through the two-kernel path
_FUSED_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _mask_u8(mask):
    return mask.view(torch.uint8) if mask is not None else None


@on_tensor_device
def block_stats(x, bs, symmetric, thr, mask):
    n = x.numel()
    nb = -(-n // bs)
    cols = 1024
    nchunks = -(-bs // cols) if bs > cols else 1
    pmin = torch.empty(nb * nchunks, device=x.device, dtype=torch.float32)
    pmax = torch.empty_like(pmin)
    cuda_extension().quant_stats(ptr(x), dtype_code(x), ptr(_mask_u8(mask)), ptr(pmin), ptr(pmax), n, bs, nb,
                                 nchunks, float(thr) if math.isfinite(thr) else float("inf"), bool(symmetric),
                                 stream(x))
    return reduce_partials(pmin, pmax, nb, nchunks, symmetric)


@on_tensor_device
def quantize_fused(x, bs, bits, symmetric, thr, mask, clip, scale_dtype):
    n = x.numel()
    nb = -(-n // bs)
    out = torch.empty(packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
    scale = torch.empty(nb, dtype=scale_dtype, device=x.device)
    zero = None if symmetric else torch.empty(nb, dtype=scale_dtype, device=x.device)
    cuda_extension().quant_fused(
        ptr(x), dtype_code(x), ptr(_mask_u8(mask)), ptr(scale), ptr(zero), DTYPE_CODES[scale_dtype], ptr(out), n,
        bs, bits, float(thr), float(clip) if clip is not None else -1.0, bool(symmetric), stream(x))
    return out, scale, zero


@on_tensor_device
def quantize_pack(x, bs, bits, scale, zero):
    n = x.numel()
    out = torch.empty(packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
    s32 = scale.float().contiguous()
    z32 = zero.float().contiguous() if zero is not None else None
    cuda_extension().quant_pack(ptr(x), dtype_code(x), ptr(s32), ptr(z32), ptr(out), n, bs, bits, stream(x))
    return out


@on_tensor_device
def quantize(x: torch.Tensor, mask: Optional[torch.Tensor], thr: float, bits: int, bs: int, symmetric: bool,
             clip: Optional[float], scale_dtype: torch.dtype, one_pass: Optional[bool] = None):
    """Flat contiguous ``x`` -> (codes, scale, zero or None, outlier flat indices int64).

    ``one_pass``: None picks the one-pass kernel where it applies; False forces the two-kernel path."""
    fused = bs % 8 == 0 and bs <= FUSED_MAX_BLOCK and scale_dtype in _FUSED_SCALE_DTYPES
    if fused and one_pass is not False:
        codes, scale, zero = quantize_fused(x, bs, bits, symmetric, thr, mask, clip, scale_dtype)
        return codes, scale, zero, outlier_indices(x, thr, mask)
    lo, hi, amax = block_stats(x, bs, symmetric, thr, mask)
    idx = outlier_indices(x, thr, mask)
    scale, zero = finalize(lo, hi, amax, bits, symmetric, clip, scale_dtype)
    return quantize_pack(x, bs, bits, scale, zero), scale, zero, idx


@on_tensor_device
def dequantize(packed, scale, zero, n, dtype, bits, bs):
    out = torch.empty(n, dtype=dtype, device=packed.device)
    s32 = scale.float().contiguous()
    z32 = zero.float().contiguous() if zero is not None else None
    cuda_extension().quant_dequant(ptr(packed), ptr(s32), ptr(z32), ptr(out), dtype_code(out), n, bs, bits,
                                   stream(out))
    return out


# (bits, block size, symmetric): 64 and 104 take the one-pass kernel, 100 and 777 the two-kernel path
_CASES = ((4, 64, False), (3, 100, True), (8, 777, False), (5, 104, True))


def _selftest_cases():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(777, generator=g)
    w[5] = 40.0
    for bits, bs, sym in _CASES:
        thr = float(torch.sort(w.abs(), descending=True).values[int(0.01 * 777) - 1])
        want = _ref.quantize(w, bits, bs, sym, _ref.outlier_mask_fraction(w, 0.01))
        yield w, bits, bs, sym, thr, want


def selftest_quantize(device: torch.device, prims=None) -> bool:
    """``quantize`` (both paths) vs the reference; ``prims``: another backend's module instead (CI
    runs the self-test itself on the CPU backends, so a wrong self-test cannot disable good kernels)."""
    prims = prims or sys.modules[__name__]
    for w, bits, bs, sym, thr, (codes, scale, zero, idx, _) in _selftest_cases():
        for one_pass in (None, False):  # the kernel that applies, and the two-kernel path for every case
            c, s, z, i = prims.quantize(w.to(device), None, thr, bits, bs, sym, None, torch.float16, one_pass)
            if not (torch.equal(c.cpu(), codes) and torch.equal(s.cpu(), scale) and torch.equal(i.cpu(), idx)
                    and (zero is None or torch.equal(z.cpu(), zero))):
                return False
    # NaN propagation: wweight.quantize skips its up-front finiteness pass on this backend because a
    # NaN reaches its block's scale (as in the reference); check exactly that block turns non-finite
    if not getattr(prims, "NAN_PROPAGATES", False):
        return True  # Triton: wweight.quantize keeps its up-front check there
    w = torch.randn(200, generator=torch.Generator().manual_seed(1))
    w[70] = math.nan
    for bs, one_pass in ((64, None), (64, False), (100, None)):
        s = prims.quantize(w.to(device), None, math.inf, 4, bs, False, None, torch.float32, one_pass)[1].cpu()
        if not torch.equal(torch.isfinite(s), torch.arange(s.numel()) != 70 // bs):
            return False
    return True


def selftest_dequantize(device: torch.device, prims=None) -> bool:
    """``dequantize`` vs the reference (outliers are restored above the backends)."""
    prims = prims or sys.modules[__name__]
    for w, bits, bs, sym, thr, (codes, scale, zero, _, _) in _selftest_cases():
        want = _ref.dequantize(codes, scale, zero, torch.zeros(0, dtype=torch.int64), torch.zeros(0), (777,),
                               torch.float32, bits, bs)
        got = prims.dequantize(codes.to(device), scale.to(device), None if zero is None else zero.to(device),
                               777, torch.float32, bits, bs)
        if not torch.equal(got.cpu(), want):
            return False
    return True


#: CUDA kernel set (attribute of ``wweight._cuda``) -> its self-test
SELFTESTS = {"quant_pack": selftest_quantize, "quant_dequant": selftest_dequantize}
