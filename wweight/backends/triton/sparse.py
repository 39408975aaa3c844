"""Backend ``triton`` of the sparse family: launches the kernels of ``wweight/kernels/sparse.py``.

Contract: ``wweight/backends/__init__.py``. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
(how CI runs these kernels). Integer arguments are 64-bit; the merge and statistics kernels are
compiled without FMA contraction (mergekit rounds products and sums separately).
"""
from __future__ import annotations

import torch
import triton

from ...kernels.sparse import _digit_hist_kernel, _merge_kernel, _stats_kernel, _tie_count_kernel
from ..._ext import device_tensor, ptrs
from ...sparse.plan import BLOCK, NORM_CODES, first, reduce_norm_partials, round16 as _round16

HIST_BLOCK = 1024      # elements per tile of the histogram kernel


def _ptr_table(xs):
    return device_tensor(ptrs(xs), torch.int64, xs[0].device)


def _grid_programs(n, blk, device):
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = sms * 8
    else:
        target = 4  # interpreter: few, fat programs
    tiles = triton.cdiv(n, blk)
    per = max(1, triton.cdiv(tiles, target))
    return triton.cdiv(tiles, per), per


def digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix):
    """Histogram (Q, 2**nbits) int64 of key digit ``(key >> shift) & (2**nbits - 1)`` per query."""
    ref = first(xs, base)
    n = ref.numel()
    Q = qmodel.numel()
    hist = torch.zeros((Q, 1 << nbits), dtype=torch.int32, device=ref.device)
    if n == 0 or Q == 0:
        return hist.long()
    progs, per = _grid_programs(n, HIST_BLOCK, ref.device)
    _digit_hist_kernel[(progs, Q)](
        _ptr_table(xs), ref, qmodel, prefix, hist, n, per,
        SHIFT=shift, NBITS=nbits, HIGH_SHIFT=high_shift, HAS_PREFIX=has_prefix,
        HAS_BASE=base is not None, ROUND16=_round16(ref.dtype), BLK=HIST_BLOCK)
    return hist.long()


def tie_counts(xs, base, qmodel, qkey):
    """(Q, nblocks) int64: per BLOCK-element block, how many keys equal each query's boundary key."""
    ref = first(xs, base)
    n = ref.numel()
    nblocks = triton.cdiv(n, BLOCK)
    Q = qmodel.numel()
    out = torch.zeros((Q, nblocks), dtype=torch.int32, device=ref.device)
    if n and Q:
        _tie_count_kernel[(nblocks, Q)](_ptr_table(xs), ref, qmodel, qkey, out, n, nblocks,
                                        HAS_BASE=base is not None, ROUND16=_round16(ref.dtype), BLK=BLOCK)
    return out.long()


def rescale_stats(xs, base, plan, norm):
    """(K, 2) float64: (before, after) of the rescale norm for each model under ``plan``'s masks."""
    ref = first(xs, base)
    n = ref.numel()
    K = len(xs)
    nblocks = triton.cdiv(n, BLOCK)
    part = torch.zeros((K, max(nblocks, 1), 2), dtype=torch.float32, device=ref.device)
    if n:
        _stats_kernel[(nblocks, K)](
            _ptr_table(xs), ref, plan.kp, plan.tie_offsets, plan.density, part, n, nblocks,
            plan.seed_lo, plan.seed_hi, plan.stream0, NORM=NORM_CODES[norm], MODE=plan.mode, HAS_TIES=plan.has_ties,
            HAS_BASE=base is not None, ROUND16=_round16(ref.dtype), BLK=BLOCK, enable_fp_fusion=False)
    return reduce_norm_partials(part, norm)


def merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only=False,
          round16=None):
    ref = first(xs, base)
    n = ref.numel()
    K = len(xs)
    flags = torch.zeros(K + 1, dtype=torch.int32, device=ref.device)
    if n == 0:
        return flags
    nblocks = triton.cdiv(n, BLOCK)
    _merge_kernel[(nblocks,)](
        _ptr_table(xs), ref, out, plan.kp, plan.tie_offsets, plan.density, weights, scales, flags,
        n, nblocks, plan.seed_lo, plan.seed_hi, plan.stream0, float(lam), float(divisor_nc),
        K=K, MODE=plan.mode, HAS_TIES=plan.has_ties, CONSENSUS=consensus, NORMALIZE=normalize,
        APPLY_LAMBDA=lam != 1, HAS_BASE=base is not None, SPARSIFY_ONLY=sparsify_only,
        ROUND16=_round16(ref.dtype, round16), BLK=BLOCK,
        # no FMA contraction: mergekit rounds the product and the sum separately
        enable_fp_fusion=False)
    return flags
