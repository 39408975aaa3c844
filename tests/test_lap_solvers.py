"""The exact LAP solvers of the permute backends against scipy itself.

``jv``: the C++ LAPJV solver (``wweight.backends.cpu.permute.lap_solve``); ``block``: the CUDA
kernel's algorithm run serially on CPU (``lap_solve_block_model``, the same ``csrc/lap_elem.h`` steps
as ``csrc/lap.cu``). Each result is checked three ways: the optimal value equals scipy's, ``col`` is
an injective assignment, and the returned duals certify it (the backend contract).
"""
import sys
import types

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as sp_lsa

from wweight.backends.cpu import permute as cp

pytestmark = pytest.mark.skipif(not cp.available(), reason="wweight._cpu is not built or has no lap_solve")

SOLVERS = {"jv": cp.lap_solve, "block": lambda c: cp.lap_solve_block_model(c, block_threads=32)}


def scipy_value(a):
    """scipy's optimal value of (n, m) ``a`` (either orientation), or None when it says infeasible."""
    try:
        r, c = sp_lsa(a)
    except ValueError as e:
        assert "infeasible" in str(e)
        return None
    return a[r, c].sum()


def check_problem(a, col, u, v, status, offset=0.0):
    """One (n, m) problem, n <= m: status, assignment, value vs scipy and the dual certificate."""
    n, m = a.shape
    ref = scipy_value(a)
    if ref is None:
        assert status == 1, "scipy: infeasible, solver did not say so"
        return
    assert status == 0, f"status {status} on a feasible problem"
    assert col.min() >= 0 and col.max() < m and len(np.unique(col)) == n, "not an injective assignment"
    got_entries = a[np.arange(n), col]
    assert np.isfinite(got_entries).all(), "assigned a forbidden pair"
    fin = np.isfinite(a)
    scale = max(1.0, np.abs(a[fin]).max() if fin.any() else 1.0)
    if offset:  # integer costs on a huge offset: compare exactly, without the offset
        r, c = sp_lsa(a)
        assert (got_entries - offset).sum() == (a[r, c] - offset).sum()
    else:
        assert abs(got_entries.sum() - ref) <= 1e-12 * scale * n, (got_entries.sum(), ref)
    tol = 1e-11 * scale * max(n, 1)
    red = a - u[:, None] - v[None, :]
    assert red[fin].min() >= -tol, f"dual infeasible by {red[fin].min()}"
    assert np.abs(red[np.arange(n), col]).max() <= tol, "duals not tight on the assignment"
    assert v.max() <= 0.0, "v must be <= 0"
    free = np.setdiff1d(np.arange(m), col)
    assert (v[free] == 0).all(), "v must be 0 on unassigned columns"


def solve_check(solver, a3, offset=0.0):
    """Solve a (B, n, m) numpy batch (n > m: transposed here, as the caller does) and check each problem."""
    t = torch.from_numpy(np.ascontiguousarray(a3, dtype=np.float64))
    transposed = t.shape[1] > t.shape[2]
    if transposed:
        t = t.transpose(1, 2).contiguous()
    before = t.clone()
    col, u, v, status = SOLVERS[solver](t)
    assert torch.equal(t, before), "the solver modified its input"
    assert col.dtype == torch.int64 and u.dtype == v.dtype == torch.float64 and status.dtype == torch.int32
    assert col.shape == t.shape[:2] and u.shape == t.shape[:2] and v.shape == (t.shape[0], t.shape[2])
    for b in range(t.shape[0]):
        check_problem(t[b].numpy(), col[b].numpy(), u[b].numpy(), v[b].numpy(), int(status[b]), offset)
    return col, status


def random_shape(rng, nmax=40):
    n = int(rng.integers(1, nmax + 1))
    kind = rng.integers(0, 3)  # square, wide, tall
    m = n if kind == 0 else int(rng.integers(1, nmax + 1))
    return n, m


def gen(kind, rng, B, n, m):
    if kind == "float":
        return rng.standard_normal((B, n, m))
    if kind == "int_ties":
        return rng.integers(0, 4, (B, n, m)).astype(np.float64)
    if kind == "constant":
        return np.full((B, n, m), float(rng.integers(-3, 4)))
    if kind == "tiny_range":
        return 1.0 + 1e-13 * rng.random((B, n, m))
    if kind == "col_scales":
        return rng.random((B, n, m)) * 10.0 ** rng.uniform(-8, 8, (B, 1, m))
    if kind == "forbidden_feasible":  # every problem keeps one finite injective assignment
        a = rng.random((B, n, m))
        a[rng.random((B, n, m)) < 0.7] = np.inf
        k = min(n, m)
        for b in range(B):
            rows, cols = rng.permutation(n)[:k], rng.permutation(m)[:k]
            a[b, rows, cols] = rng.random(k)
        return a
    if kind == "forbidden_random":  # often infeasible
        a = rng.integers(0, 10, (B, n, m)).astype(np.float64)
        a[rng.random((B, n, m)) < 0.6] = np.inf
        return a
    raise ValueError(kind)


KINDS = ["float", "int_ties", "constant", "tiny_range", "col_scales", "forbidden_feasible", "forbidden_random"]


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("kind", KINDS)
def test_random_problems_match_scipy(solver, kind):
    rng = np.random.default_rng(KINDS.index(kind))
    for _ in range(30):  # 30 batches x 1-8 problems per kind and solver
        n, m = random_shape(rng)
        solve_check(solver, gen(kind, rng, int(rng.integers(1, 9)), n, m))


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_infeasible_exactly_when_scipy_says_so(solver):
    rng = np.random.default_rng(7)
    seen = {0: 0, 1: 0}
    for _ in range(40):
        n, m = random_shape(rng, 12)
        a = gen("forbidden_random", rng, 4, n, m)
        _, status = solve_check(solver, a)
        for s in status.tolist():
            seen[s] += 1
    assert seen[0] > 10 and seen[1] > 10, seen  # both outcomes are exercised
    # structural cases: a forbidden row, a forbidden column of a square problem, Hall's condition
    a = np.ones((3, 4))
    a[1] = np.inf
    solve_check(solver, a[None])
    a = np.ones((3, 3))
    a[:, 2] = np.inf
    solve_check(solver, a[None])
    a = np.ones((3, 5))
    a[:, 2:] = np.inf  # three rows, two usable columns
    _, status = solve_check(solver, a[None])
    assert status.tolist() == [1]


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_huge_offset_integer_costs_exact(solver):
    rng = np.random.default_rng(3)
    for _ in range(8):
        n, m = random_shape(rng, 30)
        a = 1e15 + rng.integers(0, 50, (3, n, m)).astype(np.float64)
        solve_check(solver, a, offset=1e15)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_batch_64_and_sizes_up_to_300(solver):
    rng = np.random.default_rng(11)
    solve_check(solver, rng.random((64, 24, 24)))
    solve_check(solver, rng.random((64, 10, 17)))
    for n, m in ((1, 1), (1, 9), (300, 300), (120, 300), (257, 130)):
        solve_check(solver, rng.random((1, n, m)))
    solve_check(solver, rng.integers(0, 20, (2, 200, 200)).astype(np.float64))


def test_block_model_independent_of_thread_count():
    # the kernel's argmin order is total, so its block reduction (any shape) settles the same column as
    # a serial scan: the model returns the very same assignment and duals for every slice count
    rng = np.random.default_rng(5)
    for a in (rng.random((6, 40, 55)), rng.integers(0, 3, (6, 40, 40)).astype(np.float64)):
        t = torch.from_numpy(a)
        outs = [cp.lap_solve_block_model(t, block_threads=T) for T in (1, 7, 32, 128, 512)]
        for o in outs[1:]:
            for x, y in zip(outs[0], o):
                assert torch.equal(x, y)


def test_batch_result_independent_of_openmp_threads():
    t = torch.rand((40, 30, 45), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for f in (cp.lap_solve, cp.lap_solve_block_model):
        one, two = f(t, threads=1), f(t, threads=2)
        for x, y in zip(one, two):
            assert torch.equal(x, y)


def test_empty_and_trivial_batches():
    for f in SOLVERS.values():
        col, u, v, status = f(torch.zeros((0, 3, 4), dtype=torch.float64))
        assert col.shape == (0, 3) and v.shape == (0, 4) and status.shape == (0,)
        col, u, v, status = f(torch.zeros((2, 0, 4), dtype=torch.float64))
        assert col.shape == (2, 0) and (v == 0).all() and (status == 0).all()


def test_bad_input_names_the_argument():
    good = torch.zeros((1, 2, 3), dtype=torch.float64)
    with pytest.raises(ValueError, match="n <= m"):
        cp.lap_solve(good.transpose(1, 2).contiguous())
    with pytest.raises(TypeError, match="float64"):
        cp.lap_solve(good.float())
    with pytest.raises(ValueError, match=r"\(B, n, m\)"):
        cp.lap_solve(good[0])
    with pytest.raises(ValueError, match="contiguous"):
        cp.lap_solve(torch.zeros((1, 3, 4), dtype=torch.float64)[:, :, :3])
    with pytest.raises(ValueError, match="block_threads"):
        cp.lap_solve_block_model(good, block_threads=0)
    with pytest.raises(ValueError, match="threads"):
        cp.lap_solve(good, threads=-1)


def test_missing_extension_function_raises(monkeypatch):
    monkeypatch.setattr(cp, "cpu_extension", lambda: types.SimpleNamespace())
    assert not cp.available()
    with pytest.raises(RuntimeError, match="LAP solver is not available"):
        cp.lap_solve(torch.zeros((1, 2, 2), dtype=torch.float64))


def test_stats_count_the_work():
    before = dict(cp.stats)
    cp.lap_solve(torch.rand((5, 30, 30), dtype=torch.float64))
    assert cp.stats["problems"] == before["problems"] + 5
    assert cp.stats["augmentations"] + cp.stats["arr_steps"] > before["augmentations"] + before["arr_steps"]


def test_cuda_selftest_passes_on_the_cpu_model():
    # a wrong self-test would disable a good kernel on the first GPU run: it must pass on the model
    from wweight.backends.cuda import permute as gp

    model = types.SimpleNamespace(lap_solve=lambda c: cp.lap_solve_block_model(c, block_threads=64))
    assert gp.selftest(torch.device("cpu"), prims=model)
    broken = types.SimpleNamespace(lap_solve=lambda c: tuple(
        x.flip(-1) if i == 0 else x for i, x in enumerate(cp.lap_solve(c))))
    assert not gp.selftest(torch.device("cpu"), prims=broken)  # the self-test can fail


def test_cuda_glue_routes_large_problems_to_the_auction(monkeypatch):
    # without a GPU: a fake extension and a fake lap_auction module record where each problem goes
    from wweight.backends.cuda import permute as gp

    calls = []
    ext = types.SimpleNamespace(lap_scratch_bytes=lambda B, m: 0 if m <= 64 else B * m * 25,
                                lap_solve=lambda *a: calls.append(("kernel", a[1], a[8] != 0)))
    monkeypatch.setattr(gp, "cuda_extension", lambda: ext)
    monkeypatch.setattr(gp, "stream", lambda t: 0)
    monkeypatch.setattr(gp, "_check", lambda c: tuple(c.shape))
    assert getattr(gp.lap_solve, "device_guarded", False)
    gp.lap_solve(torch.zeros((3, 8, 8), dtype=torch.float64))
    # no auction module (an ImportError): the kernel runs with its column state in global scratch
    monkeypatch.setitem(sys.modules, "wweight.backends.cuda.lap_auction", None)
    assert gp._auction() is None
    gp.lap_solve(torch.zeros((2, 8, 100), dtype=torch.float64))
    fake = types.ModuleType("wweight.backends.cuda.lap_auction")
    fake.auction_lap_solve = lambda c: calls.append(("auction", c.shape[0])) or "auction result"
    monkeypatch.setitem(sys.modules, "wweight.backends.cuda.lap_auction", fake)
    assert gp.lap_solve(torch.zeros((2, 8, 100), dtype=torch.float64)) == "auction result"
    assert gp.lap_solve(torch.zeros((1, gp.AUCTION_MIN_N, gp.AUCTION_MIN_N), dtype=torch.float64)) == "auction result"
    gp.lap_solve(torch.zeros((4, 8, 8), dtype=torch.float64))
    assert calls == [("kernel", 3, False), ("kernel", 2, True), ("auction", 2), ("auction", 1), ("kernel", 4, False)]
