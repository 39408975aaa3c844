"""Backend ``cuda`` of the permute family: the batched shortest-augmenting-path kernel (``csrc/lap.cu``).

One thread block per problem, the whole batch in one launch, nothing read back to the host: the
caller reads ``status`` when it needs it. The kernel's algorithm runs on CPU tensors as
``wweight.backends.cpu.permute.lap_solve_block_model`` (same per-step code, ``csrc/lap_elem.h``),
which CI tests against scipy; :data:`SELFTESTS` checks the kernel itself against scipy the first time
it is picked on a device.

Large single problems (B == 1 and n >= :data:`AUCTION_MIN_N`) and problems whose column state does not
fit in shared memory go to ``wweight.backends.cuda.lap_auction.auction_lap_solve`` (same contract)
when that module exists; without it this kernel runs them with its column state in global memory.
Contract: ``wweight/backends/__init__.py`` (``permute``).
"""
from __future__ import annotations

import importlib
import sys

import numpy as np
import torch

from ..._ext import cuda_extension, on_tensor_device, stream
from ...permute.lap_contract import check_solver_cost

#: from this n on, a single problem goes to the auction solver (when installed): one block per problem
#: leaves all but one SM idle, and an n-step Dijkstra per free row is n^2 block-wide reductions
AUCTION_MIN_N = 2048

# counters since import (reset freely): problems, kernel launches, problems handed to the auction solver
stats = {"problems": 0, "launches": 0, "auction": 0, "global_scratch": 0, "fallbacks": 0}


def _auction():
    """``auction_lap_solve`` of the large-n solver module, or None when it is not installed."""
    try:
        return importlib.import_module("wweight.backends.cuda.lap_auction").auction_lap_solve
    except ImportError:
        return None


def _check(cost: torch.Tensor):
    B, n, m = check_solver_cost(cost, "cuda")
    if B > 2**31 - 1:
        raise ValueError(f"cost batch B = {B} exceeds the grid limit 2**31 - 1")
    return B, n, m


@on_tensor_device
def lap_solve(cost: torch.Tensor):
    """cost (B, n, m) float64 CUDA, n <= m, minimised, +inf = forbidden.

    Returns ``(col, u, v, status)`` on the device: col (B, n) int64, u (B, n) / v (B, m) float64 duals
    (``u_i + v_j <= c_ij`` on finite entries to float64 rounding, equality on the assignment, ``v <= 0``,
    ``v == 0`` on unassigned columns), status (B,) int32 (0 solved, 1 infeasible, 2 gave up).
    """
    B, n, m = _check(cost)
    ext = cuda_extension()
    dev = cost.device
    stats["problems"] += B
    if B == 0 or n == 0:
        f64 = dict(dtype=torch.float64, device=dev)
        return (torch.empty((B, n), dtype=torch.int64, device=dev), torch.zeros((B, n), **f64),
                torch.zeros((B, m), **f64), torch.zeros(B, dtype=torch.int32, device=dev))
    scratch_bytes = int(ext.lap_scratch_bytes(B, m))
    if (B == 1 and n >= AUCTION_MIN_N) or scratch_bytes:
        auction = _auction()
        if auction is not None:
            stats["auction"] += B
            return auction(cost)
    col = torch.full((B, n), -1, dtype=torch.int64, device=dev)
    u = torch.zeros((B, n), dtype=torch.float64, device=dev)
    v = torch.zeros((B, m), dtype=torch.float64, device=dev)
    status = torch.full((B,), 2, dtype=torch.int32, device=dev)  # 2 = gave up, until the kernel says otherwise
    scratch = torch.empty(scratch_bytes, dtype=torch.uint8, device=dev) if scratch_bytes else None
    stats["global_scratch"] += B if scratch_bytes else 0
    ext.lap_solve(cost.data_ptr(), B, n, m, col.data_ptr(), u.data_ptr(), v.data_ptr(), status.data_ptr(),
                  scratch.data_ptr() if scratch is not None else 0, stream(cost))
    stats["launches"] += 1
    return col, u, v, status


def selftest(device: torch.device, prims=None) -> bool:
    """The kernel on random problems (square, rectangular, tied integers, forbidden entries) vs scipy.

    ``prims``: another module with ``lap_solve`` instead of this one (CI runs the self-test on the C++
    model of the kernel, so a wrong self-test cannot disable a good kernel on the first GPU run).
    """
    from scipy.optimize import linear_sum_assignment as sp_lsa

    solve = (prims or sys.modules[__name__]).lap_solve

    g = torch.Generator(device="cpu").manual_seed(0)
    cases = [torch.rand(8, 37, 37, generator=g, dtype=torch.float64),
             torch.rand(4, 20, 53, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (4, 64, 64), generator=g).to(torch.float64)]
    forb = torch.rand(4, 30, 30, generator=g, dtype=torch.float64)
    forb[torch.rand(forb.shape, generator=g) < 0.5] = float("inf")
    cases.append(forb)
    for c in cases:
        col, _, _, status = solve(c.to(device))
        col, status = col.cpu().numpy(), status.cpu().numpy()
        for b in range(c.shape[0]):
            a = c[b].numpy()
            try:
                r, cc = sp_lsa(a)
            except ValueError:
                if status[b] != 1:
                    return False
                continue
            if status[b] != 0 or len(np.unique(col[b])) != a.shape[0]:
                return False
            ref, got = a[r, cc].sum(), a[np.arange(a.shape[0]), col[b]].sum()
            if not abs(got - ref) <= 1e-12 * max(1.0, abs(ref)):
                return False
    return True


SELFTESTS = {"lap_solve": selftest}
