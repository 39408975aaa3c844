"""Exact linear sum assignment (LAP), single and batched, on CPU and GPU tensors.

``linear_sum_assignment(cost, maximize=False)`` has the contract of
``scipy.optimize.linear_sum_assignment``: ``cost`` is (n, m) (rectangular allowed), the result is
``(row_ind, col_ind)`` of length ``min(n, m)`` with ``row_ind`` sorted, and the assignment is an
exact optimum. A (B, n, m) stack is solved as B independent problems and returns (B, min(n, m))
index tensors (e.g. one 128x128 problem per attention head).

Solvers
-------
* ``scipy``: ``scipy.optimize.linear_sum_assignment`` (a shortest-augmenting-path / LAPJV
  variant, float64). The CPU path, and the fall-back everywhere.
* ``auction``: a batched, vectorised Jacobi auction (Bertsekas, "The auction algorithm: a
  distributed relaxation method for the assignment problem", 1988) with epsilon scaling, written in
  plain torch so it runs on the GPU (and, for the tests, on CPU tensors). All unassigned rows of
  all B problems bid at once (one row-wise top-2 over ``benefit - price`` per round), every column
  keeps its highest bid. Rectangular problems are padded with constant rows (exact: a constant row
  adds the same amount to every assignment).

Why the auction result is exact: on integer costs an auction that ends with ``eps < 1/n`` is optimal
(eps-complementary slackness bounds the gap by ``n * eps < 1``). Float costs are not integers, so
instead every auction result is *certified*: from the final prices ``p`` we run the monotone price
relaxation ``p[sigma(i)] <- a[i, sigma(i)] - max_j (a[i, j] - p[j])`` (Bellman-Ford on the
assignment's residual graph) until every row's slack ``max_j(a_ij - p_j) - (a_{i,sigma(i)} -
p_{sigma(i)})`` is within float64 rounding of zero. Such prices are an optimal dual solution
(dual feasibility + complementary slackness), so ``sigma`` is optimal up to float64 rounding —
the same precision scipy works at. If the relaxation does not converge (a negative cycle: the
assignment is not optimal), the auction continues with a smaller eps, and if that runs out the
problem is handed to scipy. A non-certified assignment is never returned.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import _dispatch

_METHODS = ("auto", "scipy", "auction")
_F64_EPS = float(np.finfo(np.float64).eps)
# counters of the last auction runs (read by the benchmark; reset freely)
stats = {"phases": 0, "rounds": 0, "certify_iters": 0, "fallbacks": 0}


# ----------------------------------------------------------------------------------------------
# validation


def _check_cost(cost) -> Tuple[torch.Tensor, bool]:
    """Returns (tensor, was_numpy)."""
    was_numpy = False
    if isinstance(cost, np.ndarray):
        was_numpy = True
        if cost.dtype.kind not in "fiub":
            raise TypeError(f"cost must be a real numeric array, got dtype {cost.dtype}")
        cost = torch.from_numpy(np.ascontiguousarray(cost, dtype=np.float64))
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"cost must be a torch.Tensor or numpy.ndarray, got {type(cost).__name__}")
    if cost.dtype.is_complex or cost.dtype == torch.bool:
        raise TypeError(f"cost must be a real floating or integer tensor, got {cost.dtype}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must be 2-D (n, m) or a 3-D batch (B, n, m), got shape {tuple(cost.shape)}")
    if cost.numel() and cost.is_floating_point():
        if cost.device.type == "cpu" and cost.dtype in (torch.float32, torch.float64):
            arr = cost.detach().numpy()  # numpy: no thread-pool start-up on small CPU inputs
            finite, has_nan = bool(np.isfinite(arr).all()), None
            if not finite:
                has_nan = bool(np.isnan(arr).any())
        else:
            finite = bool(torch.isfinite(cost).all())
            has_nan = None if finite else bool(torch.isnan(cost).any())
        if not finite:
            raise ValueError(f"cost contains {'NaN' if has_nan else 'Inf'}: linear_sum_assignment needs finite costs")
    return cost, was_numpy


# ----------------------------------------------------------------------------------------------
# scipy path (CPU, and the fall-back)


def _scipy_batched(benefit: torch.Tensor) -> torch.Tensor:
    """benefit (B, n, m) with n <= m, maximised. Returns col (B, n) int64 on benefit's device."""
    from scipy.optimize import linear_sum_assignment as sp_lsa

    a = benefit.detach().to("cpu", torch.float64).numpy()
    out = np.empty(a.shape[:2], dtype=np.int64)
    for b in range(a.shape[0]):
        r, c = sp_lsa(a[b], maximize=True)
        out[b, r] = c
    return torch.from_numpy(out).to(benefit.device)


def _scipy_direct(cost: torch.Tensor, maximize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """scipy on each (n, m) problem of a (B, n, m) stack, exactly its contract (rectangular included)."""
    from scipy.optimize import linear_sum_assignment as sp_lsa

    a = cost.detach().to("cpu").numpy() if cost.dtype in (torch.float32, torch.float64) else \
        cost.detach().to("cpu", torch.float64).numpy()
    B, n, m = a.shape
    k = min(n, m)
    rows = np.empty((B, k), dtype=np.int64)
    cols = np.empty((B, k), dtype=np.int64)
    for b in range(B):
        rows[b], cols[b] = sp_lsa(a[b], maximize=maximize)
    return torch.from_numpy(rows).to(cost.device), torch.from_numpy(cols).to(cost.device)


# ----------------------------------------------------------------------------------------------
# batched auction with epsilon scaling + certificate


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


def _solve_square_max(benefit: torch.Tensor, method: str, on_cuda: bool) -> torch.Tensor:
    """benefit (B, n, n) -> col (B, n), exact."""
    if method == "scipy" or (method == "auto" and not on_cuda):
        return _scipy_batched(benefit)
    col, cert = _auction_batched(benefit)
    if not bool(cert.all()):
        bad = (~cert).nonzero().squeeze(1)
        stats["fallbacks"] += int(bad.numel())
        col[bad] = _scipy_batched(benefit.index_select(0, bad))
    return col


def _lap_impl(cost: torch.Tensor, maximize: bool, backend: str, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """cost (B, n, m) -> row_ind, col_ind (B, min(n, m)) int64."""
    B, n, m = cost.shape
    dev = cost.device
    k = min(n, m)
    if k == 0:
        e = torch.empty(B, 0, dtype=torch.long, device=dev)
        return e, e.clone()
    if backend == "reference" or method == "scipy" or (method == "auto" and dev.type != "cuda"):
        return _scipy_direct(cost, maximize)
    benefit = cost.to(torch.float64)
    if not maximize:
        benefit = -benefit
    transposed = n > m
    if transposed:
        benefit = benefit.transpose(1, 2)
    r, c = benefit.shape[1], benefit.shape[2]  # r <= c
    if r < c:  # pad with constant rows: exact (a constant row adds the same to every assignment)
        pad = torch.zeros(B, c - r, c, dtype=benefit.dtype, device=dev)
        sq = torch.cat([benefit, pad], dim=1)
    else:
        sq = benefit
    col = _solve_square_max(sq, method, dev.type == "cuda")[:, :r]
    rows = torch.arange(r, device=dev).expand(B, r)
    if not transposed:
        return rows.contiguous(), col.contiguous()
    # rows of the original problem are the columns here; sort them as scipy does
    order = col.argsort(dim=1)
    return col.gather(1, order), rows.gather(1, order)


@torch.library.custom_op("wweight::linear_sum_assignment", mutates_args=())
def _lap_op(cost: torch.Tensor, maximize: bool, backend: str, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _lap_impl(cost, maximize, backend, method)


@_lap_op.register_fake
def _(cost, maximize, backend, method):
    B, n, m = cost.shape
    k = min(n, m)
    return cost.new_empty((B, k), dtype=torch.long), cost.new_empty((B, k), dtype=torch.long)


def linear_sum_assignment(cost, maximize: bool = False, *, backend: Optional[str] = None,
                          method: str = "auto"):
    """Exact linear sum assignment (the contract of ``scipy.optimize.linear_sum_assignment``).

    Args:
        cost: (n, m) or a batch (B, n, m) of costs; torch tensor (any real dtype, any device) or a
            numpy array. Rectangular allowed. NaN / Inf are refused (ValueError).
        maximize: maximise the total instead of minimising it.
        backend: ``"torch"`` (default on every device: scipy on CPU tensors, the batched auction
            with certificate on CUDA tensors) or ``"reference"`` (scipy, one problem at a time).
        method: ``"auto"`` (as above), ``"scipy"`` or ``"auction"`` (force the auction, on any
            device; uncertified results are re-solved by scipy).

    Returns:
        ``(row_ind, col_ind)``: int64 tensors on ``cost``'s device (numpy arrays for numpy input)
        of shape (min(n, m),), or (B, min(n, m)) for a batch. ``row_ind`` is sorted;
        ``cost[row_ind, col_ind].sum()`` is optimal.
    """
    cost, was_numpy = _check_cost(cost)
    if not isinstance(maximize, (bool, np.bool_)):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
    be = _dispatch.resolve("linear_sum_assignment", cost.device, backend, has_cuda=False, has_triton=False)
    single = cost.dim() == 2
    c3 = cost.unsqueeze(0) if single else cost
    r, c = _lap_op(c3.contiguous(), bool(maximize), be, method)
    if single:
        r, c = r[0], c[0]
    if was_numpy:
        return r.numpy(), c.numpy()
    return r, c


def assignment_value(cost: torch.Tensor, row_ind: torch.Tensor, col_ind: torch.Tensor) -> torch.Tensor:
    """Total ``cost[row_ind, col_ind]`` in float64 (a (B,) tensor for a batch)."""
    c = cost.to(torch.float64)
    if c.dim() == 2:
        return c[row_ind, col_ind].sum()
    b = torch.arange(c.shape[0], device=c.device).unsqueeze(1)
    return c[b, row_ind, col_ind].sum(1)
