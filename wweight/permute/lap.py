"""Exact linear sum assignment (LAP): a drop-in for ``scipy.optimize.linear_sum_assignment``, batched, on any device.

``linear_sum_assignment(cost_matrix, maximize=False)`` behaves like scipy's for every input scipy
accepts or refuses, with the same exception types and messages (:mod:`.lap_contract` lists the steps):
array-likes of any real / bool dtype, torch tensors on any device, ``maximize`` any truthy value, empty
and 1 x n matrices, ``+inf`` as a forbidden pair (``-inf`` when maximising), ``ValueError("cost matrix
is infeasible")`` when no finite assignment exists. Results: ``(row_ind, col_ind)`` int64 of length
``min(n, m)``, ``row_ind`` sorted; numpy arrays unless the input is a torch tensor (then torch on its
device). A 3-D ``(B, n, m)`` input is B independent problems: (B, min(n, m)) results, errors name the
batch index.

Dispatch (every problem is solved as ``(B, r, c)`` float64, ``r <= c``, minimised, ``+inf`` forbidden):

* CPU tensors / numpy: the C++ LAPJV of the ``cpu`` backend when ``available()``, else scipy;
* CUDA tensors: the ``cuda`` backend (it picks batched shortest augmenting path or large-n auction),
  else the torch auction;
* ``method="auction"``: the torch backend's auction (any device); ``method="sap"``: the shortest
  augmenting path solvers (C++ on CPU, CUDA on GPU; scipy where neither exists);
  ``method="scipy"`` / ``backend="reference"``: scipy, one problem at a time.

Exactness: every non-scipy answer is checked by :func:`.lap_certify.certify` from the solver's duals
(one O(nm) pass on the device, one host read); a problem that fails it, that the solver gave up on, or
that it called infeasible is re-solved by scipy (the reference; infeasibility is confirmed by it), and
``stats["fallbacks"]`` counts the re-solves. A backend module that predates the ``lap_solve`` contract
(no duals) is used through its own certificate (``solve_square_max``, square-padded, finite problems
only), as before.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .. import _dispatch
from .lap_certify import certify
from .lap_contract import INFEASIBLE, as_cost, check_values, infeasible_error

__all__ = ["linear_sum_assignment", "certify", "stats", "assignment_value"]

_METHODS = ("auto", "scipy", "auction", "sap")
# counters since import (reset freely): problems solved per path, certificates, scipy re-solves
stats = {"problems": 0, "scipy": 0, "cpu": 0, "cuda": 0, "auction": 0, "certified": 0, "fallbacks": 0,
         "infeasible": 0}


# ----------------------------------------------------------------------------------------------
# solvers on a minimised (B, r, c) float64 problem, r <= c


def _scipy_min(c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """scipy on each problem: (col (B, r) int64, status (B,) int32: 0 solved, 1 infeasible)."""
    from scipy.optimize import linear_sum_assignment as sp_lsa

    a = c.detach().cpu().numpy()
    B, r, _ = a.shape
    col = np.zeros((B, r), dtype=np.int64)
    status = np.zeros(B, dtype=np.int32)
    for b in range(B):
        try:
            col[b] = sp_lsa(a[b])[1]
        except ValueError as e:
            if str(e) != INFEASIBLE:
                raise
            col[b] = np.arange(r)
            status[b] = 1
    stats["scipy"] += B
    return torch.from_numpy(col).to(c.device), torch.from_numpy(status).to(c.device)


def _module(name: str):
    """The permute glue of backend ``name`` if it exists and speaks ``lap_solve``, else None."""
    try:
        mod = _dispatch.backend_module("permute", name)
    except ImportError:
        return None
    if not hasattr(mod, "lap_solve"):
        return None
    if hasattr(mod, "available") and not mod.available():
        return None
    return mod


def _legacy_auction(c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch auction of the old contract (``solve_square_max``, its own certificate): (col, status).

    Status 2 (scipy re-solves) for problems with forbidden entries (it cannot take them) and for the
    ones it did not certify.
    """
    prims = _dispatch.backend_module("permute", "torch")
    B, r, m = c.shape
    finite = torch.isfinite(c).flatten(1).all(1)
    col = torch.arange(r, device=c.device).repeat(B, 1)
    status = torch.full((B,), 2, dtype=torch.int32, device=c.device)
    idx = finite.nonzero().squeeze(1)
    if idx.numel():
        ben = -c.index_select(0, idx)
        if r < m:  # constant rows: exact (a constant row adds the same to every assignment); the
            # constant is the problem's largest benefit so the range, and the auction's resolution, stay
            top = ben.amax(dim=(1, 2), keepdim=True)
            ben = torch.cat([ben, top.expand(idx.numel(), m - r, m)], dim=1)
        cc, cert = prims.solve_square_max(ben)
        col[idx] = cc[:, :r]
        status[idx] = torch.where(cert, 0, 2).to(torch.int32)
    return col, status


def _pick(dev: torch.device, want: str, method: str):
    """(label, lap_solve or None): the solver for this device / backend / method; None means scipy."""
    if want == "reference" or method == "scipy":
        return "scipy", None
    if method == "auction":
        mod = _module("torch")
        return "auction", (mod.lap_solve if mod is not None else _legacy_auction)
    if want == "cpu":
        if dev.type != "cpu":
            raise RuntimeError(f"linear_sum_assignment: backend 'cpu' needs CPU tensors, got device {dev}")
        mod = _module("cpu")
        if mod is None:
            raise RuntimeError("linear_sum_assignment: the C++ CPU extension has no LAP solver (wweight._cpu not "
                               "built, or built before it had one)")
        return "cpu", mod.lap_solve
    if want == "cuda":
        if dev.type != "cuda":
            raise RuntimeError(f"linear_sum_assignment: backend 'cuda' needs CUDA tensors, got device {dev}")
        _dispatch.resolve("lap_solve", dev, "cuda", family="permute", has_triton=False)  # raises if not built
        mod = _module("cuda")
        if mod is None:
            raise RuntimeError("linear_sum_assignment: the CUDA extension has no LAP solver")
        return "cuda", mod.lap_solve
    if want == "triton":
        raise RuntimeError("linear_sum_assignment: no Triton kernel exists for this op")
    # auto / torch; method auto / sap
    if dev.type == "cpu":
        mod = _module("cpu") if want == "auto" else None
        return ("cpu", mod.lap_solve) if mod is not None else ("scipy", None)
    if dev.type == "cuda" and want == "auto":
        # the kernel must be in the built extension and pass its one-off self-test (SELFTESTS["lap_solve"])
        if _dispatch.resolve("lap_solve", dev, "auto", family="permute", has_triton=False) == "cuda":
            mod = _module("cuda")
            if mod is not None:
                return "cuda", mod.lap_solve
    if method == "sap":
        return "scipy", None  # scipy's solver is a shortest augmenting path (Crouse 2016)
    mod = _module("torch")
    return "auction", (mod.lap_solve if mod is not None else _legacy_auction)


def _solve_min(c: torch.Tensor, want: str, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(col (B, r), status (B,) int32: 0 solved, 1 infeasible) of minimised ``c`` (B, r, m), exact."""
    label, solver = _pick(c.device, want, method)
    stats["problems"] += c.shape[0]
    if solver is None:
        return _scipy_min(c)
    stats[label] += c.shape[0]
    # a constant matrix gets the identity, as scipy guarantees (scipy #11602); another solver may pick
    # any of the (all optimal) assignments
    flat = c.flatten(1)
    if c.device.type == "cpu":  # numpy: no thread-pool wake-ups on small problems
        a = flat.numpy()
        hi, lo = torch.from_numpy(a.max(1)), torch.from_numpy(a.min(1))
    else:
        hi, lo = flat.amax(1), flat.amin(1)
    const = (hi == lo) & torch.isfinite(hi)
    if solver is _legacy_auction:
        col, status = _legacy_auction(c)
        certified = status == 0
    else:
        col, u, v, status = solver(c)
        col, status = col.to(torch.long), status.to(torch.int32)
        certified = (status == 0) & certify(c, col, u, v)
    col = torch.where(const.unsqueeze(1), torch.arange(col.shape[1], device=col.device), col)
    certified = certified | const
    redo = ~certified  # gave up, uncertified, or called infeasible (scipy confirms)
    n_redo = int(redo.sum())  # the one host read of the solve
    stats["certified"] += c.shape[0] - n_redo
    if n_redo:
        idx = redo.nonzero().squeeze(1)
        col2, st2 = _scipy_min(c.index_select(0, idx))
        stats["infeasible"] += int((st2 == 1).sum())
        stats["fallbacks"] += n_redo - int(((status.index_select(0, idx) == 1) & (st2 == 1)).sum())
        col = col.clone()
        status = status.clone()
        col[idx] = col2
        status[idx] = st2
    return col, status


# ----------------------------------------------------------------------------------------------
# the op


def _lap_impl(cost: torch.Tensor, maximize: bool, backend: str, method: str):
    """cost (B, n, m) float64 (checked: no NaN, no invalid infinity) -> rows, cols (B, k) int64, status (B,)."""
    B, n, m = cost.shape
    dev = cost.device
    k = min(n, m)
    if k == 0 or B == 0:
        e = torch.empty(B, k, dtype=torch.long, device=dev)
        return e, e.clone(), torch.zeros(B, dtype=torch.int32, device=dev)
    c = -cost if maximize else cost            # a new tensor when maximising; never written either way
    transposed = n > m
    if transposed:
        c = c.transpose(1, 2)
    c = c.contiguous()
    col, status = _solve_min(c, backend, method)  # (B, k): column of each row of c
    rows = torch.arange(k, device=dev).expand(B, k)
    if not transposed:
        return rows.contiguous(), col.contiguous(), status
    # rows of the original problem are the columns of c; sort them as scipy does
    order = col.argsort(dim=1)
    return col.gather(1, order), rows.gather(1, order), status


@torch.library.custom_op("wweight::linear_sum_assignment", mutates_args=())
def _lap_op(cost: torch.Tensor, maximize: bool, backend: str,
            method: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _lap_impl(cost, maximize, backend, method)


@_lap_op.register_fake
def _(cost, maximize, backend, method):
    B, n, m = cost.shape
    k = min(n, m)
    return (cost.new_empty((B, k), dtype=torch.long), cost.new_empty((B, k), dtype=torch.long),
            cost.new_empty((B,), dtype=torch.int32))


def linear_sum_assignment(cost_matrix, maximize=False, *, backend: Optional[str] = None, method: str = "auto"):
    """Solve the linear sum assignment problem exactly (``scipy.optimize.linear_sum_assignment``'s contract).

    Args:
        cost_matrix: (n, m) costs (rectangular allowed), or a batch (B, n, m) of independent problems:
            a torch tensor of any real / bool dtype on any device, a numpy array, or any array-like
            scipy accepts (nested lists, tuples, ...). ``+inf`` marks a forbidden pair (``-inf`` when
            maximising); NaN and the other infinity are refused as scipy refuses them.
        maximize: any object; its truth value says maximise instead of minimise (scipy's ``p`` flag).
        backend: ``None`` / ``"auto"`` (C++ solver on CPU, CUDA solver on GPU, as available),
            ``"cpu"``, ``"cuda"`` (forced; RuntimeError when they cannot run), ``"torch"`` (scipy on
            CPU, the torch auction elsewhere) or ``"reference"`` (scipy, one problem at a time).
        method: ``"auto"``, ``"scipy"``, ``"auction"`` (the torch auction, any device) or ``"sap"``
            (shortest augmenting path: C++ / CUDA, scipy where neither exists).

    Returns:
        ``(row_ind, col_ind)``, int64, each of shape (min(n, m),) or (B, min(n, m)); numpy arrays
        unless ``cost_matrix`` is a torch tensor (then torch tensors on its device). ``row_ind`` is
        sorted (``arange`` when n <= m); ``cost[row_ind, col_ind].sum()`` is the optimum.

    Raises:
        ValueError: "expected a matrix (2-D array), got a %d array", "matrix contains invalid numeric
            entries", "cost matrix is infeasible" (``" (batch index b)"`` appended for a batch), or the
            conversion errors of numpy; TypeError for arrays numpy cannot safely cast to float64.

    Paper: Jonker & Volgenant, "A shortest augmenting path algorithm for dense and sparse linear
    assignment problems" (1987); Crouse, "On implementing 2D rectangular assignment algorithms" (2016,
    scipy's solver); Bertsekas, "The auction algorithm" (1988).
    """
    maximize = bool(maximize)  # first, as scipy parses its arguments before converting the cost
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
    want = _dispatch.requested(backend)
    cost, torch_in = as_cost(cost_matrix)
    batched = cost.dim() == 3
    c3 = cost if batched else cost.unsqueeze(0)
    check_values(c3, maximize, batched)
    r, c, status = _dispatch.run_op(_lap_op, c3.contiguous(), maximize, want, method)
    infeasible_error(status, batched)
    if not batched:
        r, c = r[0], c[0]
    if torch_in:
        return r, c
    return r.numpy(), c.numpy()


def assignment_value(cost: torch.Tensor, row_ind: torch.Tensor, col_ind: torch.Tensor) -> torch.Tensor:
    """Total ``cost[row_ind, col_ind]`` in float64 (a (B,) tensor for a batch)."""
    c = cost.to(torch.float64)
    if c.dim() == 2:
        return c[row_ind, col_ind].sum()
    b = torch.arange(c.shape[0], device=c.device).unsqueeze(1)
    return c[b, row_ind, col_ind].sum(1)
