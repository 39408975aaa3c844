"""Backend ``torch`` of the permute family: the epsilon-scaling forward/reverse auction, batched, in torch.

Bertsekas, "The auction algorithm: a distributed relaxation method for the assignment problem" (1988)
for the forward (person) rounds, and Bertsekas & Castanon, "A forward/reverse auction algorithm for
asymmetric assignment problems" (1992) for rectangular problems: n persons (rows) < m objects (columns)
are solved *without padding* (padding with constant rows made the dummy rows bid against each other
one eps at a time: 10k-17k rounds at 256x384).

This module is also the CPU-runnable model of the CUDA kernel ``csrc/lap_auction.cu``: a round here
makes exactly the bids and assignments of a kernel round (same float64 formulas, same packed keys,
same tie-breaks), so CI tests the kernel's algorithm against scipy on CPU tensors.

Algorithm, per problem (benefit ``a = c_min - c``, maximised; ``+inf`` costs are ``-inf`` benefits,
which never win a top-2 and so are never bid on):

* forward round (every unassigned row ``i``): ``v_j = a_ij - p_j``; best ``v1`` at ``j1`` (ties: lowest
  column), second ``v2``; increment ``inc = (v1 - v2, or range if v2 = -inf) + eps``; the key
  ``(bits(inc) & ~0xFFFF) | (0xFFFF - i)`` goes to column ``j1``; the largest key wins (largest
  truncated increment, ties to the lowest row), the column's price rises by the truncated increment
  and its previous owner becomes unassigned. A truncated increment is still >= (1 - 2^-36) * eps, so
  every bid makes progress, and it is <= the full one, so the bidder stays eps-happy.
* after a forward phase (n < m only), reverse rounds: ``lam`` = lowest assigned price; every unassigned
  column ``j`` with ``p_j > lam`` finds its best row ``i`` for ``a_ij - pi_i`` (``beta``; second
  ``omega``). If ``beta - eps <= lam`` it settles at ``p_j = lam``; else it offers ``p' = max(lam,
  omega - eps)``; each row takes the offer of largest gain ``beta - p'`` (key ties: lowest column),
  drops its old column, and ``pi_i = a_ij - p'``. Each won offer raises a profit by >= eps, so this
  ends; at the end eps-CS holds and unassigned prices are <= lam <= assigned prices.
* why that is exact: shifting every price by ``-lam`` and raising the unassigned ones to 0 keeps
  eps-CS and gives the rectangular LP dual (``v_j = -p_j <= 0``, ``v_j = 0`` where unassigned), so the
  assignment is within ``n * eps`` of optimal: optimal on integer benefits when ``eps < 1/n``
  (schedule ends at ``1/(n+1)``). Float costs: from ``eps <= range / (8n)^2`` on, each phase is
  *certified*: the monotone price relaxation ``p_sigma(i) <- a_i,sigma(i) - max_j (a_ij - p_j)``
  (Bellman-Ford on the residual graph; unassigned prices pinned at 0) until every slack is within
  float64 rounding of 0 gives the optimal duals, or fails (the phases go on to ``64 ulp * range``,
  then status 2: the caller re-solves with scipy).
* infeasible (status 1): a row with no finite entry, fewer usable columns than rows, or a price above
  ``P0 + (2n+2)(2 range + eps)`` confirmed by a maximum bipartite matching of the finite pattern.

Contract: ``wweight/backends/__init__.py`` (``lap_solve``; ``solve_square_max`` is the old entry).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

_F64_EPS = float(np.finfo(np.float64).eps)
ROW_BITS = 16                       # low key bits: 0xFFFF - row (or column, in reverse rounds)
MAX_N = 1 << ROW_BITS               # rows (and reverse-round columns) a key can name
_LOW = (1 << ROW_BITS) - 1
THETA = 8.0                          # eps divisor between phases
CHECK_EVERY = 16                     # forward rounds between price-bound checks (host syncs)
# counters of the last runs (read by the benchmark; reset freely)
# (bids / reverse_bids: rows / columns that scanned their row / column; the GPU cost model's bytes)
stats = {"phases": 0, "rounds": 0, "reverse_rounds": 0, "certify_iters": 0, "fallbacks": 0, "bids": 0,
         "reverse_bids": 0}


def pack_key(val: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Key of a positive float64 ``val`` (bid increment / gain) and an index: int64, ordered by the
    value's top 47 bits, then by the lowest index. Same bits as ``lap_key`` in csrc/lap_auction.cu."""
    bits = val.view(torch.int64)
    return (bits & ~_LOW) | (_LOW - idx)


def key_value(key: torch.Tensor) -> torch.Tensor:
    """The truncated float64 value a key carries (``bits & ~0xFFFF``)."""
    return (key & ~_LOW).view(torch.float64)


def _top2(vals: torch.Tensor):
    """Row-wise best (lowest index on ties) and second-best value of (k, L) ``vals``."""
    j1 = vals.argmax(dim=1, keepdim=True)                     # first maximum: lowest index
    v1 = vals.gather(1, j1).squeeze(1)
    v2 = vals.scatter(1, j1, float("-inf")).amax(dim=1) if vals.shape[1] > 1 else torch.full_like(v1, float("-inf"))
    return j1.squeeze(1), v1, v2


def _forward_phase(a, price, eps, cap, bound, max_rounds):
    """One forward phase on P problems a (P, n, m); prices (P, m) updated in place.

    Returns (col (P, n) local column or -1, owner (P, m) local row or -1, status (P,) int32:
    0 done, 2 out of rounds, 3 a price passed ``bound``)."""
    P, n, m = a.shape
    dev = a.device
    a2 = a.view(P * n, m)
    fp = price.view(-1)
    col = torch.full((P * n,), -1, dtype=torch.long, device=dev)
    owner = torch.full((P * m,), -1, dtype=torch.long, device=dev)
    frozen = torch.zeros(P, dtype=torch.bool, device=dev)
    status = torch.zeros(P, dtype=torch.int32, device=dev)
    stats["phases"] += 1
    for rnd in range(max_rounds):
        if rnd % CHECK_EVERY == CHECK_EVERY - 1:
            over = (price.amax(dim=1) > bound) & ~frozen
            if bool(over.any()):
                status[over] = 3
                frozen |= over
        live = col < 0
        live &= ~frozen.repeat_interleave(n)
        rows = live.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        stats["rounds"] += 1
        stats["bids"] += rows.numel()
        b = torch.div(rows, n, rounding_mode="floor")
        vals = a2.index_select(0, rows) - price.index_select(0, b)           # (k, m)
        j1, v1, v2 = _top2(vals)
        d = v1 - v2                                                             # +inf: one finite entry
        inc = torch.where(d == float("inf"), cap[b], d) + eps[b]               # > 0
        key = pack_key(inc, rows - b * n)
        obj = b * m + j1
        best = torch.zeros(P * m, dtype=torch.long, device=dev).scatter_reduce_(0, obj, key, "amax")
        won = best[obj] == key                                                  # one winner per column
        w_obj, w_row, w_key = obj[won], rows[won], key[won]
        prev = owner[w_obj]
        col[prev[prev >= 0]] = -1                                               # outbid rows bid again
        owner[w_obj] = w_row
        col[w_row] = j1[won]
        fp[w_obj] = fp[w_obj] + key_value(w_key)
    else:
        left = (col.view(P, n) < 0).any(dim=1) & ~frozen
        status[left] = 2
    owner = owner.view(P, m)
    owner = torch.where(owner >= 0, owner - torch.arange(P, device=dev).unsqueeze(1) * n, owner)
    return col.view(P, n), owner, status


def _reverse_rounds(a, at, price, col, owner, eps, max_rounds):
    """Reverse rounds of the asymmetric auction on P problems with every row assigned (in place).

    a (P, n, m), at = a transposed (P, m, n) contiguous, price (P, m), col (P, n), owner (P, m).
    Returns ok (P,) bool (False: out of rounds)."""
    P, n, m = a.shape
    dev = a.device
    assigned = owner >= 0
    lam = torch.where(assigned, price, torch.full_like(price, float("inf"))).amin(dim=1)     # (P,)
    pi = a.gather(2, col.unsqueeze(2)).squeeze(2) - price.gather(1, col)                     # (P, n)
    at2 = at.view(P * m, n)
    fp, fo, fc, fpi = price.view(-1), owner.view(-1), col.view(-1), pi.view(-1)
    for _ in range(max_rounds):
        objs = ((fo < 0) & (price > lam.unsqueeze(1)).view(-1)).nonzero().squeeze(1)
        if objs.numel() == 0:
            return torch.ones(P, dtype=torch.bool, device=dev)
        stats["reverse_rounds"] += 1
        stats["reverse_bids"] += objs.numel()
        b = torch.div(objs, m, rounding_mode="floor")
        vals = at2.index_select(0, objs) - pi.index_select(0, b)               # (k, n): a_ij - pi_i
        i1, beta, omega = _top2(vals)
        lb, eb = lam[b], eps[b]
        happy = beta - eb <= lb
        fp[objs[happy]] = lb[happy]                                            # settles unassigned at lam
        bid = ~happy
        objs, b, i1, beta, omega, lb, eb = objs[bid], b[bid], i1[bid], beta[bid], omega[bid], lb[bid], eb[bid]
        pnew = torch.maximum(lb, omega - eb)
        key = pack_key(beta - pnew, objs - b * m)                              # gain >= eps > 0
        person = b * n + i1
        best = torch.zeros(P * n, dtype=torch.long, device=dev).scatter_reduce_(0, person, key, "amax")
        won = best[person] == key
        w_obj, w_person, w_p = objs[won], person[won], pnew[won]
        old = b[won] * m + fc[w_person]
        fo[old] = -1                                                           # old column now unassigned
        fo[w_obj] = w_person - b[won] * n
        fc[w_person] = w_obj - b[won] * m
        fp[w_obj] = w_p
        fpi[w_person] = a.view(P * n, m)[w_person, fc[w_person]] - w_p
    return torch.zeros(P, dtype=torch.bool, device=dev)


def certify(a, col, price, owner, eps, max_iter, sync=True):
    """Optimal rectangular duals for ``col`` (P, n) on benefits a (P, n, m), or a failure.

    Start: assigned prices shifted so the lowest is ``n * eps`` (eps-CS paths dip at most ``n * eps``
    below their start), unassigned prices pinned at 0. Relax (monotone decreasing) until every row's
    slack ``max_j(a_ij - p_j) - (a_i,col - p_col)`` is within float64 rounding of 0: then the prices
    are the greatest optimal dual below the start, >= 0 iff no alternating path improves the
    assignment. Square problems have no pinned column: their duals are shifted to ``min p = 0``.
    ``sync=False`` runs all ``max_iter`` iterations (no host read; the CUDA glue).
    Returns (ok (P,) bool, prices (P, m) >= 0)."""
    P, n, m = a.shape
    assigned = owner >= 0
    lam = torch.where(assigned, price, torch.full_like(price, float("inf"))).amin(dim=1, keepdim=True)
    start = price - lam + (n * eps).unsqueeze(1)
    p = torch.where(assigned, start, torch.zeros_like(price))
    a_sig = a.gather(2, col.unsqueeze(2)).squeeze(2)
    finite = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).abs().amax(dim=(1, 2))
    ok = torch.zeros(P, dtype=torch.bool, device=a.device)
    for _ in range(max_iter):
        stats["certify_iters"] += 1
        pi = (a - p.unsqueeze(1)).amax(dim=2)
        slack = pi - (a_sig - p.gather(1, col))
        tol = 16 * _F64_EPS * (finite + p.abs().amax(dim=1))
        ok = (slack <= tol.unsqueeze(1)).all(dim=1)
        if sync and bool(ok.all()):
            break
        p.scatter_(1, col, torch.minimum(p.gather(1, col), a_sig - pi))
    if n == m:
        p = p - p.amin(dim=1, keepdim=True)
    else:
        ok &= (p >= -tol.unsqueeze(1)).all(dim=1)
    return ok, p.clamp_min(0.0)


def _infeasible(cost: torch.Tensor) -> bool:
    """No finite assignment exists (maximum bipartite matching of the finite pattern, scipy)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    pat = csr_matrix(torch.isfinite(cost).cpu().numpy().astype(np.int8))
    return bool((maximum_bipartite_matching(pat, perm_type="column") < 0).any())


def prepare(cost: torch.Tensor):
    """Shifted benefits ``a = c_min - c`` (max 0, ``-inf`` forbidden) of (B, n, m) costs, and the
    problems (B,) bool that are infeasible at a glance: a row without a finite entry, or fewer
    columns with a finite entry than rows. No host sync."""
    B, n, m = cost.shape
    fin = torch.isfinite(cost)
    c0 = torch.where(fin, cost, torch.full_like(cost, float("inf"))).amin(dim=(1, 2))
    c0 = torch.where(torch.isfinite(c0), c0, torch.zeros_like(c0))
    a = c0.view(B, 1, 1) - cost
    bad = (~fin.any(dim=2)).any(dim=1) | (fin.any(dim=1).sum(dim=1) < n)
    return a, bad


def duals(cost: torch.Tensor, col: torch.Tensor, p: torch.Tensor):
    """(u, v) of the cost LP from certified benefit prices p (P, m): ``v = -p``, ``u_i = c_i,col - v_col``."""
    v = -p
    return cost.gather(2, col.unsqueeze(2)).squeeze(2) - v.gather(1, col), v


def schedule(a: torch.Tensor):
    """Per-problem (eps0, eps_try, eps_floor, cap, integral) of shifted benefits a (B, n, m) (<= 0 finite).

    The CUDA kernel takes these as inputs, so both walk the same eps sequence."""
    B, n, m = a.shape
    fin = torch.isfinite(a)
    af = torch.where(fin, a, torch.zeros_like(a))
    rng = -torch.where(fin, a, torch.full_like(a, float("inf"))).amin(dim=(1, 2))       # max is 0
    rng = torch.where(torch.isfinite(rng) & (rng > 0), rng, torch.ones_like(rng))
    integral = ((af == af.round()).all(dim=2).all(dim=1)) & (rng < 2.0 ** 40)
    eps0 = rng / THETA
    # float costs: certificates from range / (8n)^2 on (range / n^2 failed the first try on 10-40% of
    # random problems n <= 128 here; two phases more: none); the kernel stops at its first try
    eps_try = torch.where(integral, torch.full_like(rng, 1.0 / (n + 1)), rng / (float(n) * n * THETA * THETA))
    eps_floor = torch.where(integral, eps_try, rng * 64 * _F64_EPS)
    return eps0, eps_try, eps_floor, rng.clone(), integral


def next_eps(eps: torch.Tensor, eps_try: torch.Tensor) -> torch.Tensor:
    """eps / THETA, but not below ``eps_try`` while above it (the kernel's ``lap_next_eps``)."""
    e = eps / THETA
    return torch.where(eps > eps_try, torch.maximum(e, eps_try), e)


def lap_solve(cost: torch.Tensor, *, max_rounds: int = 0, certify_iter: int = 64, first_try_only: bool = False):
    """Minimise (B, n, m) float64 costs, n <= m, ``+inf`` = forbidden (no NaN / ``-inf``).

    Returns (col (B, n) int64, u (B, n), v (B, m) float64 duals: ``u_i + v_j <= c_ij`` on finite
    entries, equality on the assignment, ``v <= 0``, ``v == 0`` on unassigned columns; status (B,)
    int32: 0 solved, 1 infeasible, 2 gave up). ``max_rounds``: per phase (0: ``50 n + 2000``).
    ``first_try_only``: give up when the first certificate fails, as the CUDA kernel does (the rounds
    are then the kernel's, one for one).
    """
    if cost.dim() != 3 or cost.dtype != torch.float64:
        raise ValueError(f"cost must be a (B, n, m) float64 tensor, got {tuple(cost.shape)} {cost.dtype}")
    B, n, m = cost.shape
    if n > m:
        raise ValueError(f"cost must have n <= m (transpose first), got n={n}, m={m}")
    if n > MAX_N or m > MAX_N:
        raise ValueError(f"cost: n and m must be <= {MAX_N} (key index bits), got {n} x {m}")
    dev = cost.device
    col_out = torch.arange(n, device=dev).repeat(B, 1)
    u = torch.zeros(B, n, dtype=torch.float64, device=dev)
    v = torch.zeros(B, m, dtype=torch.float64, device=dev)
    status = torch.full((B,), 2, dtype=torch.int32, device=dev)
    if B == 0 or n == 0:
        return col_out, u, v, torch.zeros(B, dtype=torch.int32, device=dev)
    a, bad = prepare(cost)
    status[bad] = 1
    eps, eps_try, eps_floor, cap, integral = schedule(a)
    price = torch.zeros(B, m, dtype=torch.float64, device=dev)
    if max_rounds <= 0:
        max_rounds = 50 * n + 2000
    at = a.transpose(1, 2).contiguous() if n < m else None
    active = (~bad).nonzero().squeeze(1)
    while active.numel():
        ap = a.index_select(0, active)
        pp = price.index_select(0, active)
        ee = eps.index_select(0, active)
        bound = pp.amax(dim=1) + (2 * n + 2) * (2 * cap.index_select(0, active) + ee)
        col, owner, st = _forward_phase(ap, pp, ee, cap.index_select(0, active), bound, max_rounds)
        if n < m:
            fine = (st == 0).nonzero().squeeze(1)
            if fine.numel():
                sub_p, sub_c, sub_o = pp[fine], col[fine], owner[fine]
                ok = _reverse_rounds(ap[fine], at.index_select(0, active[fine]), sub_p, sub_c, sub_o,
                                     ee[fine], max_rounds)
                pp[fine], col[fine], owner[fine] = sub_p, sub_c, sub_o
                st[fine[~ok]] = 2
        price[active] = pp
        for k in (st == 3).nonzero().squeeze(1).tolist():          # price bound: prove infeasibility
            st[k] = 1 if _infeasible(cost[active[k]]) else 2
        stopped = st != 0
        status[active[stopped]] = st[stopped]
        try_now = (st == 0) & (ee <= eps_try.index_select(0, active) * (1 + 1e-12))
        done = stopped.clone()
        sel = try_now.nonzero().squeeze(1)
        if sel.numel():
            ok, p_opt = certify(ap[sel], col[sel], pp[sel], owner[sel], ee[sel], certify_iter)
            good = sel[ok]
            gi = active[good]
            col_out[gi] = col[good]
            status[gi] = 0
            u[gi], v[gi] = duals(cost.index_select(0, gi), col[good], p_opt[ok])
            done[good] = True
        new_eps = next_eps(ee, eps_try.index_select(0, active))
        gave_up = ~done & ((new_eps < eps_floor.index_select(0, active) * (1 - 1e-12)) | (try_now & first_try_only))
        status[active[gave_up]] = 2
        eps[active] = new_eps
        active = active[~done & ~gave_up]
    return col_out, u, v, status


def _certify(a: torch.Tensor, col: torch.Tensor, price: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Old entry (square, maximised benefits a (P, n, n), prices (P, n)): (P,) bool, True where the
    relaxation from ``price`` proves ``col`` optimal. Kept with :func:`solve_square_max`."""
    P, n, _ = a.shape
    owner = torch.empty_like(col).scatter_(1, col, torch.arange(n, device=col.device).expand(P, n))
    ok, _ = certify(a.to(torch.float64), col, price.to(torch.float64), owner,
                    torch.zeros(P, dtype=torch.float64, device=a.device), max_iter)
    return ok


def solve_square_max(benefit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Old entry: maximise square benefits (B, n, n) -> (col (B, n), certified (B,) bool); the caller
    re-solves the uncertified problems (and counts them in ``stats["fallbacks"]``). ``lap_solve``'s
    duals are re-checked by :func:`_certify` (one relaxation pass: they are already optimal)."""
    col, _, v, status = lap_solve(-benefit.to(torch.float64).contiguous())
    cert = (status == 0) & _certify(benefit, col, -v, 8)
    return col, cert


_auction_batched = solve_square_max      # old name (tests/test_permute_lap.py)
