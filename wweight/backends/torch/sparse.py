"""Vectorised-torch primitives of the sparse family, backend ``torch`` (the CPU path without the C++
extension, and the fallback on any device). Contract: ``wweight/backends/__init__.py``; chunked so
memory stays at a few chunks however large the tensor, and never holding K full-size deltas.

Rounding follows mergekit's torch code operation by operation (the ops below *are* torch ops in
the input dtype), so results match the reference bit for bit.
"""
from __future__ import annotations

import torch

from ..._ext import device_tensor
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


def _model_keys(xs, base, s, e):
    """(K, e - s) magnitude keys of every model's delta on one chunk (the queries pick their rows on the
    device: reading the query tables back would cost a host sync on a GPU)."""
    return torch.stack([_keys(_delta(xs, base, t, s, e)) for t in range(len(xs))])


def _query_keys(keys, qmodel, q):
    return keys.index_select(0, qmodel[q:q + 1]).squeeze(0)


def _count(idx, nbins):
    """``bincount(idx, minlength=nbins)`` without bincount's host read of ``idx.max()`` on a GPU (and
    faster than bincount on the CPU too)."""
    one = torch.ones((), dtype=torch.int64, device=idx.device)
    return torch.zeros(nbins, dtype=torch.int64, device=idx.device).index_add_(0, idx, one.expand(idx.numel()))


def digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix):
    n = _n(xs, base)
    nb = 1 << nbits
    Q = qmodel.numel()
    out = torch.zeros((Q, nb), dtype=torch.int64, device=qmodel.device)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        keys = _model_keys(xs, base, s, e)
        for q in range(Q):
            key = _query_keys(keys, qmodel, q)
            digit = (key >> shift) & (nb - 1)   # int32: index_add_ takes int32 indices
            if has_prefix:   # keys outside the prefix go to an extra bin, dropped below
                digit = torch.where((key >> high_shift) == (prefix[q] >> high_shift), digit, nb)
            out[q] += _count(digit, nb + 1)[:nb]
    return out


def tie_counts(xs, base, qmodel, qkey):
    n = _n(xs, base)
    nblocks = (n + BLOCK - 1) // BLOCK
    out = torch.zeros((qmodel.numel(), nblocks), dtype=torch.int64, device=qmodel.device)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        keys = _model_keys(xs, base, s, e)
        for q in range(qmodel.numel()):
            eq = (_query_keys(keys, qmodel, q) == qkey[q]).to(torch.int64)
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
    klo, khi, a, b, c, e = plan.kp[t].unbind()   # 0-d device tensors: no host read
    keep = (key > klo) & (key < khi)
    for kk, lo, hi, cut in ((klo, a, b, 0), (khi, c, e, 1)):
        eq = key == kk
        if plan.has_ties:
            ei = eq.to(torch.int64)
            rank = plan.tie_offsets[t, cut, s // BLOCK] + torch.cumsum(ei, 0) - ei
        else:
            rank = torch.zeros((), dtype=torch.int64, device=d.device)
        keep |= eq & (rank >= lo) & (rank < hi)
    return keep


def rescale_stats(xs, base, plan, norm):
    n = _n(xs, base)
    K = len(xs)
    out = torch.zeros((K, 2), dtype=torch.float64, device=first(xs, base).device)
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
            else:   # chunks are never empty
                out[t] = torch.maximum(out[t], torch.stack([d.max(), dm.max()]).double())
    return out


def _flag(flags, i, x):
    flags[i] |= torch.isfinite(x).all().logical_not().to(flags.dtype)


def merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only=False,
          round16=None):
    """Chunked mergekit arithmetic. ``weights``/``scales`` are (K,) float32 (weights pre-rounded)."""
    ref = first(xs, base)
    n, K, dtype = ref.numel(), len(xs), ref.dtype
    dev = ref.device
    flags = torch.zeros(K + 1, dtype=torch.int32, device=dev)   # set on the device: no host read per chunk
    of = _flat(out)
    w = weights.to(dtype)
    wdt = torch.float32 if dtype == torch.float16 and plan.mode == MODE_RANDOM else dtype
    # a device divisor: CUDA divides by a CPU scalar as a multiplication by its reciprocal (other bits)
    div_nc = device_tensor(divisor_nc, dtype, dev)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        if base is not None:
            _flag(flags, K, _flat(base)[s:e])
        acc = None
        for t in range(K):
            x = _flat(xs[t])[s:e]
            _flag(flags, t, x)
            d = x - _flat(base)[s:e] if base is not None else x
            if plan.mode:
                d = (d.to(wdt) * keep_mask(d, t, s, plan).to(wdt))
                d = d * scales[t].to(wdt)   # x * 1 == x: the same numbers as skipping the factor 1
                d = d.to(dtype)
            if sparsify_only:
                of[s:e] = d
                break
            wd = d * w[t]
            if acc is None:
                acc = torch.empty((K, e - s), dtype=dtype, device=dev)
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
            div = div.masked_fill(div == 0, 1)
        else:
            mixed = acc.sum(dim=0)
            div = div_nc
        if normalize:
            mixed = mixed / div
        if lam != 1:
            mixed = mixed * lam
        of[s:e] = _flat(base)[s:e] + mixed
    return flags
