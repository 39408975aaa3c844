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
  plain torch so it runs on the GPU (and, for the tests, on CPU tensors):
  ``wweight/backends/torch/permute.py``. All unassigned rows of
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

from .. import _dispatch

_METHODS = ("auto", "scipy", "auction")


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
    if cost.device.type == "meta":
        raise ValueError("cost is a meta tensor (no values): linear_sum_assignment needs real costs")
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


def _solve_square_max(benefit: torch.Tensor, method: str, on_cuda: bool, backend: str) -> torch.Tensor:
    """benefit (B, n, n) -> col (B, n), exact: the backend's solver, scipy for what it cannot certify."""
    if method == "scipy" or (method == "auto" and not on_cuda):
        return _scipy_batched(benefit)
    prims = _dispatch.backend_module("permute", backend)
    col, cert = prims.solve_square_max(benefit)
    if not bool(cert.all()):
        bad = (~cert).nonzero().squeeze(1)
        prims.stats["fallbacks"] += int(bad.numel())
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
    col = _solve_square_max(sq, method, dev.type == "cuda", backend)[:, :r]
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
    be = _dispatch.resolve("linear_sum_assignment", cost.device, backend, family="permute", has_cuda=False,
                          has_triton=False)
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
