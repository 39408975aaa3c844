"""Backend ``cpu`` of the permute family: exact LAP solvers of ``wweight._cpu`` (``csrc/cpu/lap_cpu.cpp``).

* :func:`lap_solve`: Jonker & Volgenant (1987) LAPJV -- column reduction and augmenting row
  reduction, then shortest augmenting paths (rectangular n < m: SAP from v = 0, no column reduction).
* :func:`lap_solve_block_model`: the algorithm of the CUDA kernel (``csrc/lap.cu``) run serially, with
  the same per-step code (``csrc/lap_elem.h``), so CI can test the GPU algorithm against scipy.

Both solve a batch with one problem per OpenMP thread; a single problem runs on one thread.
Contract (``wweight/backends/__init__.py``, ``permute``): ``cost`` (B, n, m) contiguous float64 CPU
tensor, n <= m, minimised, +inf = forbidden pair, no NaN / -inf (the caller checks; a NaN makes
the result meaningless, not a crash).
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..._ext import cpu_extension, cpu_extension_error
from ...permute.lap_contract import check_solver_cost

# counters summed over the calls since import (reset freely): problems solved, rows augmented by a
# shortest path, augmenting-row-reduction steps, Dijkstra steps (settled columns), statuses
stats = {"problems": 0, "augmentations": 0, "arr_steps": 0, "dijkstra_steps": 0, "infeasible": 0, "gave_up": 0,
         "fallbacks": 0}


def available() -> bool:
    """True when ``wweight._cpu`` has the LAP solvers (an older build may not)."""
    ext = cpu_extension()
    return ext is not None and hasattr(ext, "lap_solve") and hasattr(ext, "lap_solve_block_model")


def _ext():
    if not available():
        why = cpu_extension_error() or "this build of wweight._cpu has no lap_solve (rebuild: pip install .)"
        raise RuntimeError(f"wweight: the C++ LAP solver is not available: {why}")
    return cpu_extension()


def _check(cost: torch.Tensor) -> Tuple[int, int, int]:
    return check_solver_cost(cost, "cpu")


def _run(fn_name: str, cost: torch.Tensor, threads, *extra):
    B, n, m = _check(cost)
    threads = 0 if threads is None else int(threads)
    if threads < 1 and threads != 0:
        raise ValueError(f"threads must be >= 1 (or None: the OpenMP default), got {threads}")
    ext = _ext()
    col = torch.full((B, n), -1, dtype=torch.int64)
    u = torch.zeros((B, n), dtype=torch.float64)
    v = torch.zeros((B, m), dtype=torch.float64)
    status = torch.zeros(B, dtype=torch.int32)
    counts = torch.zeros((B, 3), dtype=torch.int64)
    if B:
        getattr(ext, fn_name)(cost.data_ptr(), B, n, m, col.data_ptr(), u.data_ptr(), v.data_ptr(),
                              status.data_ptr(), counts.data_ptr(), *extra, threads)
    tot = counts.sum(0).tolist()
    stats["problems"] += B
    stats["augmentations"] += tot[0]
    stats["arr_steps"] += tot[1]
    stats["dijkstra_steps"] += tot[2]
    stats["infeasible"] += int((status == 1).sum())
    stats["gave_up"] += int((status == 2).sum())
    return col, u, v, status


def lap_solve(cost: torch.Tensor, threads=None):
    """LAPJV on a batch: cost (B, n, m) float64 CPU, n <= m, minimised; ``threads``: OpenMP threads over
    the batch (None: OpenMP's default, i.e. every core or OMP_NUM_THREADS).

    Returns ``(col, u, v, status)``: col (B, n) int64 (the column of each row), duals u (B, n) and
    v (B, m) float64 with ``u_i + v_j <= c_ij`` on finite entries (to float64 rounding), equality on
    the assignment, ``v <= 0`` and ``v == 0`` on unassigned columns; status (B,) int32: 0 solved,
    1 infeasible (no assignment of finite total; col / u / v are then partial), 2 gave up (not used
    by this solver: LAPJV always finishes).
    """
    return _run("lap_solve", cost, threads)


def lap_solve_block_model(cost: torch.Tensor, block_threads: int = 128, threads=None):
    """The CUDA kernel's block-synchronous SAP run serially (``block_threads`` column slices, as the
    kernel's threads; the result does not depend on it: the argmin order is total). Otherwise as
    :func:`lap_solve`."""
    if int(block_threads) < 1:
        raise ValueError(f"block_threads must be >= 1, got {block_threads}")
    return _run("lap_solve_block_model", cost, threads, int(block_threads))
