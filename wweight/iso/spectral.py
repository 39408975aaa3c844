"""The batched spectral merges of the iso family (torch linear algebra; CPU and GPU alike).

Each function takes a batch of same-shape keys, ``(B, T, m, n)`` task vectors (any float dtype),
and returns ``(B, m, n)`` float64 merged deltas; how and why they are computed from Gram-matrix
eigendecompositions is in the docstring of :mod:`wweight.iso`. The definitions they implement
(and the two places where the papers' code had to be made well defined) are
:mod:`wweight.reference.iso`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..methods import ISO_METHODS
from ..reference.iso import iso_cts_split
from . import _lapack, _threads

_LINALG = torch.float64  # Gram matrices, eigendecompositions and the products that use them


def _eigh_desc(g: torch.Tensor, top: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of symmetric ``g`` (..., r, r), eigenvalues descending and clamped >= 0.

    ``top``: only the ``top`` largest eigenpairs are needed (the rest may be omitted). On CPU this
    uses LAPACK's ``syevr`` through SciPy for just those (2-5x faster than the full ``syevd``
    when ``top`` is a small fraction of r, as for TSV-M / Iso-CTS task triplets); on GPU
    ``torch.linalg.eigh`` (cuSOLVER). SciPy's BLAS must be held to one thread (the caller,
    :func:`._threads.per_key`, does; without threadpoolctl torch's eigh is used).
    """
    r = g.shape[-1]
    if g.device.type == "cpu" and g.dtype == torch.float64 and r > 0 and g.numel() > 0 and _threads.scipy_ok():
        import scipy.linalg as sl

        # SciPy's LAPACK: syevr for a few top pairs; syevd for all (15-25% faster than torch's
        # eigh on the CPUs measured)
        k = top if (top is not None and 0 < top < r // 2) else r
        flat = g.reshape(-1, r, r).numpy()
        lam_all = torch.empty(flat.shape[0], k, dtype=g.dtype)
        vec_all = torch.empty(flat.shape[0], r, k, dtype=g.dtype)
        nogil = _lapack.available()   # the same routines without the GIL: keys' eighs overlap
        for i, gi in enumerate(flat):   # written in place: no stacked copy of the eigenvectors
            if k < r:
                lam, vec = (_lapack.syevr_top(gi, k) if nogil else
                            sl.eigh(gi, subset_by_index=[r - k, r - 1], driver="evr", check_finite=False))
            else:
                lam, vec = _lapack.syevd(gi) if nogil else sl.eigh(gi, driver="evd", check_finite=False)
            lam_all[i].numpy()[:] = lam[::-1]
            vec_all[i].numpy()[:] = vec[:, ::-1]
            del vec
        return lam_all.reshape(*g.shape[:-2], k).clamp_min(0), vec_all.reshape(*g.shape[:-2], r, k)
    lam, vec = torch.linalg.eigh(g)
    return lam.flip(-1).clamp_min(0), vec.flip(-1)


def _inv_kept(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))


def _polar(a: torch.Tensor, rtol: float, floor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``U V^T`` of ``a`` (..., m, n), singular values <= rtol * sigma_1 dropped (a partial isometry).

    ``floor`` (...,): a lower bound of sigma_1 used in the threshold, ``rtol * max(sigma_1, floor)``
    (for a block of a larger matrix whose other block has singular values ``floor``).
    """
    m, n = a.shape[-2:]
    if min(m, n) == 0:
        return torch.zeros_like(a)
    if m >= n:  # a = U S V^T, a^T a = V S^2 V^T, U V^T = a V S^-1 V^T
        s2, v = _eigh_desc(a.mT @ a)
    else:
        s2, v = _eigh_desc(a @ a.mT)
    s = s2.sqrt()
    top = s[..., :1] if floor is None else torch.maximum(s[..., :1], floor.unsqueeze(-1))
    w = (v * _inv_kept(s, s > rtol * top).unsqueeze(-2)) @ v.mT
    return a @ w if m >= n else w @ a


def _top_triplets(a: torch.Tensor, p: int, scale: torch.Tensor, rtol: float):
    """Top-``p`` singular triplets of ``a`` (..., m, n): u (..., m, p), s (..., p), vh (..., p, n).

    Triplets with ``s <= rtol * scale`` (scale: (...,)) are zeroed (vectors and value).
    """
    m, n = a.shape[-2:]
    p = min(p, m, n)
    if m <= n:
        s2, u = _eigh_desc(a @ a.mT, p)
        s = s2[..., :p].sqrt()
        u = u[..., :p]
        keep = s > rtol * scale.unsqueeze(-1)
        inv = _inv_kept(s, keep)
        vh = (u * inv.unsqueeze(-2)).mT @ a
        u = u * keep.unsqueeze(-2).to(u.dtype)
    else:
        s2, v = _eigh_desc(a.mT @ a, p)
        s = s2[..., :p].sqrt()
        v = v[..., :p]
        keep = s > rtol * scale.unsqueeze(-1)
        inv = _inv_kept(s, keep)
        u = a @ (v * inv.unsqueeze(-2))
        vh = (v * keep.unsqueeze(-2).to(v.dtype)).mT
    return u, s * keep.to(s.dtype), vh


def _iso_c_batch(msum: torch.Tensor, rtol: float) -> torch.Tensor:
    """msum: (B, m, n) float64 sums of task vectors -> (B, m, n) Iso-C merged deltas."""
    m, n = msum.shape[-2:]
    r = min(m, n)
    if m >= n:
        s2, v = _eigh_desc(msum.mT @ msum)
        s = s2.sqrt()
        keep = s > rtol * s[..., :1]
        w = (v * _inv_kept(s, keep).unsqueeze(-2)) @ v.mT
        q = msum @ w
    else:
        s2, u = _eigh_desc(msum @ msum.mT)
        s = s2.sqrt()
        keep = s > rtol * s[..., :1]
        w = (u * _inv_kept(s, keep).unsqueeze(-2)) @ u.mT
        q = w @ msum
    # mean over all r singular values (the authors' S.mean()), dropped ones as exact zeros
    return q.mul_(((s * keep).sum(-1) / r)[..., None, None])


def _task(d: torch.Tensor, t: int) -> torch.Tensor:
    """Task vector t of every key in the batch, (B, m, n) float64 (one task at a time bounds memory)."""
    return d[:, t].to(_LINALG)


def _sum_and_norms(d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 sum over tasks (B, m, n) and Frobenius norms (B, T) of the task vectors."""
    msum = torch.zeros(d.shape[0], *d.shape[2:], dtype=_LINALG, device=d.device)
    norms = []
    for t in range(d.shape[1]):
        dt = _task(d, t)
        msum += dt
        norms.append(torch.linalg.vector_norm(dt, dim=(-2, -1)))
    return msum, torch.stack(norms, dim=1)


def _iso_cts_batch(d: torch.Tensor, f: float, rtol: float) -> torch.Tensor:
    """d: (B, T, m, n) task vectors (any float dtype) -> (B, m, n) float64 Iso-CTS merged deltas."""
    B, T, m, n = d.shape
    r = min(m, n)
    k, p = iso_cts_split(r, T, f)
    msum, tnorm = _sum_and_norms(d)  # tnorm: scale of the task-triplet threshold

    # common subspace: top-k triplets of M
    if m <= n:
        s2, u_full = _eigh_desc(msum @ msum.mT)  # u_full: complete orthonormal basis of R^m
    else:
        s2, v_full = _eigh_desc(msum.mT @ msum)
    s = s2.sqrt()
    keep_c = s[..., :k] > rtol * s[..., :1]
    inv_c = _inv_kept(s[..., :k], keep_c)
    if m <= n:
        uk = u_full[..., :k] * keep_c.unsqueeze(-2).to(msum.dtype)
        vk = (uk * inv_c.unsqueeze(-2)).mT @ msum
    else:
        vk_cols = v_full[..., :k]
        uk = msum @ (vk_cols * inv_c.unsqueeze(-2))
        vk = (vk_cols * keep_c.unsqueeze(-2).to(msum.dtype)).mT
    sk = s[..., :k] * keep_c.to(s.dtype)
    del msum
    if p == 0:
        return (sk.sum(-1) / r)[..., None, None] * (_polar(uk, rtol) @ _polar(vk, rtol))

    # task-specific triplets of (I - U_k U_k^T) Delta_t, task by task, into their slots
    total_s = sk.sum(-1)
    # I - U_k U_k^T = U_perp U_perp^T when all k common directions are kept: the SVD of the
    # (m-k) x n matrix U_perp^T Delta_t gives the same singular values / right vectors, and the
    # left vectors U_perp @ u (m <= n only: then U of M is a complete basis)
    u_perp = u_full[..., k:] if (m <= n and bool(keep_c.all())) else None
    stack_u = torch.zeros((B, m, r) if u_perp is None else (B, m - k, T * p), dtype=_LINALG, device=d.device)
    stack_v = torch.zeros(B, r, n, dtype=_LINALG, device=d.device)
    for t in range(T):
        dt = _task(d, t)
        if u_perp is not None:
            # ut stays in U_perp coordinates ((m-k) x p): the polar factor below works there
            ut, st, vt = _top_triplets(u_perp.mT @ dt, p, tnorm[:, t], rtol)
        else:
            ut, st, vt = _top_triplets(dt - uk @ (uk.mT @ dt), p, tnorm[:, t], rtol)
        pp = ut.shape[-1]  # < p only for matrices too small to have p triplets: slots stay zero
        stack_u[..., t * p:t * p + pp] = ut
        stack_v[..., t * p:t * p + pp, :] = vt
        total_s += st.sum(-1)
        del dt, ut, vt
    stack_v[..., T * p:, :] = vk
    pv = _polar(stack_v, rtol)
    if u_perp is not None:
        # stack_u = [U_perp X, U_k] with orthonormal U = [U_k, U_perp] (all of M's left vectors):
        # its Gram is blockdiag(X^T X, I_k), so polar(stack_u) = [U_perp polar(X), U_k] -- an
        # (r-k) x (r-k) eigendecomposition instead of r x r. X's threshold uses sigma_1 of the
        # whole stack, max(sigma_1(X), 1).
        px = _polar(stack_u, rtol, floor=torch.ones(B, dtype=_LINALG, device=d.device))
        del stack_u
        merged = u_perp @ (px @ pv[..., :T * p, :]) + uk @ pv[..., T * p:, :]
    else:
        stack_u[..., T * p:] = uk
        merged = _polar(stack_u, rtol) @ pv
    return (total_s / r)[..., None, None] * merged


def _tsv_m_batch(d: torch.Tensor, rtol: float) -> torch.Tensor:
    """d: (B, T, m, n) task vectors (any float dtype) -> (B, m, n) float64 TSV-M merged deltas."""
    B, T, m, n = d.shape
    r = min(m, n)
    p = int(r * (1 / T))  # the authors' int(s.shape[0] * sv_reduction)
    if p == 0:
        return torch.zeros(B, m, n, dtype=_LINALG, device=d.device)
    # the r - T p slots left empty stay zero and drop out of polar(U) diag(S) polar(V)
    stack_u = torch.zeros(B, m, T * p, dtype=_LINALG, device=d.device)
    stack_s = torch.zeros(B, T * p, dtype=_LINALG, device=d.device)
    stack_v = torch.zeros(B, T * p, n, dtype=_LINALG, device=d.device)
    for t in range(T):
        dt = _task(d, t)
        ut, st, vt = _top_triplets(dt, p, torch.linalg.vector_norm(dt, dim=(-2, -1)), rtol)
        stack_u[..., t * p:(t + 1) * p] = ut
        stack_s[..., t * p:(t + 1) * p] = st
        stack_v[..., t * p:(t + 1) * p, :] = vt
        del dt, ut, vt
    return (_polar(stack_u, rtol) * stack_s.unsqueeze(-2)) @ _polar(stack_v, rtol)


def merge_batch(deltas: torch.Tensor, method: str, common_space_fraction: float, rank_rtol: float) -> torch.Tensor:
    """deltas: (B, T, m, n) task vectors (for ``iso_c``: (B, 1, m, n) sums) -> (B, m, n) float64.

    CUDA: the whole batch as batched GEMMs / eigendecompositions. CPU: one key at a time per
    thread (:mod:`._threads`), so the result of a key does not depend on the thread count, the
    batch size or the other keys.
    """
    if method not in ISO_METHODS:
        raise ValueError(f"method must be one of {list(ISO_METHODS)}, got {method!r}")
    if deltas.device.type == "cpu":
        return _threads.per_key(deltas, lambda one: _merge(one, method, common_space_fraction, rank_rtol))
    return _merge(deltas, method, common_space_fraction, rank_rtol)


def _merge(deltas: torch.Tensor, method: str, common_space_fraction: float, rank_rtol: float) -> torch.Tensor:
    if method == "iso_c":
        return _iso_c_batch(deltas.sum(1).to(_LINALG) if deltas.shape[1] > 1 else deltas[:, 0].to(_LINALG),
                            rank_rtol)
    if method == "iso_cts":
        return _iso_cts_batch(deltas, common_space_fraction, rank_rtol)
    if method == "tsv_m":
        return _tsv_m_batch(deltas, rank_rtol)
    raise ValueError(f"method must be one of {list(ISO_METHODS)}, got {method!r}")
