"""The default path of the ``interp`` family: mergekit's numbers with fewer passes over memory.

Same function names and arguments as :mod:`wweight.reference.interp`, and the same bits (the
tests compare both with mergekit). How, per method:

* elementwise methods (``nearswap``, ``ram``, ``ramplus_tl``, and slerp's final blend) run
  mergekit's exact op sequence on cache-sized chunks into preallocated buffers: each element sees
  the same roundings, but the K task vectors and a dozen full-size temporaries are never
  materialised (mergekit allocates ~10 tensors of the input's size for nearswap);
* reductions whose rounding defines the result (slerp's norms and dot over mergekit's 1M-element
  chunks, SCE's variance and energy weights, RAM+'s counts) are the same torch reductions;
* SCE's top-k is a threshold from :func:`wweight.kth_largest_abs` (a radix select) instead of
  ``torch.topk``; elements tied at the cut are kept by lowest flat index (mergekit's topk keeps
  an unspecified subset of them: the one documented difference).

* ``model_stock`` is mergekit's ops with each norm computed once (mergekit: once per pair).

* ``arcee_fusion``'s three quantiles are order statistics by radix selection (``kth_largest_abs``;
  a multi-select where an importance can be negative), not a full sort (the same values).
* ``nuslerp``, ``multislerp``, ``karcher``: :mod:`.sphere` (mergekit's reductions on the same data,
  its elementwise ops chunked).

``passthrough`` is the reference: a copy (``scale`` None) or one multiply.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..reference import interp as ref
import torch.nn.functional as F

from ..reference.interp import passthrough  # noqa: F401
from .sphere import chunk as _chunk
from .sphere import karcher, multislerp, nuslerp  # noqa: F401

#: elements per chunk of the elementwise passes (K inputs x CHUNK / K; fastest of 32K..2M measured on
#: the 2-core CI VM: few enough torch calls, buffers still in cache)
CHUNK = 1 << 17


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's ``weight * b + (1 - weight) * a`` with ``weight = clamp(t / max(|a - b|, 1e-6), 0, 1)``;
    ``t / x`` is torch's ``x.reciprocal() * t`` (Tensor.__rtruediv__), kept as such."""
    CHUNK = _chunk()
    a, b = _flat(base), _flat(other)
    out = torch.empty_like(a)
    w = torch.empty(min(CHUNK, a.numel()), dtype=a.dtype, device=a.device)
    wb = torch.empty_like(w)
    for s in range(0, a.numel(), CHUNK):
        x, y = a[s:s + CHUNK], b[s:s + CHUNK]
        n = x.numel()
        ww, pb = w[:n], wb[:n]
        torch.sub(x, y, out=ww)
        ww.abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(min=0, max=1)
        torch.mul(ww, y, out=pb)                    # weight * b
        torch.sub(1, ww, out=ww).mul_(x)            # (1 - weight) * a
        torch.add(pb, ww, out=out[s:s + n])
    return out.view(base.shape)


def _ram_chunks(base: torch.Tensor, tensors: Sequence[torch.Tensor]):
    """(slice, tv (K, n) task vectors of the chunk, base chunk) over chunks of CHUNK / K columns."""
    CHUNK = _chunk()
    b = _flat(base)
    xs = [_flat(t) for t in tensors]
    K = len(xs)
    step = max(1, CHUNK // K)
    tv = torch.empty((K, min(step, b.numel())), dtype=b.dtype, device=b.device)
    for s in range(0, b.numel(), step):
        n = min(step, b.numel() - s)
        v = tv[:, :n]
        for k, x in enumerate(xs):
            torch.sub(x[s:s + n], b[s:s + n], out=v[k])
        yield slice(s, s + n), v, b[s:s + n]


def _ram_masks(tv: torch.Tensor, epsilon: float):
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return nonzero, counts, counts > 1, counts == 1


def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit's RAM, chunk by chunk (each element's terms and K-sum as mergekit's)."""
    out = torch.empty(base.numel(), dtype=base.dtype, device=base.device)
    for sl, tv, b in _ram_chunks(base, tensors):
        nonzero, counts, overlap, unique = _ram_masks(tv, epsilon)
        z = tv * nonzero
        merged = ((z * unique) + (z * overlap / counts.clamp(min=1))).sum(dim=0)
        torch.add(b, merged, out=out[sl])
    return out.view(base.shape)


def ramplus_tl(base: torch.Tensor, tensors: Sequence[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit's RAM+ (tensor-local): pass 1 counts each model's shared / unique entries (exact
    integer sums), pass 2 is RAM with the unique entries scaled by ``lambda_`` (float32, so the sum
    is float32 for 16-bit inputs, as in mergekit, and rounded once to the input dtype)."""
    K = len(tensors)
    shared = torch.zeros(K, dtype=torch.int64, device=base.device)
    uniq = torch.zeros_like(shared)
    for _, tv, _ in _ram_chunks(base, tensors):
        nonzero, _, overlap, unique = _ram_masks(tv, epsilon)
        shared += (nonzero & overlap).sum(dim=1)
        uniq += (nonzero & unique).sum(dim=1)
    rho = shared / uniq.clamp(min=epsilon)
    lambda_ = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    out = torch.empty(base.numel(), dtype=base.dtype, device=base.device)
    for sl, tv, b in _ram_chunks(base, tensors):
        nonzero, counts, overlap, unique = _ram_masks(tv, epsilon)
        z = tv * nonzero
        merged = ((z * unique * lambda_) + (z * overlap / counts.clamp(min=1))).sum(dim=0)
        out[sl] = b + merged
    return out.view(base.shape)


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
                       eps: float = 1e-8):
    """slerp's (coef_a, coef_b), (1, 1) tensors in mergekit's compute dtype on the inputs' device:
    mergekit's norms and dot reduced as it reduces them (per 1M-element chunk, then over the chunks),
    without its per-chunk temporaries, then its ``where`` / ``acos`` / ``sin``. Shared by the blend
    below and the Triton blend kernel (wweight/backends/triton/interp.py)."""
    dtype = ref._compute(v0.dtype)
    a, b = _flat(v0).view(1, -1), _flat(v1).view(1, -1)
    tt = torch.tensor([t], dtype=dtype, device=a.device).reshape(-1, 1)
    n, big = a.shape[1], ref._CHUNK_ELEMENTS
    convert = a.dtype != dtype
    bx = torch.empty((1, min(big, n)), dtype=dtype, device=a.device)
    by = torch.empty_like(bx)

    def chunk(src, s, buf):
        x = src[:, s:s + big]
        if not convert:
            return x
        buf = buf[:, :x.shape[1]]
        buf.copy_(x)
        return buf

    na, nb = [], []
    for s in range(0, n, big):
        na.append(torch.linalg.vector_norm(chunk(a, s, bx), dim=1, keepdim=True))
        nb.append(torch.linalg.vector_norm(chunk(b, s, by), dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(na), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(nb), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dots = []
    for s in range(0, n, big):
        x = a[:, s:s + big]
        m = x.shape[1]
        px, py = bx[:, :m], by[:, :m]
        torch.div(x, norm_a, out=px) if not convert else px.copy_(x).div_(norm_a)
        y = b[:, s:s + big]
        torch.div(y, norm_b, out=py) if not convert else py.copy_(y).div_(norm_b)
        dots.append(px.mul_(py).sum(dim=1, keepdim=True))
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """mergekit's slerp: norms and dot as mergekit reduces them (per 1M-element chunk, then over the
    chunks), without its per-chunk temporaries; the blend ``coef_a * x + coef_b * y`` in CHUNK pieces."""
    CHUNK = _chunk()
    if v0.numel() == 0:
        return ref.slerp(t, v0, v1, dot_threshold, eps)
    coef_a, coef_b = slerp_coefficients(t, v0, v1, dot_threshold, eps)
    a, b = _flat(v0).view(1, -1), _flat(v1).view(1, -1)
    n, dtype = a.shape[1], coef_a.dtype
    out = torch.empty_like(a)
    pa = torch.empty((1, min(CHUNK, n)), dtype=dtype, device=a.device)
    pb = torch.empty_like(pa)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        torch.mul(coef_a, a[:, s:s + m], out=pa[:, :m])
        torch.mul(coef_b, b[:, s:s + m], out=pb[:, :m])
        torch.add(pa[:, :m], pb[:, :m], out=out[:, s:s + m])
    return out.view(v0.shape)


def _var0(tvs: torch.Tensor) -> torch.Tensor:
    """``torch.var(tvs, dim=0, unbiased=False)`` with its exact bits, 2-5x faster on CPU.

    torch's CPU kernel is a scalar Welford reduction in float64 (ATen ``WelfordOps<scalar_t,
    double>``: n += 1; delta = x - mean; mean += delta / n; m2 += delta * (x - mean); var = m2 / n,
    cast to the input dtype), sequential over dim 0 for each output. The same float64 steps,
    vectorised over the other elements in CHUNK pieces, give the same IEEE results (tested
    against torch.var for fp32/bf16/fp16, K = 1..8). Other devices call torch.var itself."""
    CHUNK = _chunk()
    if tvs.device.type != "cpu" or tvs.dim() == 1:
        return torch.var(tvs, dim=0, unbiased=False)
    K = tvs.shape[0]
    flat = tvs.reshape(K, -1)
    out = torch.empty(flat.shape[1], dtype=tvs.dtype, device=tvs.device)
    for s in range(0, flat.shape[1], CHUNK):
        x = flat[:, s:s + CHUNK].double()
        mean = torch.zeros_like(x[0])
        m2 = torch.zeros_like(x[0])
        for k in range(K):
            d = x[k] - mean
            mean = mean + d / (k + 1)
            m2 = m2 + d * (x[k] - mean)
        out[s:s + CHUNK] = m2 / K
    return out.view(tvs.shape[1:])


def sce_mask(tvs: torch.Tensor, density: float, mask_dtype: torch.dtype) -> torch.Tensor:
    """mergekit's variance top-k mask with an exact threshold (radix select, no sort): the
    ``int(nonzero * density)`` largest ``var`` entries, ties at the cut by lowest flat index."""
    from ..sparse.ops import kth_largest_abs

    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=mask_dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=mask_dtype)
    var = _var0(tvs)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var, dtype=mask_dtype)
    flat = var.view(-1)
    thr = kth_largest_abs(flat, k) if flat.dtype != torch.float64 else torch.topk(flat.abs(), k).values[-1]
    keep = flat.abs() > thr
    need = k - int(keep.sum())
    if need > 0:   # the first `need` elements equal to the threshold, in flat order
        keep[torch.nonzero(flat.abs() == thr).view(-1)[:need]] = True
    return keep.view(var.shape).to(mask_dtype)


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """mergekit's SCE: variance top-k (above), TIES sign election, energy-weighted mean; the
    reductions (var, weights, K-sums) are mergekit's torch ops."""
    mask_dtype = base.dtype
    tvs = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        tvs.mul_(sce_mask(tvs, select_topk, mask_dtype).unsqueeze(0))
    erase = ref._sign_consensus(tvs, mask_dtype)
    w = ref.sce_weight(tvs)
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    merged = (tvs * ew).sum(dim=0)
    return base + merged / torch.sum(ew, dim=0).clamp(min=1e-6)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """mergekit's Model Stock with each task vector's norm computed once (mergekit: once per pair)."""
    w_0, ws = base, list(tensors)
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    norms = [torch.norm(o, dim=-1) for o in offsets]
    cos = []
    for i, a in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            cos.append(((a * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    den = 1 + (count - 1) * cos_theta
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    (count * cos_theta) / torch.where(singular, torch.ones_like(den), den))
    average = sum(ws) / count
    if average.shape == torch.broadcast_shapes(average.shape, t.shape):
        torch.mul(t, average, out=average)   # t * average, in place (operand order kept: see karcher)
    else:
        average = t * average
    rest = (1 - t) * w_0
    average = average.add_(rest) if average.shape == rest.shape else average + rest
    return average.reshape(base.shape)


def _quantiles(flat: torch.Tensor, nonneg: bool):
    """The reference's ``sorted(flat)[q * (n - 1)]`` for q = 0.25, 0.5, 0.75, exactly, without a sort.

    Non-negative values (every importance when all KL terms are >= 0: it is |delta| * KL) are their
    own magnitudes, so each is one radix select (:func:`wweight.kth_largest_abs`, the (n - pos)-th
    largest; 3 passes over memory each; 3x faster than ``numpy.partition`` at 16M elements on the CI
    VM). Otherwise one multi-select (``numpy.partition``; ``torch.kthvalue`` off the CPU). A -0.0
    returned as +0.0 changes no comparison, so the mask is the same."""
    pos = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long().tolist()
    n = flat.numel()
    if nonneg and flat.dtype != torch.float64:
        from ..sparse.ops import kth_largest_abs

        return [kth_largest_abs(flat, n - i) for i in pos]
    if flat.device.type == "cpu":
        import numpy as np

        # 16-bit values are exact in float32, so the selected values are the same
        host = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        part = np.partition(host.numpy(), pos)
        return [torch.tensor(part[i]).to(flat.dtype) for i in pos]
    return [torch.kthvalue(flat, i + 1).values for i in pos]


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit's Arcee Fusion over all elements (the reference's exact quantiles, see there).

    The softmaxes, the KL sums and the element order of every op are mergekit's; the elementwise
    steps run in place or on CHUNK pieces (mergekit allocates ~12 full-size temporaries), the
    result lands in a freed softmax buffer, and the quantiles are selections (:func:`_quantiles`)."""
    CHUNK = _chunk()
    if base.dim() == 0 or base.numel() == 0:
        return ref.arcee_fusion(base, other)
    D = torch.sub(other, base)                 # other - base: |.| for importance, then the blend
    p = F.softmax(other, dim=-1)
    q = F.softmax(base, dim=-1)
    fp, fq, fd = p.view(-1), q.view(-1), D.view(-1)
    N = fd.numel()
    for s in range(0, N, CHUNK):               # p + 1e-8, q + 1e-8, p * log(p / q), piece by piece
        pc, qc = fp[s:s + CHUNK], fq[s:s + CHUNK]
        pc.add_(1e-8)
        qc.add_(1e-8)
        torch.div(pc, qc, out=qc)
        qc.log_()
        torch.mul(pc, qc, out=qc)
    kl = torch.sum(q, dim=-1, keepdim=True)
    del p
    importance = torch.abs(D)
    importance.mul_(kl)                        # diff * kl (kl is (..., 1), same dtype: same bits)
    q1, median, q3 = _quantiles(importance.view(-1), bool((kl >= 0).all()))
    threshold = median + 1.5 * (q3 - q1)
    out, fi, fb = fq, importance.view(-1), base.reshape(-1)
    m = torch.empty(min(CHUNK, N), dtype=torch.bool, device=base.device)
    mf = torch.empty(m.shape, dtype=torch.float32, device=base.device)
    wide = torch.empty_like(mf) if base.dtype != torch.float32 else None
    for s in range(0, N, CHUNK):   # base + (other - base) * (importance >= threshold).float()
        n = min(CHUNK, N - s)
        torch.ge(fi[s:s + n], threshold, out=m[:n])
        mf[:n].copy_(m[:n])
        o = out[s:s + n]
        if wide is None:
            torch.mul(fd[s:s + n], mf[:n], out=mf[:n])
            torch.add(fb[s:s + n], mf[:n], out=o)
        else:   # float32 (the mask promotes), rounded once to the input dtype
            torch.mul(fd[s:s + n], mf[:n], out=wide[:n])
            torch.add(fb[s:s + n], wide[:n], out=wide[:n])
            o.copy_(wide[:n])
    return out.view(base.shape)
