"""Vectorised-torch primitives of the sparse family, backend ``torch`` (the CPU path without the C++
extension, and the fallback on any device). Contract: ``wweight/backends/__init__.py``; chunked so
memory stays at a few chunks however large the tensor, and never holding K full-size deltas.

Rounding follows mergekit's torch code operation by operation (the ops below *are* torch ops in
the input dtype), so results match the reference bit for bit.
"""
from __future__ import annotations

import torch

from ...reference.philox import philox_uniform
from ...sparse.plan import BLOCK, MODE_RANDOM, first

CHUNK = BLOCK * 4096        # 4M elements: big enough for vectorised torch, small enough for cache-ish memory


def _flat(t):
    return t.reshape(-1)


def _delta(xs, base, t, s, e):
    x = _flat(xs[t])[s:e]
    return x - _flat(base)[s:e] if base is not None else x


def _keys(d: torch.Tensor) -> torch.Tensor:
    if d.dtype in (torch.float16, torch.bfloat16):
        return d.view(torch.int16).to(torch.int32) & 0x7FFF
    return d.view(torch.int32) & 0x7FFFFFFF


def _n(xs, base):
    return first(xs, base).numel()


def digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix):
    n = _n(xs, base)
    nb = 1 << nbits
    Q = qmodel.numel()
    out = torch.zeros((Q, nb), dtype=torch.int64, device=qmodel.device)
    qm, pf = qmodel.tolist(), prefix.tolist()
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        cache = {}
        for q in range(Q):
            t = qm[q]
            if t not in cache:
                cache[t] = _keys(_delta(xs, base, t, s, e))
            key = cache[t]
            if has_prefix:
                key = key[(key >> high_shift) == (pf[q] >> high_shift)]
            out[q] += torch.bincount((key >> shift) & (nb - 1), minlength=nb)
    return out


def tie_counts(xs, base, qmodel, qkey):
    n = _n(xs, base)
    nblocks = (n + BLOCK - 1) // BLOCK
    out = torch.zeros((qmodel.numel(), nblocks), dtype=torch.int64, device=qmodel.device)
    for q, (t, k) in enumerate(zip(qmodel.tolist(), qkey.tolist())):
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            eq = (_keys(_delta(xs, base, t, s, e)) == k).to(torch.int64)
            pad = (-eq.numel()) % BLOCK
            if pad:
                eq = torch.nn.functional.pad(eq, (0, pad))
            out[q, s // BLOCK: s // BLOCK + eq.numel() // BLOCK] = eq.view(-1, BLOCK).sum(1)
    return out


def keep_mask(d: torch.Tensor, t: int, s: int, plan) -> torch.Tensor:
    """Keep-mask of model ``t`` for the chunk of flat indices ``s .. s + d.numel() - 1`` (s % BLOCK == 0)."""
    if plan.mode == MODE_RANDOM:
        u = philox_uniform(d.numel(), plan.seed, plan.stream0 + t, device=d.device,
                           start=s)
        return u < plan.density[t]
    key = _keys(d).to(torch.int64)
    klo, khi, a, b, c, e = plan.kp[t].tolist()
    keep = (key > klo) & (key < khi)
    for kk, lo, hi, cut in ((klo, a, b, 0), (khi, c, e, 1)):
        eq = key == kk
        if plan.has_ties:
            ei = eq.to(torch.int64)
            rank = plan.tie_offsets[t, cut, s // BLOCK] + torch.cumsum(ei, 0) - ei
        else:
            rank = torch.zeros((), dtype=torch.int64)
        keep |= eq & (rank >= lo) & (rank < hi)
    return keep


def rescale_stats(xs, base, plan, norm):
    n = _n(xs, base)
    K = len(xs)
    out = torch.zeros((K, 2), dtype=torch.float64)
    for t in range(K):
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            d = _delta(xs, base, t, s, e).float().abs()
            dm = d * keep_mask(_delta(xs, base, t, s, e), t, s, plan)
            if norm == "l1":
                out[t, 0] += d.sum(dtype=torch.float64)
                out[t, 1] += dm.sum(dtype=torch.float64)
            elif norm == "l2":
                out[t, 0] += d.double().square().sum()
                out[t, 1] += dm.double().square().sum()
            else:
                out[t, 0] = max(out[t, 0], d.max().double() if d.numel() else 0.0)
                out[t, 1] = max(out[t, 1], dm.max().double() if dm.numel() else 0.0)
    return out.to(first(xs, base).device)


def merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only=False,
          round16=None):
    """Chunked mergekit arithmetic. ``weights``/``scales`` are (K,) float32 (weights pre-rounded)."""
    ref = first(xs, base)
    n, K, dtype = ref.numel(), len(xs), ref.dtype
    flags = torch.zeros(K + 1, dtype=torch.int32)
    of = _flat(out)
    w = weights.to(dtype)
    sc = scales.tolist()
    wdt = torch.float32 if dtype == torch.float16 and plan.mode == MODE_RANDOM else dtype
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        if base is not None and not bool(torch.isfinite(_flat(base)[s:e]).all()):
            flags[K] = 1
        acc = None
        for t in range(K):
            x = _flat(xs[t])[s:e]
            if not bool(torch.isfinite(x).all()):
                flags[t] = 1
            d = x - _flat(base)[s:e] if base is not None else x
            if plan.mode:
                d = (d.to(wdt) * keep_mask(d, t, s, plan).to(wdt))
                if sc[t] != 1.0:
                    d = d * torch.tensor(sc[t], dtype=wdt)
                d = d.to(dtype)
            if sparsify_only:
                of[s:e] = d
                break
            wd = d * w[t]
            if acc is None:
                acc = torch.empty((K, e - s), dtype=dtype)
            acc[t] = wd
        if sparsify_only:
            continue
        if K == 0:
            of[s:e] = _flat(base)[s:e]
            continue
        if consensus:
            sign = acc.sign()
            majority = (acc.sum(dim=0) >= 0).to(dtype) * 2 - 1
            mask = sign == majority
            mixed = (acc * mask).sum(dim=0)
            div = (w.unsqueeze(1) * mask).sum(dim=0)
            div[div == 0] = 1
        else:
            mixed = acc.sum(dim=0)
            div = torch.tensor(divisor_nc, dtype=dtype)
        if normalize:
            mixed = mixed / div
        if lam != 1:
            mixed = mixed * lam
        of[s:e] = _flat(base)[s:e] + mixed
    return flags
