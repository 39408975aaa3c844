"""Dual certificate of optimality for a batch of rectangular assignment problems (in torch, on the device).

The LP of a rectangular assignment (``n <= m`` rows / columns, minimised, ``+inf`` = forbidden pair)::

    min sum_ij c_ij x_ij   s.t.  sum_j x_ij = 1 (every row),  sum_i x_ij <= 1 (every column),  x >= 0

has the dual ``max sum_i u_i + sum_j v_j`` s.t. ``u_i + v_j <= c_ij`` (finite entries) and ``v_j <= 0``.
An assignment ``sigma`` and duals ``(u, v)`` prove each other optimal when the duals are feasible and
complementary slackness holds: ``u_i + v_sigma(i) = c_i,sigma(i)`` and ``v_j = 0`` on unassigned
columns (weak duality; e.g. Burkard, Dell'Amico & Martello, "Assignment Problems", 2009, ch. 4). The
solvers of the backends return such duals (contract in ``wweight/backends/__init__.py``).
"""
from __future__ import annotations

import numpy as np
import torch

_EPS = 2.0 ** -52  # float64 machine epsilon
# per-entry tolerance in units of eps * (C + U + V): a solver's duals carry the rounding of every dual
# update (a column's v changes once per augmentation that reaches it), so a few ulps are not enough;
# 64 keeps optimal answers of n <= 11008 SAP / auction solvers certified (a rejection only costs a
# scipy re-solve) while the bound below stays at ~1e-13 relative per row
TOL_ULPS = 64.0
_CHUNK = 1 << 24  # elements of the (rows, m) blocks formed at a time (128 MiB of float64)


def certify(cost: torch.Tensor, col: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
            _force_torch: bool = False) -> torch.Tensor:
    """Which problems of a batch ``col`` provably solves (up to float64 rounding), from duals ``(u, v)``.

    Args:
        cost: (B, n, m) float64, ``n <= m``, minimised; ``+inf`` entries are forbidden pairs (no NaN /
            ``-inf``: the caller refused them).
        col: (B, n) int64, the column of every row.
        u: (B, n), v: (B, m) float64 duals.

    Returns:
        (B,) bool on ``cost``'s device, True where all of: ``col`` is an injective assignment into
        ``[0, m)`` using finite entries; ``u``, ``v`` are finite; and, with
        ``tol = 64 * eps * (C + U + V)`` per problem (``eps = 2**-52``; with ``r_i`` the smallest finite
        cost of row i, ``C = max |c_ij - r_i|`` over finite entries, ``U = max |u_i - r_i|``, ``V = max |v|``):
        ``((c_ij - r_i) - v_j) - (u_i - r_i) >= -tol`` on every finite entry, ``<= tol`` on the assignment,
        ``v_j <= tol``, and ``v_j >= -tol`` on unassigned columns.

    Bound: a certified ``col`` has ``value(col) - OPT <= 2 * m * tol`` (``(u, v - tol)`` is dual feasible,
    so ``OPT >= sum u + sum v - m tol``, and ``value(col) <= sum u + sum v + m tol``). Row offsets (e.g.
    1e15 + integer costs) cancel exactly (Sterbenz) in ``c_ij - r_i`` and ``u_i - r_i`` before anything
    small is subtracted, so such problems are certified only when optimal to ~1e-13 of their spread:
    a solver whose duals are rounded at the offset's ulp is rejected (and re-solved by scipy), never
    trusted at that ulp.

    Vectorised, no host synchronisation on a device (the caller reads the result once); CPU tensors are
    checked in numpy (same operations). Memory: one float64 block of about 2^24 elements at a time.
    """
    if cost.dim() != 3 or col.dim() != 2 or u.dim() != 2 or v.dim() != 2:
        raise ValueError("certify: cost must be (B, n, m), col and u (B, n), v (B, m)")
    B, n, m = cost.shape
    if col.shape != (B, n) or u.shape != (B, n) or v.shape != (B, m) or n > m:
        raise ValueError(f"certify: shapes cost {tuple(cost.shape)}, col {tuple(col.shape)}, u {tuple(u.shape)}, "
                         f"v {tuple(v.shape)} do not fit (B, n, m) with n <= m")
    if n == 0:
        return torch.ones(B, dtype=torch.bool, device=cost.device)
    if cost.device.type == "cpu" and not _force_torch:
        # numpy on CPU: single-threaded, no per-op thread-pool wake-ups (torch takes ~0.2 s for one
        # 256 x 256 problem on a busy 2-core machine; numpy ~2 ms), same arithmetic
        ok = _certify_np(*(x.detach().to(dt).numpy() for x, dt in
                           ((cost, torch.float64), (col, torch.long), (u, torch.float64), (v, torch.float64))))
        return torch.from_numpy(ok)
    dev = cost.device
    f64 = dict(device=dev, dtype=torch.float64)
    return _certify_torch(cost.detach().to(torch.float64), col.detach().to(device=dev, dtype=torch.long),
                          u.detach().to(**f64), v.detach().to(**f64))


def _certify_torch(c, col, u, v):
    B, n, m = c.shape
    dev = c.device
    inf = float("inf")
    in_range = ((col >= 0) & (col < m)).all(1)
    colc = col.clamp(0, m - 1)
    uses = torch.zeros(B, m, dtype=torch.int32, device=dev).scatter_add_(
        1, colc, torch.ones(B, n, dtype=torch.int32, device=dev))
    ok = in_range & (uses <= 1).all(1) & torch.isfinite(u).all(1) & torch.isfinite(v).all(1)
    uf = torch.where(torch.isfinite(u), u, torch.zeros_like(u))
    vf = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    rows = max(1, _CHUNK // max(1, B * m))
    # row offsets: the certificate is that of c - rmin (the same assignments, every value shifted by
    # sum(rmin)), so the tolerance follows the spread of the costs, not a common offset (1e15 + k)
    rmin = torch.cat([c[:, r0:r0 + rows].amin(2) for r0 in range(0, n, rows)], 1)      # (B, n)
    rmin = rmin.masked_fill(rmin == inf, 0.0)                                         # a row with no finite entry
    ur = uf - rmin
    scale = torch.zeros(B, dtype=torch.float64, device=dev)
    low = []  # per row: min_j (c_ij - r_i) - v_j, +inf entries never the min unless the row has no other
    for r0 in range(0, n, rows):
        t = c[:, r0:r0 + rows] - rmin[:, r0:r0 + rows, None]                          # exact near the offset
        scale = torch.maximum(scale, torch.where(t < inf, t, 0.0).amax(dim=(1, 2)))
        low.append((t.sub_(vf[:, None, :])).amin(2))
    tol = TOL_ULPS * _EPS * (scale + ur.abs().amax(1) + vf.abs().amax(1))            # (B,)
    ok &= (torch.cat(low, 1) - ur >= -tol[:, None]).all(1)
    a_sig = c.gather(2, colc.unsqueeze(2)).squeeze(2) - rmin                          # +inf if forbidden
    ok &= ((a_sig - vf.gather(1, colc)) - ur <= tol[:, None]).all(1)
    ok &= (vf <= tol[:, None]).all(1)
    ok &= ((vf >= -tol[:, None]) | (uses > 0)).all(1)
    return ok


def _certify_np(c, col, u, v):
    """:func:`_certify_torch` in numpy, operation for operation."""
    B, n, m = c.shape
    inf = np.inf
    in_range = ((col >= 0) & (col < m)).all(1)
    colc = np.clip(col, 0, m - 1)
    uses = np.zeros((B, m), dtype=np.int32)
    np.add.at(uses, (np.arange(B)[:, None], colc), 1)
    ok = in_range & (uses <= 1).all(1) & np.isfinite(u).all(1) & np.isfinite(v).all(1)
    uf = np.where(np.isfinite(u), u, 0.0)
    vf = np.where(np.isfinite(v), v, 0.0)
    rows = max(1, _CHUNK // max(1, B * m))
    rmin = np.concatenate([c[:, r0:r0 + rows].min(2) for r0 in range(0, n, rows)], 1)
    rmin[rmin == inf] = 0.0
    ur = uf - rmin
    scale = np.zeros(B)
    low = []
    for r0 in range(0, n, rows):
        t = c[:, r0:r0 + rows] - rmin[:, r0:r0 + rows, None]
        scale = np.maximum(scale, t.max(axis=(1, 2), where=t < inf, initial=0.0))
        t -= vf[:, None, :]
        low.append(t.min(2))
    tol = TOL_ULPS * _EPS * (scale + np.abs(ur).max(1) + np.abs(vf).max(1))
    ok &= (np.concatenate(low, 1) - ur >= -tol[:, None]).all(1)
    a_sig = np.take_along_axis(c, colc[:, :, None], 2)[:, :, 0] - rmin
    ok &= ((a_sig - np.take_along_axis(vf, colc, 1)) - ur <= tol[:, None]).all(1)
    ok &= (vf <= tol[:, None]).all(1)
    ok &= ((vf >= -tol[:, None]) | (uses > 0)).all(1)
    return ok
