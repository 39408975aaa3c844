"""Backend ``torch`` of the permute family: the batched epsilon-scaling auction with a dual certificate.

Bertsekas, "The auction algorithm: a distributed relaxation method for the assignment problem"
(1988), vectorised over a batch of square problems in plain torch so it runs on the GPU (and, for
the tests, on CPU tensors). Why a certified result is exact is explained in
:mod:`wweight.permute.lap`; uncertified problems are re-solved there by scipy.
Contract: ``wweight/backends/__init__.py`` (``solve_square_max``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

_F64_EPS = float(np.finfo(np.float64).eps)
# counters of the last auction runs (read by the benchmark; reset freely)
stats = {"phases": 0, "rounds": 0, "certify_iters": 0, "fallbacks": 0}


def _auction_phase(a2: torch.Tensor, price: torch.Tensor, eps: torch.Tensor, n: int,
                   max_rounds: int) -> Tuple[torch.Tensor, bool]:
    """One eps phase of the Jacobi auction on P square problems (prices updated in place).

    a2: (P*n, n) float64 benefits, row ``b*n + i``; price: (P, n); eps: (P,).
    Returns (col (P*n,) local column of each row, finished).
    """
    P = price.shape[0]
    dev = a2.device
    flat_price = price.view(-1)
    owner = torch.full((P * n,), -1, dtype=torch.long, device=dev)  # flat column -> flat row
    col = torch.full((P * n,), -1, dtype=torch.long, device=dev)    # flat row -> local column
    neg_inf = torch.full((P * n,), float("-inf"), dtype=a2.dtype, device=dev)
    none = torch.full((P * n,), -1, dtype=torch.long, device=dev)
    stats["phases"] += 1
    for _ in range(max_rounds):
        stats["rounds"] += 1
        rows = (col < 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return col, True
        b = torch.div(rows, n, rounding_mode="floor")
        vals = a2.index_select(0, rows) - price.index_select(0, b)          # (k, n)
        top_v, top_j = vals.topk(2, dim=1)
        obj = b * n + top_j[:, 0]                                            # flat column bid on
        # bid = price + (best - second best) + eps: the most the row can pay and stay eps-happy
        bid = flat_price[obj] + (top_v[:, 0] - top_v[:, 1]) + eps[b]
        best = neg_inf.clone().scatter_reduce_(0, obj, bid, "amax")
        tied = bid == best[obj]
        winner = none.clone().scatter_reduce_(0, obj[tied], rows[tied], "amax")
        keep = tied & (winner[obj] == rows)                                  # one winner per column
        w_obj, w_row = obj[keep], rows[keep]
        prev = owner[w_obj]
        col[prev[prev >= 0]] = -1                                            # outbid rows re-enter
        owner[w_obj] = w_row
        col[w_row] = w_obj - torch.div(w_obj, n, rounding_mode="floor") * n
        flat_price[w_obj] = best[w_obj]
    return col, False


def _certify(a: torch.Tensor, col: torch.Tensor, price: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Dual certificate of optimality of ``col`` for maximising ``a`` (P, n, n).

    Relaxes ``price`` (in place, monotone decreasing) towards prices under which every row's assigned
    column is its best one. Returns a (P,) bool: True where every row's slack is within float64
    rounding of zero, i.e. (u = max_j(a - p), p) is dual feasible with complementary slackness.
    """
    a_sig = a.gather(2, col.unsqueeze(2)).squeeze(2)                        # (P, n)
    scale = a.abs().amax(dim=(1, 2))                                         # (P,)
    ok = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    for _ in range(max_iter):
        stats["certify_iters"] += 1
        u = (a - price.unsqueeze(1)).amax(dim=2)                             # best value per row
        own = a_sig - price.gather(1, col)
        slack = u - own                                                      # >= 0 up to rounding
        tol = 16 * _F64_EPS * (scale + price.abs().amax(dim=1))
        ok = (slack <= tol.unsqueeze(1)).all(dim=1)
        if bool(ok.all()):
            break
        # lower the price of each assigned column just enough that its row is happy with it
        newp = torch.minimum(price.gather(1, col), a_sig - u)
        price.scatter_(1, col, newp)
    return ok


def _auction_batched(benefit: torch.Tensor, *, theta: float = 8.0, max_rounds: Optional[int] = None,
                     certify_iter: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Maximise square benefits (B, n, n). Returns (col (B, n), certified (B,) bool).

    Uncertified problems carry an arbitrary (but valid) permutation; callers re-solve them.
    """
    B, n, _ = benefit.shape
    dev = benefit.device
    a = benefit.to(torch.float64)
    col_out = torch.arange(n, device=dev).repeat(B, 1)
    cert = torch.zeros(B, dtype=torch.bool, device=dev)
    if n == 1:
        return col_out, torch.ones(B, dtype=torch.bool, device=dev)
    amax = a.amax(dim=(1, 2))
    rng = amax - a.amin(dim=(1, 2))
    # constant problem: every assignment is optimal
    const = rng == 0
    cert |= const
    # integral costs: an auction finished at eps < 1/n is optimal by theory (still certified below)
    integral = (a == a.round()).all(dim=2).all(dim=1) & (a.abs().amax(dim=(1, 2)) < 2.0 ** 40)
    if max_rounds is None:
        max_rounds = 200 * n + 1000
    active = (~const).nonzero().squeeze(1)
    if active.numel() == 0:
        return col_out, cert
    # shift so the largest benefit is 0 (prices stay small, rounding relative to the range)
    a = a - amax.view(B, 1, 1)
    price = torch.zeros(B, n, dtype=torch.float64, device=dev)
    eps = rng / theta
    # float costs: at eps far below the range, try to certify after each phase; give up below
    # float64 resolution of the range (then scipy re-solves the problem)
    eps_try = torch.where(integral, 1.0 / (n + 1) * torch.ones_like(rng), rng / (n * n))
    eps_floor = torch.where(integral, eps_try / theta, rng * 64 * _F64_EPS)
    while active.numel():
        ap = a.index_select(0, active)
        pp = price.index_select(0, active)
        ee = eps.index_select(0, active)
        col, finished = _auction_phase(ap.reshape(-1, n), pp, ee, n, max_rounds)
        if not finished:  # pathological price war: leave these problems to scipy
            break
        col = col.view(-1, n)
        price[active] = pp
        col_out[active] = col
        try_now = ee <= eps_try.index_select(0, active) * (1 + 1e-12)
        done = torch.zeros_like(try_now)
        if bool(try_now.any()):
            sel = try_now.nonzero().squeeze(1)
            p_c = pp.index_select(0, sel).clone()
            ok = _certify(ap.index_select(0, sel), col.index_select(0, sel), p_c, certify_iter)
            done[sel] = ok
            cert[active[sel[ok]]] = True
        new_eps = ee / theta
        gave_up = (~done) & (new_eps < eps_floor.index_select(0, active))
        # integral costs: geometric schedule clamped at eps_try (< 1/n), where theory says optimal
        et = eps_try.index_select(0, active)
        clamped = torch.where(ee > et * (1 + 1e-12), torch.maximum(new_eps, et), new_eps)
        eps[active] = torch.where(integral.index_select(0, active), clamped, new_eps)
        active = active[~done & ~gave_up]
    return col_out, cert


def solve_square_max(benefit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Maximise square benefits (B, n, n): (col (B, n), certified (B,) bool); the caller re-solves
    the uncertified problems (and counts them in ``stats["fallbacks"]``)."""
    return _auction_batched(benefit)
