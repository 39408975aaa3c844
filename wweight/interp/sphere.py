"""Fast paths of mergekit's spherical methods: ``nuslerp``, ``multislerp``, ``karcher``.

Same functions, arguments and bits as :mod:`wweight.reference.interp` (mergekit 0.1.5). Profiled
first (torch.profiler, 16M fp32 elements, K = 2, one thread, 2-core CI VM): in mergekit's code the
full-size *elementwise* ops are ~98 % of the time (nuslerp: 23 mul/add/div/sub/where calls, 660
ms; multislerp: 28 calls incl. the stack, 1.08 s; each one writes a fresh full-size tensor, so it
also pays the page faults of a new allocation), the reductions (norms, dots) ~1-3 %. So:

* every reduction whose rounding defines the result is the *same torch call on the same data*
  (the full task vectors, the full products), because reproducing torch's cascade-sum order by
  chunks is not possible in general (and it changes with the thread count);
* everything elementwise is mergekit's op sequence, each op with its operands in mergekit's
  order and dtypes, on ``CHUNK``-element pieces into small reused buffers (the piece stays in
  cache between ops), writing each full-size result once: one pass where mergekit makes 4-10;
* ``torch.where(c, x, y)`` over a row's coefficient computes only the branch it selects (the
  selected values are the same bits).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..reference import interp as ref

#: elements per chunk of the elementwise passes on one thread (as :mod:`.fast`)
CHUNK = 1 << 17


def chunk() -> int:
    """Elements per piece: CHUNK on one torch thread, 8x CHUNK on several. Each torch op on a piece
    is an OpenMP parallel region when torch runs several threads, and each region waits for all of
    them: on a loaded machine that wait dominates (measured: ``wweight merge`` slerp on the 125M
    zoo, 2-core VM at load ~9, took 49 s wall / 47 s CPU with 2 threads and 128K pieces, 4.9 s with
    one thread; on the idle VM 128K and 1M pieces are within noise, 1.6-1.9 s in-process). The
    result does not depend on the piece size (every chunked op is elementwise or reduces over the
    K inputs of each element)."""
    return CHUNK if torch.get_num_threads() == 1 else CHUNK * 8


#: 16-bit tensors up to this many elements take mergekit's own op sequence (the reference) in karcher:
#: there a full-size temporary is 2 MB, which the allocator reuses without page faults, so chunking
#: saves no memory traffic and only adds torch calls (measured, 1 thread, bf16 1M elements, K = 2 / 4:
#: 0.88x / 0.89x mergekit chunked, 0.98x / 0.99x with the reference; the rest of the gap is
#: merge_tensors' input checks). model_stock and nearswap gained nothing from the same switch.
SMALL_16BIT = 1 << 20


def small_16bit(x: torch.Tensor) -> bool:
    return x.element_size() == 2 and x.numel() <= SMALL_16BIT


def _pieces(n_rows: int, row_len: int):
    """(row slice, flat element slice) pieces of about CHUNK elements: whole rows when a row is
    short, else pieces of the single row (``n_rows == 1``, the flattened case)."""
    CHUNK = chunk()
    if n_rows == 1:
        for s in range(0, row_len, CHUNK):
            yield slice(0, 1), slice(s, min(s + CHUNK, row_len))
        return
    step = max(1, CHUNK // row_len)
    for r in range(0, n_rows, step):
        e = min(r + step, n_rows)
        yield slice(r, e), slice(r * row_len, e * row_len)


def nuslerp(base, tensors: Sequence[torch.Tensor], weights: Sequence[float], nuslerp_row_wise: bool = False,
            nuslerp_flatten: bool = True) -> torch.Tensor:
    """mergekit ``nuslerp_merge_method`` (exactly two tensors, optional base) in three passes over
    memory after the task vectors: the normalised product (for the cosines), then the blend.
    Row-wise non-flattened merges (a transposed reduction) and empty / 0-d tensors without
    flattening take the reference."""
    CHUNK = chunk()
    x0, x1 = tensors
    if x0.numel() == 0 or (not nuslerp_flatten and (nuslerp_row_wise or x0.dim() == 0)):
        return ref.nuslerp(base, tensors, weights, nuslerp_row_wise, nuslerp_flatten)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    shape = x0.shape
    if base is not None:   # mergekit's tensors[i] - base, kept whole: their norms reduce over full rows
        v0, v1 = torch.sub(x0, base), torch.sub(x1, base)
    else:
        v0, v1 = x0.contiguous(), x1.contiguous()
    if nuslerp_flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    D = v0.shape[-1]
    R = v0.numel() // D
    # _normalize: x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7), on mergekit's views
    n0 = torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7).reshape(R, 1)
    n1 = torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7).reshape(R, 1)
    f0, f1 = v0.reshape(-1), v1.reshape(-1)
    out = torch.empty(v0.numel(), dtype=v0.dtype, device=v0.device)
    m = min(CHUNK, out.numel()) if R == 1 else max(1, CHUNK // D) * D
    bx = torch.empty(m, dtype=v0.dtype, device=v0.device)
    by = torch.empty_like(bx)
    bz = torch.empty_like(bx)

    def views(rs, es):
        k = es.stop - es.start
        shp = (k,) if R == 1 else (rs.stop - rs.start, D)
        return bx[:k].view(shp), by[:k].view(shp), shp

    prod = out  # v0_u * v1_u lands in `out` (overwritten by the blend below) for one torch.sum over it
    for rs, es in _pieces(R, D):
        px, py, shp = views(rs, es)
        c0 = n0 if R == 1 else n0[rs]
        c1 = n1 if R == 1 else n1[rs]
        torch.div(f0[es].view(shp), c0.view(-1) if R == 1 else c0, out=px)
        torch.div(f1[es].view(shp), c1.view(-1) if R == 1 else c1, out=py)
        torch.mul(px, py, out=prod[es].view(shp))
    cos_theta = torch.sum(prod.view(v0.shape), dim=-1, keepdim=True).clamp(-1, 1)
    eps = 1e-8
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    sa, sb = torch.sin((1 - t) * theta), torch.sin(t * theta)
    cols = [c.reshape(R, 1) for c in (colinear, sa, sb, sin_theta)]
    fb = base.reshape(-1) if base is not None else None
    for rs, es in _pieces(R, D):
        px, py, shp = views(rs, es)
        col, a, b, st = (c.view(-1) if R == 1 else c[rs] for c in cols)
        x, y = f0[es].view(shp), f1[es].view(shp)
        o = out[es].view(shp)
        lin_all, lin_any = bool(col.all()), bool(col.any())
        if not lin_all:   # (sin((1-t)θ) * v0 + sin(tθ) * v1) / sin θ
            torch.mul(a, x, out=px)
            torch.mul(b, y, out=py)
            torch.add(px, py, out=px)
            torch.div(px, st, out=px)
        if lin_any:       # (1 - t) * v0 + t * v1
            dst = o if lin_all else bz[:px.numel()].view(shp)
            torch.mul(x, 1 - t, out=py)
            torch.mul(y, t, out=dst)
            torch.add(py, dst, out=dst)
            if not lin_all:
                torch.where(col, dst, px, out=px)
        src = o if lin_all else px
        if fb is not None:
            torch.add(fb[es].view(shp), src, out=o)
        elif src is not o:
            o.copy_(src)
    return out.view(shape)


def multislerp(base, tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize_weights: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """mergekit ``multislerp``: the stacked task vectors (stack and ``-= base`` in one pass), the
    unit vectors in place, the K x N product for the dots, and three chunked passes (mean, tangent,
    result). Its degenerate case (weighted mean of norm < eps) takes the reference (which raises
    or returns mergekit's K = 2 blend)."""
    CHUNK = chunk()
    if len(tensors) == 1:
        return tensors[0].clone()
    K, shape = len(tensors), tensors[0].shape
    N = tensors[0].numel()
    dt, dev = tensors[0].dtype, tensors[0].device
    T = torch.empty((K, N), dtype=dt, device=dev)
    fb = base.reshape(-1) if base is not None else None
    for k, x in enumerate(tensors):
        if fb is not None:
            torch.sub(x.reshape(-1), fb, out=T[k])
        else:
            T[k].copy_(x.reshape(-1))
    w = torch.tensor(list(weights), dtype=dt, device=dev)
    if normalize_weights:
        w = w / w.sum()
    wv = w.view(-1, 1)
    norms = torch.norm(T, dim=-1, keepdim=True)
    T.div_(norms + eps)   # T is now mergekit's unit_tensors (same bits as T / (norms + eps))
    U = T
    mean = torch.empty(N, dtype=dt, device=dev)
    S = torch.empty((K, min(CHUNK, N)), dtype=dt, device=dev)
    for s in range(0, N, CHUNK):
        n = min(CHUNK, N - s)
        torch.mul(U[:, s:s + n], wv, out=S[:, :n])
        torch.sum(S[:, :n], dim=0, out=mean[s:s + n])
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        return ref.multislerp(base, tensors, weights, normalize_weights, eps)
    torch.div(mean, mean_norm, out=mean)
    P = torch.empty_like(U)
    for s in range(0, N, CHUNK):
        n = min(CHUNK, N - s)
        torch.mul(U[:, s:s + n], mean[s:s + n], out=P[:, s:s + n])
    dots = P.sum(-1, keepdim=True)
    del P
    tr = torch.empty_like(mean)
    for s in range(0, N, CHUNK):   # tangent_result = ((unit - dots * mean) * weights).sum(0)
        n = min(CHUNK, N - s)
        sc = S[:, :n]
        torch.mul(dots, mean[s:s + n], out=sc)
        torch.sub(U[:, s:s + n], sc, out=sc)
        torch.mul(sc, wv, out=sc)
        torch.sum(sc, dim=0, out=tr[s:s + n])
    tn = torch.norm(tr) + eps
    cs, sn = torch.cos(tn), torch.sin(tn) / tn
    avg = (norms.squeeze(-1) * w).sum()
    out = torch.empty(N, dtype=dt, device=dev)
    for s in range(0, N, CHUNK):   # (mean * cos + tangent_result * (sin / tn)) * avg_norm (+ base)
        n = min(CHUNK, N - s)
        a, b, o = S[0, :n], S[1, :n], out[s:s + n]
        torch.mul(mean[s:s + n], cs, out=a)
        torch.mul(tr[s:s + n], sn, out=b)
        torch.add(a, b, out=a)
        if fb is not None:
            torch.mul(a, avg, out=a)
            torch.add(a, fb[s:s + n], out=o)
        else:
            torch.mul(a, avg, out=o)
    return out.view(shape)


def karcher(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's Karcher mean (equal weights). Per iteration: K dots (torch.dot on the full
    vectors, as mergekit), one chunked pass for the tangent (all K terms summed in mergekit's order
    while the piece is in cache), its norm, one chunked pass for the new mean, its norm, one
    in-place division; mergekit writes ~4 full-size temporaries per model plus 5 per iteration."""
    CHUNK = chunk()
    out_dtype = tensors[0].dtype
    if len(tensors) == 1:
        return tensors[0].clone()
    if tensors[0].dim() == 0 or small_16bit(tensors[0]):   # 0-d: mergekit's float32 0-d promotions,
        return ref.karcher(tensors, max_iter, tol)            # which a flat view would change
    K = len(tensors)
    alphas = [1.0 / K] * K
    dtype = ref._compute(out_dtype)
    N = tensors[0].numel()
    wide = torch.empty(N, dtype=dtype, device=tensors[0].device) if out_dtype != dtype else None

    def norm(x):
        """mergekit's ``vector_norm(x.to(dtype))``: the same reduction over the same float32 copy,
        written into one reused buffer (a fresh 2N-byte copy per norm costs its page faults)."""
        if wide is None:
            return torch.linalg.vector_norm(x)
        wf, xf = wide, x.reshape(-1)
        for s in range(0, N, CHUNK):
            wf[s:s + CHUNK].copy_(xf[s:s + CHUNK])
        return torch.linalg.vector_norm(wf.view(x.shape))

    norms, units = [], []
    for x in tensors:
        nrm = norm(x)
        norms.append(nrm)
        units.append(torch.zeros_like(x) if nrm.item() == 0.0 else (x / nrm).to(x.dtype))
    valid = [i for i, nrm in enumerate(norms) if nrm.item() > tol]
    if not valid:
        return ref.karcher(tensors, max_iter, tol)
    asum = sum(alphas[i] for i in valid)
    walphas = [alphas[i] / asum for i in valid]
    vunits = [units[i].reshape(-1) for i in valid]
    mean = torch.empty_like(vunits[0])
    buf = torch.empty(min(CHUNK, N), dtype=mean.dtype, device=mean.device)
    acc = torch.empty_like(buf)
    for s in range(0, N, CHUNK):   # mean = zeros; mean += alpha * unit, per piece
        n = min(CHUNK, N - s)
        mc = mean[s:s + n]
        mc.zero_()
        for a, u in zip(walphas, vunits):
            torch.mul(u[s:s + n], a, out=buf[:n])
            mc += buf[:n]
    mean_norm = norm(mean)
    if mean_norm.item() < tol:
        mean = vunits[0].clone()
    else:
        torch.div(mean, mean_norm, out=mean)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        terms = []
        for a, u in zip(walphas, vunits):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            terms.append((a * (theta / torch.sin(theta)), dot, u))
        for s in range(0, N, CHUNK):
            n = min(CHUNK, N - s)
            b, tg, mc = buf[:n], tangent[s:s + n], mean[s:s + n]
            tg.zero_()
            for c, dot, u in terms:   # tangent += c * (unit - dot * mean), mergekit's operand order
                torch.mul(dot, mc, out=b)
                torch.sub(u[s:s + n], b, out=b)
                torch.mul(c, b, out=b)
                tg += b
        tn = norm(tangent)
        if tn.item() < tol:
            break
        sin_tn, cos_tn = torch.sin(tn), torch.cos(tn)
        for s in range(0, N, CHUNK):   # mean = cos(tn) * mean + sin(tn) * (tangent / tn), in place
            n = min(CHUNK, N - s)
            b, c, mc = buf[:n], acc[:n], mean[s:s + n]
            torch.div(tangent[s:s + n], tn, out=b)
            # sin(tn) * b, not b.mul_(sin(tn)): with a float32 0-d operand and 16-bit b the two
            # orders round differently in torch 2.13 (the 0-d tensor first is what mergekit writes)
            torch.mul(sin_tn, b, out=b)
            torch.mul(cos_tn, mc, out=c)
            torch.add(c, b, out=mc)
        unit_norm = norm(mean)
        if unit_norm.item() > tol:
            for s in range(0, N, CHUNK):
                torch.div(mean[s:s + CHUNK], unit_norm, out=mean[s:s + CHUNK])
    scale = sum(a * nrm for a, nrm in zip(alphas, norms))
    if mean.data_ptr() == vunits[0].data_ptr():
        mean = mean.clone()
    torch.mul(scale, mean, out=mean)   # (scale * mean), in place: a fresh tensor, not an input
    return mean.view(tensors[0].shape)
