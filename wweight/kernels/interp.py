"""Triton kernels of the ``interp`` family's elementwise methods (launched by
``wweight/backends/triton/interp.py``): slerp's blend, nearswap, RAM and RAM+ (tensor-local).

Each kernel is one pass over the inputs in which every element goes through mergekit 0.1.5's op
sequence (``wweight/reference/interp.py``) with torch's CPU rounding: a 16-bit op is computed in
float32 and rounded to the input dtype after *each* op (``_round``, shared with the sparse family),
float32 ops are single IEEE operations (the launcher compiles without FMA contraction, and every
division is ``div_rn``, torch's IEEE division, not the 2-ulp ``div.full.f32`` that ``/`` gives).
Shapes: flat, contiguous ``n``-element tensors (``K`` model tensors through an int64 pointer
table); float32 / bfloat16 / float16; offsets are int64, tails masked, one program per ``BLOCK``.

On sm_90 LLVM turns some fp16 "float32 op, then round" pairs into native ``.f16x2`` ops: the same
bits, because float32 carries at least 2p + 2 = 24 significand bits for fp16's p = 11 (one op in
float32 rounded to fp16 is the correctly rounded fp16 op; bf16 likewise).

Where an op's rounding is defined by a torch *reduction* the reduction stays in torch (slerp's
norms and dot, in the launcher) or is reproduced where its order is known: RAM's K-way
``sum(dim=0)`` on CPU accumulates each column in float32 from 0 in model order for K <= 4 (ATen's
``cascade_sum``: ``multi_row_sum`` and ``row_sum`` agree there), which the loops below do; for
K >= 5 torch's order depends on the column's place in its loop (the launcher keeps torch then).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .sparse import _model_ptr, _round


@triton.jit
def _slerp_blend_kernel(a_ptr, b_ptr, out_ptr, coef_ptr, n, ROUND16: tl.constexpr, BLOCK: tl.constexpr):
    """out = coef[0] * a + coef[1] * b in float32 (mergekit's ``coef_a * x + coef_b * y`` on the
    float32 copies), rounded once to the output dtype (``result[...] = ...`` stores into the
    input dtype). ``coef`` is a 2-element float32 device tensor: no host synchronisation."""
    pid = tl.program_id(0)
    ELEM: tl.constexpr = a_ptr.dtype.element_ty
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    ca = tl.load(coef_ptr)
    cb = tl.load(coef_ptr + 1)
    x = tl.load(a_ptr + offs, mask=m, other=0).to(tl.float32)
    y = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    tl.store(out_ptr + offs, _round(ca * x + cb * y, ELEM, ROUND16).to(ELEM), mask=m)


@triton.jit
def _nearswap_kernel(a_ptr, b_ptr, out_ptr, n, t, ROUND16: tl.constexpr, BLOCK: tl.constexpr):
    """mergekit's nearswap, a = base, b = other:
    ``w = (t / |a - b|.clamp(min=1e-6)).clamp(0, 1); out = w * b + (1 - w) * a``.
    ``t / x`` is torch's ``x.reciprocal() * t`` (Tensor.__rtruediv__): two roundings, kept."""
    pid = tl.program_id(0)
    ELEM: tl.constexpr = a_ptr.dtype.element_ty
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(a_ptr + offs, mask=m, other=0).to(tl.float32)
    y = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    d = tl.abs(_round(x - y, ELEM, ROUND16))
    # clamp(min=1e-6): comparing against float32(1e-6) and rounding the result equals torch's clamp
    # against the dtype's 1e-6 (every 16-bit value below 1e-6 maps to the same rounded bound)
    c = _round(tl.maximum(d, 1e-6), ELEM, ROUND16)
    w = _round(tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), c), ELEM, ROUND16)
    w = _round(w * t, ELEM, ROUND16)            # torch multiplies by the float32 scalar (opmath)
    # clamp(0, 1) propagates NaN (fp16: 1 / 1e-6 overflows to inf, and inf * t=0 is NaN in torch too)
    w = tl.minimum(tl.maximum(w, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)
    pb = _round(w * y, ELEM, ROUND16)
    pa = _round(_round(1.0 - w, ELEM, ROUND16) * x, ELEM, ROUND16)
    tl.store(out_ptr + offs, _round(pb + pa, ELEM, ROUND16).to(ELEM), mask=m)


@triton.jit
def _ram_counts(xs_ptr, b, offs, m, eps, K: tl.constexpr, ELEM: tl.constexpr, ROUND16: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Per element: how many task vectors ``round(x_k - base)`` have ``|.| > eps`` (mergekit's
    ``contrib_counts``; ``eps`` is epsilon in the input dtype: torch compares in that dtype)."""
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for k in range(K):
        x = tl.load(_model_ptr(xs_ptr, k, ELEM, ALIGNED) + offs, mask=m, other=0).to(tl.float32)
        d = _round(x - b, ELEM, ROUND16)
        cnt += (tl.abs(d) > eps).to(tl.int32)
    return cnt


@triton.jit
def _ram_count_kernel(xs_ptr, base_ptr, part_ptr, n, eps, K: tl.constexpr, ROUND16: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """RAM+ pass 1, per block: (shared, unique) int32 counts of each model's nonzero entries, at
    ``part[pid, k, 0:2]`` (the launcher sums the blocks in int64: exact, any order)."""
    pid = tl.program_id(0)
    ELEM: tl.constexpr = base_ptr.dtype.element_ty
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    b = tl.load(base_ptr + offs, mask=m, other=0).to(tl.float32)
    cnt = _ram_counts(xs_ptr, b, offs, m, eps, K, ELEM, ROUND16, ALIGNED, BLOCK)
    row = part_ptr + pid.to(tl.int64) * (2 * K)
    for k in range(K):
        x = tl.load(_model_ptr(xs_ptr, k, ELEM, ALIGNED) + offs, mask=m, other=0).to(tl.float32)
        nz = (tl.abs(_round(x - b, ELEM, ROUND16)) > eps) & m
        tl.store(row + 2 * k, tl.sum((nz & (cnt > 1)).to(tl.int32), axis=0))
        tl.store(row + 2 * k + 1, tl.sum((nz & (cnt == 1)).to(tl.int32), axis=0))


@triton.jit
def _ram_merge_kernel(xs_ptr, base_ptr, out_ptr, lam_ptr, n, eps, K: tl.constexpr, PLUS: tl.constexpr,
                      ROUND16: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """RAM / RAM+ in one pass: ``out = base + sum_k(z_k * unique [* lambda_k] + z_k * overlap / count)``
    with ``z_k = tv_k * nonzero_k``. RAM: each term in the input dtype, the K-sum accumulated in
    float32 and rounded once, then the 16-bit add. RAM+: ``lambda_`` (float32, ``lam_ptr``) promotes
    the unique term, the sum and the base add to float32 (mergekit's type promotion), rounded once
    at the end. The K-sum runs in model order from 0 (torch's CPU order for K <= 4)."""
    pid = tl.program_id(0)
    ELEM: tl.constexpr = base_ptr.dtype.element_ty
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    b = tl.load(base_ptr + offs, mask=m, other=0).to(tl.float32)
    cnt = _ram_counts(xs_ptr, b, offs, m, eps, K, ELEM, ROUND16, ALIGNED, BLOCK)
    unique = (cnt == 1).to(tl.float32)
    overlap = (cnt > 1).to(tl.float32)
    div = tl.maximum(cnt, 1).to(tl.float32)      # counts.clamp(min=1): small integers, exact in 16 bits
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(K):
        x = tl.load(_model_ptr(xs_ptr, k, ELEM, ALIGNED) + offs, mask=m, other=0).to(tl.float32)
        d = _round(x - b, ELEM, ROUND16)
        # tv * mask as torch writes it (a masked-out negative entry is -0; it cannot reach the result:
        # the K-sum starts at +0)
        z = d * (tl.abs(d) > eps).to(tl.float32)
        shared = _round(tl.math.div_rn(z * overlap, div), ELEM, ROUND16)
        if PLUS:
            acc += (z * unique) * tl.load(lam_ptr + k) + shared
        else:
            acc += _round(z * unique + shared, ELEM, ROUND16)
    if PLUS:
        res = b + acc
    else:
        res = b + _round(acc, ELEM, ROUND16)
    tl.store(out_ptr + offs, _round(res, ELEM, ROUND16).to(ELEM), mask=m)
