"""Triton kernels of the sparse family: radix-select histograms, tie ranks, rescale statistics,
and the fused mask-and-merge (launched by ``wweight/backends/triton/sparse.py``).

The planning (which thresholds, which tie windows, which rescale factors) lives in
``wweight/sparse/plan.py`` and is shared by every backend; these kernels are the four primitives
that touch every element:

* ``digit_hist``     one radix-select pass: histogram of one digit of the |delta| key, for
                     every query (model, prefix) at once;
* ``tie_counts``     per-block counts of elements whose key equals a boundary key, so the fused
                     merge can rank ties by flat index (stable-sort tie breaking);
* ``rescale_stats``  per-model (before, after) norms of the delta and of the masked delta;
* ``merge``          one pass over the K inputs: delta, mask, rescale, weights, TIES sign
                     election, normalisation, lambda, base add -- writing only the output.

Deltas are rounded to the input dtype exactly where mergekit rounds them (``ROUND16``), so
16-bit merges give the same numbers as mergekit's torch code. All offsets are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..sparse import plan as _plan
from .philox import uniform_block

# the mask modes of a plan (wweight/sparse/plan.py), as compile-time constants of the kernels
MODE_NONE = tl.constexpr(_plan.MODE_NONE)
MODE_WINDOW = tl.constexpr(_plan.MODE_WINDOW)
MODE_RANDOM = tl.constexpr(_plan.MODE_RANDOM)

# _SEEDS: Triton turns an integer argument equal to 1 into a compile-time constant (a Python int,
# which has no ``.to``), and specialises on divisibility by 16. The Philox key words and the stream
# take any value, so they are never specialised (one compiled kernel per dtype/flag set instead of
# one per seed class); ``tests/test_triton_aot.py`` compiles every kernel with every scalar argument
# at 0, 1, 16 and 17.


@triton.jit
def _round(v, ELEM: tl.constexpr, ROUND16: tl.constexpr):
    """Round fp32 ``v`` to ELEM's precision and back (torch rounds every 16-bit op's result).

    bf16 is rounded to nearest-even with integer ops rather than ``.to(tl.bfloat16)``: the GPU
    cast is RTNE but the CPU interpreter truncates, and CI checks bit-exactness there.
    """
    if ROUND16:
        if ELEM == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            return v.to(ELEM).to(tl.float32)
    else:
        return v


@triton.jit
def _key(d, ELEM: tl.constexpr, ROUND16: tl.constexpr):
    """Monotone integer key of |d| (d already exactly representable in ELEM): the magnitude bits."""
    if ROUND16:
        if ELEM == tl.bfloat16:
            return ((d.to(tl.int32, bitcast=True) >> 16) & 0x7FFF).to(tl.int64)
        else:
            return (d.to(ELEM).to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF).to(tl.int64)
    else:
        return (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _model_ptr(xs_ptr, t, ELEM: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to model ``t``'s tensor from the int64 pointer table. A pointer loaded from memory has
    no known alignment, so without ``ALIGNED`` (every input 16-byte aligned, checked by the launcher)
    no load through it would be vectorised."""
    x_ptr = tl.load(xs_ptr + t).to(tl.pointer_type(ELEM))
    if ALIGNED:
        x_ptr = tl.multiple_of(x_ptr, 16)
    return x_ptr


@triton.jit
def _delta(x_ptr, base_ptr, offs, m, HAS_BASE: tl.constexpr, ELEM: tl.constexpr, ROUND16: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=m, other=0).to(tl.float32)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0).to(tl.float32)
        return _round(x - b, ELEM, ROUND16)
    else:
        return x


@triton.jit
def _digit_hist_kernel(xs_ptr, base_ptr, qmodel_ptr, prefix_ptr, hist_ptr, n, tiles_per_prog,
                       SHIFT: tl.constexpr, NBITS: tl.constexpr, HIGH_SHIFT: tl.constexpr,
                       HAS_PREFIX: tl.constexpr, HAS_BASE: tl.constexpr, ROUND16: tl.constexpr,
                       ALIGNED: tl.constexpr, BLK: tl.constexpr):
    pid = tl.program_id(0)
    q = tl.program_id(1)
    ELEM: tl.constexpr = base_ptr.dtype.element_ty
    t = tl.load(qmodel_ptr + q)
    x_ptr = _model_ptr(xs_ptr, t, ELEM, ALIGNED)
    prefix = tl.load(prefix_ptr + q)
    NB: tl.constexpr = 1 << NBITS
    acc = tl.zeros([NB], dtype=tl.int32)
    for i in range(tiles_per_prog):
        offs = (pid.to(tl.int64) * tiles_per_prog + i) * BLK + tl.arange(0, BLK)
        m = offs < n
        key = _key(_delta(x_ptr, base_ptr, offs, m, HAS_BASE, ELEM, ROUND16), ELEM, ROUND16)
        if HAS_PREFIX:
            m = m & ((key >> HIGH_SHIFT) == (prefix >> HIGH_SHIFT))
        digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
        acc += tl.histogram(digit, NB, mask=m)
    # per-program counts fit int32 (the launcher caps elements per program below 2**31); the global
    # histogram is int64: one bin can hold more than 2**31 elements (e.g. 2**31 + 4096 zeros)
    tl.atomic_add(hist_ptr + q * NB + tl.arange(0, NB), acc.to(tl.int64))


@triton.jit
def _tie_count_kernel(xs_ptr, base_ptr, qmodel_ptr, qkey_ptr, out_ptr, n, nblocks,
                      HAS_BASE: tl.constexpr, ROUND16: tl.constexpr, ALIGNED: tl.constexpr, BLK: tl.constexpr):
    pid = tl.program_id(0)
    q = tl.program_id(1)
    ELEM: tl.constexpr = base_ptr.dtype.element_ty
    t = tl.load(qmodel_ptr + q)
    x_ptr = _model_ptr(xs_ptr, t, ELEM, ALIGNED)
    offs = pid.to(tl.int64) * BLK + tl.arange(0, BLK)
    m = offs < n
    key = _key(_delta(x_ptr, base_ptr, offs, m, HAS_BASE, ELEM, ROUND16), ELEM, ROUND16)
    cnt = tl.sum((m & (key == tl.load(qkey_ptr + q))).to(tl.int32), axis=0)
    tl.store(out_ptr + q.to(tl.int64) * nblocks + pid, cnt)


@triton.jit
def _keep(d, key, offs, m, t, pid, kp_ptr, tie_ptr, density_ptr, seed_lo, seed_hi, stream0, nblocks, blk_start,
          MODE: tl.constexpr, HAS_TIES: tl.constexpr, BLK: tl.constexpr):
    """Keep-mask of model ``t`` for this block: ``MODE_WINDOW`` thresholds + tie windows, ``MODE_RANDOM``
    Philox draws (``BLK`` is the plan's ``BLOCK``: tie offsets are counted per block)."""
    if MODE == MODE_WINDOW:
        # kp row t: key_lo, key_hi, lo window [a, b), hi window [c, e)
        key_lo = tl.load(kp_ptr + t * 6 + 0)
        key_hi = tl.load(kp_ptr + t * 6 + 1)
        keep = (key > key_lo) & (key < key_hi)
        eq_lo = key == key_lo
        eq_hi = key == key_hi
        if HAS_TIES:
            # rank among equal keys by flat index = block offset + inclusive prefix count - self
            e_lo = (eq_lo & m).to(tl.int32)
            e_hi = (eq_hi & m).to(tl.int32)
            r_lo = tl.load(tie_ptr + (t * 2 + 0) * nblocks + pid) + (tl.cumsum(e_lo, axis=0) - e_lo).to(tl.int64)
            r_hi = tl.load(tie_ptr + (t * 2 + 1) * nblocks + pid) + (tl.cumsum(e_hi, axis=0) - e_hi).to(tl.int64)
        else:
            r_lo = tl.zeros([BLK], dtype=tl.int64)
            r_hi = tl.zeros([BLK], dtype=tl.int64)
        keep = keep | (eq_lo & (r_lo >= tl.load(kp_ptr + t * 6 + 2)) & (r_lo < tl.load(kp_ptr + t * 6 + 3)))
        keep = keep | (eq_hi & (r_hi >= tl.load(kp_ptr + t * 6 + 4)) & (r_hi < tl.load(kp_ptr + t * 6 + 5)))
        return keep
    elif MODE == MODE_RANDOM:
        u = uniform_block(blk_start, seed_lo, seed_hi, stream0 + t, BLK)
        return u < tl.load(density_ptr + t)
    else:
        return m | True


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "stream0"])  # any value, incl. 1 (see _SEEDS)
def _stats_kernel(xs_ptr, base_ptr, kp_ptr, tie_ptr, density_ptr, out_ptr, n, nblocks, seed_lo, seed_hi, stream0,
                  NORM: tl.constexpr, MODE: tl.constexpr, HAS_TIES: tl.constexpr, HAS_BASE: tl.constexpr,
                  ROUND16: tl.constexpr, ALIGNED: tl.constexpr, BLK: tl.constexpr):
    """Per block and model: (before, after) partial norms. NORM 1 = l1, 2 = l2 (sum of squares), 3 = linf."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    ELEM: tl.constexpr = base_ptr.dtype.element_ty
    x_ptr = _model_ptr(xs_ptr, t, ELEM, ALIGNED)
    blk_start = pid.to(tl.int64) * BLK
    offs = blk_start + tl.arange(0, BLK)
    m = offs < n
    d = _delta(x_ptr, base_ptr, offs, m, HAS_BASE, ELEM, ROUND16)
    key = _key(d, ELEM, ROUND16)
    keep = _keep(d, key, offs, m, t, pid, kp_ptr, tie_ptr, density_ptr, seed_lo, seed_hi, stream0, nblocks,
                 blk_start, MODE, HAS_TIES, BLK) & m
    a = tl.abs(d)
    am = tl.where(keep, a, 0.0)
    if NORM == 1:
        before = tl.sum(a, axis=0)
        after = tl.sum(am, axis=0)
    elif NORM == 2:
        before = tl.sum(a * a, axis=0)
        after = tl.sum(am * am, axis=0)
    else:
        before = tl.max(a, axis=0)
        after = tl.max(am, axis=0)
    row = out_ptr + (t.to(tl.int64) * nblocks + pid) * 2
    tl.store(row, before)
    tl.store(row + 1, after)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "stream0"])  # any value, incl. 1 (see _SEEDS)
def _merge_kernel(xs_ptr, base_ptr, out_ptr, kp_ptr, tie_ptr, density_ptr, weight_ptr, scale_ptr, flags_ptr,
                  n, nblocks, seed_lo, seed_hi, stream0, lam, divisor_nc,
                  K: tl.constexpr, MODE: tl.constexpr, HAS_TIES: tl.constexpr, CONSENSUS: tl.constexpr,
                  NORMALIZE: tl.constexpr, APPLY_LAMBDA: tl.constexpr, HAS_BASE: tl.constexpr,
                  SPARSIFY_ONLY: tl.constexpr, ROUND16: tl.constexpr, ALIGNED: tl.constexpr,
                  BLK: tl.constexpr):
    """out = base + lambda * merge_t(w_t * rescale_t(mask_t(x_t - base))), mergekit's order of rounding.

    With SPARSIFY_ONLY (K == 1, no weights) it writes the sparsified delta itself.
    """
    pid = tl.program_id(0)
    ELEM: tl.constexpr = base_ptr.dtype.element_ty
    OUT: tl.constexpr = out_ptr.dtype.element_ty
    blk_start = pid.to(tl.int64) * BLK
    offs = blk_start + tl.arange(0, BLK)
    m = offs < n
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0).to(tl.float32)
        bad = tl.max(((b - b) != 0).to(tl.int32), axis=0)
        tl.store(flags_ptr + K, 1, mask=bad > 0)
    else:
        b = tl.zeros([BLK], dtype=tl.float32)
    total = tl.zeros([BLK], dtype=tl.float32)     # sum of weighted deltas (sign election)
    pos = tl.zeros([BLK], dtype=tl.float32)       # sum of positive weighted deltas
    neg = tl.zeros([BLK], dtype=tl.float32)
    wpos = tl.zeros([BLK], dtype=tl.float32)      # sum of weights of positive weighted deltas
    wneg = tl.zeros([BLK], dtype=tl.float32)
    for t in range(K):
        x_ptr = _model_ptr(xs_ptr, t, ELEM, ALIGNED)
        x = tl.load(x_ptr + offs, mask=m, other=0).to(tl.float32)
        bad = tl.max(((x - x) != 0).to(tl.int32), axis=0)
        tl.store(flags_ptr + t, 1, mask=bad > 0)
        if HAS_BASE:
            d = _round(x - b, ELEM, ROUND16)
        else:
            d = x
        if MODE != MODE_NONE:
            key = _key(d, ELEM, ROUND16)
            keep = _keep(d, key, offs, m, t, pid, kp_ptr, tie_ptr, density_ptr, seed_lo, seed_hi, stream0,
                         nblocks, blk_start, MODE, HAS_TIES, BLK)
            d = tl.where(keep, d, 0.0)
            d = _round(d * tl.load(scale_ptr + t), ELEM, ROUND16)
        if SPARSIFY_ONLY:
            total = d
        else:
            w = tl.load(weight_ptr + t)
            wd = _round(d * w, ELEM, ROUND16)
            total += wd
            if CONSENSUS:
                pos += tl.where(wd > 0, wd, 0.0)
                neg += tl.where(wd < 0, wd, 0.0)
                wpos += tl.where(wd > 0, w, 0.0)
                wneg += tl.where(wd < 0, w, 0.0)
    if SPARSIFY_ONLY:
        tl.store(out_ptr + offs, _round(total, OUT, ROUND16 or OUT != tl.float32).to(OUT), mask=m)
    else:
        if CONSENSUS:
            up = total >= 0
            mixed = _round(tl.where(up, pos, neg), ELEM, ROUND16)
            div = _round(tl.where(up, wpos, wneg), ELEM, ROUND16)
            div = tl.where(div == 0, 1.0, div)
        else:
            mixed = _round(total, ELEM, ROUND16)
            div = divisor_nc
        if NORMALIZE:
            # IEEE division (torch's): '/' compiles to the 2-ulp div.full.f32 on GPUs
            mixed = _round(tl.math.div_rn(mixed, div), ELEM, ROUND16)
        if APPLY_LAMBDA:
            mixed = _round(mixed * lam, ELEM, ROUND16)
        tl.store(out_ptr + offs, _round(b + mixed, OUT, OUT != tl.float32).to(OUT), mask=m)
