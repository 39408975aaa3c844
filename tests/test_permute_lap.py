"""Exact linear sum assignment: every solver path against scipy's optimum (an independent solver), the dual
certificate against duals computed by an independent Hungarian method, scipy fallbacks, adversarial costs."""
import zlib
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as sp_lsa

import wweight
import wweight.permute.lap as lap_op
from wweight.permute.lap_certify import certify
from wweight.reference.permute import lap_reference

# every solver this checkout has (the C++ one once wweight._cpu carries it)
SOLVERS = {"auto": {}, "scipy": {"method": "scipy"}, "auction": {"method": "auction"}, "sap": {"method": "sap"}}
if lap_op._module("cpu") is not None:
    SOLVERS["cpu"] = {"backend": "cpu"}


def _value(c: np.ndarray, r, cc) -> float:
    """Exactly rounded total (math.fsum): the comparison is not blurred by summation order."""
    return math.fsum(c[np.asarray(r), np.asarray(cc)].tolist())


def _check(cost: torch.Tensor, maximize: bool, r: torch.Tensor, c: torch.Tensor, rel: float = 1e-12):
    """(r, c) is a valid assignment whose value equals scipy's optimum to ``rel`` of the cost scale."""
    cost64 = cost.double().numpy()
    batch = cost64[None] if cost64.ndim == 2 else cost64
    r2 = r[None] if r.dim() == 1 else r
    c2 = c[None] if c.dim() == 1 else c
    k = min(batch.shape[1:])
    assert r2.shape == (batch.shape[0], k) and c2.shape == r2.shape
    assert r2.dtype == torch.long and c2.dtype == torch.long
    for b in range(batch.shape[0]):
        rb, cb = r2[b].numpy(), c2[b].numpy()
        assert (np.diff(rb) > 0).all(), "row_ind must be sorted and unique"
        assert len(np.unique(cb)) == k, "col_ind must be unique"
        want = _value(batch[b], *sp_lsa(batch[b], maximize=maximize))
        got = _value(batch[b], rb, cb)
        fin = np.abs(batch[b][np.isfinite(batch[b])])
        scale = float(fin.max()) if fin.size else 1.0
        assert abs(got - want) <= rel * scale * k, (b, got, want)


CASES = {
    "random": lambda g: torch.rand(3, 40, 40, generator=g, dtype=torch.float64),
    "integer_ties": lambda g: torch.randint(0, 4, (3, 40, 40), generator=g).double(),
    "integer_wide": lambda g: torch.randint(-1000, 1000, (2, 50, 50), generator=g).double(),
    "constant": lambda g: torch.full((2, 17, 17), 3.5, dtype=torch.float64),
    "rank_one": lambda g: torch.outer(torch.rand(30, generator=g), torch.rand(30, generator=g)).double()[None],
    "wide": lambda g: torch.randn(2, 13, 29, generator=g, dtype=torch.float64),
    "tall": lambda g: torch.randn(2, 29, 13, generator=g, dtype=torch.float64),
    "float32": lambda g: torch.randn(2, 45, 45, generator=g),
    "large_offset": lambda g: 1e6 + torch.rand(1, 30, 30, generator=g, dtype=torch.float64),
    "one": lambda g: torch.randn(2, 1, 1, generator=g),
    "one_row": lambda g: torch.randn(1, 1, 7, generator=g),
    "one_col": lambda g: torch.randn(2, 6, 1, generator=g),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_lap_matches_scipy(case, maximize, solver):
    g = torch.Generator().manual_seed(list(CASES).index(case))
    cost = CASES[case](g)
    r, c = wweight.linear_sum_assignment(cost, maximize=maximize, **SOLVERS[solver])
    _check(cost, maximize, r, c)
    r1, c1 = wweight.linear_sum_assignment(cost[0], maximize=maximize, **SOLVERS[solver])
    _check(cost[0], maximize, r1, c1)


def _forbid(cost: torch.Tensor, frac: float, g: torch.Generator, maximize: bool) -> torch.Tensor:
    bad = torch.rand(cost.shape, generator=g) < frac
    return cost.masked_fill(bad, float("-inf") if maximize else float("inf"))


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("maximize", [False, True])
def test_forbidden_pairs_feasible_and_infeasible(solver, maximize):
    """+inf (-inf when maximising) entries are forbidden pairs; the answer avoids them and is optimal; a batch
    with an infeasible problem names it, the single form raises scipy's message."""
    g = torch.Generator().manual_seed(7)
    for shape in ((6, 20, 20), (4, 9, 15), (4, 15, 9)):
        cost = _forbid(torch.rand(shape, generator=g, dtype=torch.float64), 0.5, g, maximize)
        feas = []
        for b in range(shape[0]):
            try:
                sp_lsa(cost[b].numpy(), maximize=maximize)
                feas.append(True)
            except ValueError as e:
                assert str(e) == "cost matrix is infeasible"
                feas.append(False)
        ok = torch.tensor(feas)
        r, c = wweight.linear_sum_assignment(cost[ok], maximize=maximize, **SOLVERS[solver])
        _check(cost[ok], maximize, r, c)
        assert torch.isfinite(cost[ok][torch.arange(int(ok.sum()))[:, None], r, c]).all()
        if not ok.all():
            first = int((~ok).nonzero()[0, 0])
            with pytest.raises(ValueError, match=rf"cost matrix is infeasible \(batch index {first}\b"):
                wweight.linear_sum_assignment(cost, maximize=maximize, **SOLVERS[solver])
            with pytest.raises(ValueError, match="^cost matrix is infeasible$"):
                wweight.linear_sum_assignment(cost[first], maximize=maximize, **SOLVERS[solver])


# ---------------------------------------------------------------------------------------------
# the certificate


def hungarian_duals(c: np.ndarray):
    """Optimal assignment and LP duals of min c (n <= m, +inf forbidden): the O(n^2 m) Hungarian method with
    potentials (Kuhn-Munkres as in Jonker-Volgenant's shortest augmenting paths). Its duals satisfy
    u_i + v_j <= c_ij, equality on the assignment, v <= 0 and v == 0 on unassigned columns: the contract's."""
    n, m = c.shape
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)      # p[j]: 1-based row on column j (0: none); column 0 is the root
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = c[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            upd = free & (cur < minv[1:])
            minv[1:][upd] = cur[upd]
            way[1:][upd] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            if not np.isfinite(delta):
                raise ValueError("infeasible")
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = np.zeros(n, dtype=np.int64)
    for j in range(1, m + 1):
        if p[j]:
            col[p[j] - 1] = j - 1
    return col, u[1:], v[1:]


def _cert(c, col, u, v):
    """The verdict of certify on one problem; its numpy (CPU) and torch (device) forms must agree."""
    t = lambda x, dt: torch.as_tensor(np.asarray(x), dtype=dt)[None]  # noqa: E731
    args = (t(c, torch.float64), t(col, torch.long), t(u, torch.float64), t(v, torch.float64))
    a, b = bool(certify(*args)[0]), bool(certify(*args, _force_torch=True)[0])
    assert a == b
    return a


@pytest.mark.parametrize("shape", [(12, 12), (9, 16), (1, 5), (30, 30)])
@pytest.mark.parametrize("kind", ["rand", "int_ties", "forbidden", "offset"])
def test_certify_accepts_scipy_optimum_with_independent_duals(shape, kind):
    """scipy's optimal assignment with Hungarian duals (an independent computation: any optimal dual
    certifies any optimal assignment) is accepted; the Hungarian assignment has scipy's value."""
    rng = np.random.default_rng(zlib.crc32(repr((shape, kind)).encode()))
    c = rng.random(shape)
    if kind == "int_ties":
        c = rng.integers(0, 3, shape).astype(np.float64)
    elif kind == "forbidden":
        c[rng.random(shape) < 0.3] = np.inf
        c[np.arange(shape[0]), np.arange(shape[0])] = rng.random(shape[0])  # keep it feasible
    elif kind == "offset":
        c = 1e15 + rng.integers(0, 100, shape).astype(np.float64)
    col_h, u, v = hungarian_duals(c)
    _, col_s = sp_lsa(c)
    assert _value(c, np.arange(shape[0]), col_h) == _value(c, np.arange(shape[0]), col_s)
    assert _cert(c, col_s, u, v) and _cert(c, col_h, u, v)


def test_certify_rejects_wrong_duals_and_suboptimal_assignments():
    rng = np.random.default_rng(3)
    c = rng.random((20, 26))
    col, u, v = hungarian_duals(c)
    assert _cert(c, col, u, v)
    bad = col.copy()
    bad[[0, 1]] = bad[[1, 0]]                         # a swap of the optimum: strictly worse on random costs
    assert not _cert(c, bad, u, v)
    free = np.setdiff1d(np.arange(26), col)
    moved = col.copy()
    moved[0] = free[0]                                # onto an unassigned column: worse
    assert not _cert(c, moved, u, v)
    assert not _cert(c, col, u + 1e-6, v)             # infeasible duals
    assert not _cert(c, col, u - 1e-6, v)             # complementary slackness broken
    v2 = v.copy()
    v2[free[0]] = -1e-3                               # v != 0 on an unassigned column
    assert not _cert(c, col, u, v2)
    assert not _cert(c, col, u - 1.0, v + 1.0)        # v > 0 (fine for square problems only)
    dup = col.copy()
    dup[1] = dup[0]                                   # not injective
    assert not _cert(c, dup, u, v)
    oob = col.copy()
    oob[0] = 26                                       # out of range
    assert not _cert(c, oob, u, v)
    u3 = u.copy()
    u3[0] = np.nan
    assert not _cert(c, col, u3, v)
    c4 = c.copy()
    c4[0, col[0]] = np.inf                            # assigned to a forbidden pair
    assert not _cert(c4, col, u, v)
    # a suboptimal assignment with its own "best" duals of a wrong problem cannot pass
    sq = rng.random((15, 15))
    col_s, us, vs = hungarian_duals(sq)
    perm = np.roll(col_s, 1)
    assert _value(sq, np.arange(15), perm) > _value(sq, np.arange(15), col_s)
    assert not _cert(sq, perm, us, vs)


def test_certify_batch_and_chunks(monkeypatch):
    """Row blocks (a small chunk) give the same verdicts, per problem of a batch."""
    import wweight.permute.lap_certify as lc

    rng = np.random.default_rng(4)
    cs, cols, us, vs = [], [], [], []
    for b in range(5):
        c = rng.random((11, 13))
        col, u, v = hungarian_duals(c)
        if b % 2:
            col[[0, 1]] = col[[1, 0]]
        cs.append(c), cols.append(col), us.append(u), vs.append(v)
    args = (torch.tensor(np.stack(cs)), torch.tensor(np.stack(cols)), torch.tensor(np.stack(us)),
            torch.tensor(np.stack(vs)))
    want = [True, False, True, False, True]
    assert certify(*args).tolist() == want and certify(*args, _force_torch=True).tolist() == want
    monkeypatch.setattr(lc, "_CHUNK", 7)
    assert certify(*args).tolist() == want and certify(*args, _force_torch=True).tolist() == want


def test_uncertified_answers_are_resolved_by_scipy_and_counted(monkeypatch):
    """A certificate that never passes must route every problem to scipy, never return it as is."""
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(3, 30, 30, generator=g, dtype=torch.float64)

    def wrong(c):  # a solver of the lap_solve contract that returns a non-optimal answer
        B, n, m = c.shape
        col = torch.arange(n).repeat(B, 1)
        return col, torch.zeros(B, n, dtype=torch.float64), torch.zeros(B, m, dtype=torch.float64), \
            torch.zeros(B, dtype=torch.int32)

    monkeypatch.setattr(lap_op, "_pick", lambda dev, want, method: ("auction", wrong))
    before = dict(lap_op.stats)
    r, c = wweight.linear_sum_assignment(cost)
    _check(cost, False, r, c)
    assert lap_op.stats["fallbacks"] - before["fallbacks"] == 3
    assert lap_op.stats["certified"] == before["certified"]


def test_solver_status_gave_up_and_infeasible_claims_are_checked_by_scipy(monkeypatch):
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(4, 8, 10, generator=g, dtype=torch.float64)
    cost[3, :, :] = float("inf")                      # really infeasible

    def claims(c):  # status 2 (gave up) and 1 (infeasible) for every problem: scipy decides
        B, n, m = c.shape
        st = torch.tensor([2, 1, 2, 1], dtype=torch.int32)[:B]
        return torch.arange(n).repeat(B, 1), torch.zeros(B, n), torch.zeros(B, m), st

    monkeypatch.setattr(lap_op, "_pick", lambda dev, want, method: ("auction", claims))
    before = dict(lap_op.stats)
    with pytest.raises(ValueError, match=r"infeasible \(batch index 3\)"):
        wweight.linear_sum_assignment(cost)
    assert lap_op.stats["fallbacks"] - before["fallbacks"] == 3   # problem 3's claim was right
    r, c = wweight.linear_sum_assignment(cost[:3])
    _check(cost[:3], False, r, c)


# ---------------------------------------------------------------------------------------------
# adversarial costs of issue 12


def _adversarial(g, rng):
    n = 24
    return {
        "tiny_range": 1 + 1e-13 * torch.rand(2, n, n, generator=g, dtype=torch.float64),
        "offset_1e15_int": 1e15 + torch.randint(0, 50, (2, n, n), generator=g).double(),
        "column_scales": torch.rand(2, n, n, generator=g, dtype=torch.float64)
        * torch.logspace(-8, 8, n, dtype=torch.float64),
        "ties": torch.randint(0, 2, (2, n, n), generator=g).double(),
        "constant": torch.full((2, n, n), -7.25, dtype=torch.float64),
        "tiny_range_rect": 1 + 1e-13 * torch.rand(2, 10, n, generator=g, dtype=torch.float64),
        "offset_rect_tall": 1e15 + torch.randint(0, 9, (2, n, 10), generator=g).double(),
    }


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("maximize", [False, True])
def test_adversarial_costs_every_answer_optimal(solver, maximize):
    """Values equal scipy's within 4 ulps of the cost scale per row (float64 cannot resolve more: the
    exact optimum of such costs may be 1 ulp away from another assignment); the scipy path is exact."""
    g = torch.Generator().manual_seed(11)
    for name, cost in _adversarial(g, None).items():
        r, c = wweight.linear_sum_assignment(cost, maximize=maximize, **SOLVERS[solver])
        _check(cost, maximize, r, c, rel=0.0 if solver == "scipy" else 4 * 2.0 ** -52)


def test_numpy_in_numpy_out_and_reference_backend():
    c = np.random.default_rng(0).random((12, 9))
    r, cc = wweight.linear_sum_assignment(c)
    assert isinstance(r, np.ndarray) and isinstance(cc, np.ndarray) and r.dtype == np.int64
    assert _value(c, r, cc) == _value(c, *sp_lsa(c))
    t = torch.from_numpy(c)
    r2, c2 = wweight.linear_sum_assignment(t, backend="reference")
    rr, cr = lap_reference(t)
    assert torch.equal(r2, rr) and torch.equal(c2, cr)


def test_inputs_untouched():
    for c in (torch.rand(3, 10, 10), torch.rand(3, 10, 7, dtype=torch.float64), np.random.rand(6, 4)):
        c0 = c.copy() if isinstance(c, np.ndarray) else c.clone()
        for method in ("auto", "auction"):
            for mx in (False, True):
                wweight.linear_sum_assignment(c, maximize=mx, method=method)
        assert (c == c0).all()


def test_wweight_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        wweight.linear_sum_assignment(torch.zeros(2, 2), method="hungarian")
    with pytest.raises(ValueError, match="backend must be one of"):
        wweight.linear_sum_assignment(torch.zeros(2, 2), backend="nope")
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        wweight.linear_sum_assignment(torch.zeros(2, 2), backend="cuda")
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        wweight.linear_sum_assignment(torch.zeros(2, 2), backend="triton")


def test_custom_op_fake_shapes():
    """The torch.library op traces with fake tensors: (B, min(n, m)) indices and a (B,) status."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        c = torch.empty(4, 7, 5, dtype=torch.float64)
        r, cc, st = lap_op._lap_op(c, True, "torch", "auto")
    assert r.shape == (4, 5) and cc.shape == (4, 5) and r.dtype == torch.long and st.shape == (4,)


def test_dispatch_runs_a_lap_solve_backend_and_certifies_it(monkeypatch):
    """CPU auto picks a cpu module speaking lap_solve when it is available() (here a stand-in returning
    Hungarian duals), certifies its answers without scipy; a module without lap_solve / unavailable -> scipy."""
    import types

    from wweight import _dispatch

    calls = []

    def lap_solve(c):
        calls.append(tuple(c.shape))
        out = [hungarian_duals(x) for x in c.numpy()]
        col, u, v = (torch.tensor(np.stack(z)) for z in zip(*out))
        return col, u, v, torch.zeros(c.shape[0], dtype=torch.int32)

    fake = types.SimpleNamespace(lap_solve=lap_solve, available=lambda: True, stats={})
    real = _dispatch.backend_module
    monkeypatch.setattr(_dispatch, "backend_module", lambda fam, name: fake if name == "cpu" else real(fam, name))
    g = torch.Generator().manual_seed(9)
    cost = torch.rand(3, 12, 7, generator=g, dtype=torch.float64)
    before = dict(lap_op.stats)
    r, c = wweight.linear_sum_assignment(cost, maximize=True)
    _check(cost, True, r, c)
    assert calls == [(3, 7, 12)]                                  # transposed, n <= m, minimised
    assert lap_op.stats["cpu"] - before["cpu"] == 3 and lap_op.stats["certified"] - before["certified"] == 3
    assert lap_op.stats["fallbacks"] == before["fallbacks"]
    fake.available = lambda: False
    wweight.linear_sum_assignment(cost)
    assert len(calls) == 1 and lap_op.stats["scipy"] - before["scipy"] == 3
    with pytest.raises(RuntimeError, match="C\\+\\+ CPU extension has no LAP solver"):
        wweight.linear_sum_assignment(cost, backend="cpu")


def test_constant_matrices_get_the_identity_whatever_the_solver(monkeypatch):
    """scipy returns the identity on a constant matrix (its #11602 test); a solver that picks another (equally
    optimal) assignment is overridden, square and rectangular, both orientations."""
    def reverse(c):
        B, n, m = c.shape
        col = torch.arange(n - 1, -1, -1).repeat(B, 1)
        return col, torch.zeros(B, n), torch.zeros(B, m), torch.zeros(B, dtype=torch.int32)

    monkeypatch.setattr(lap_op, "_pick", lambda dev, want, method: ("auction", reverse))
    for shape in ((8, 8), (3, 5), (5, 3)):
        for mx in (False, True):
            r, c = wweight.linear_sum_assignment(torch.full(shape, 2.5), maximize=mx)
            r0, c0 = sp_lsa(np.full(shape, 2.5), maximize=mx)
            assert r.tolist() == r0.tolist() and c.tolist() == c0.tolist()
    cost = torch.full((2, 6, 6), 1.0)
    cost[1, 0, 1] = 0.0                                   # not constant: the solver's answer is kept if optimal
    r, c = wweight.linear_sum_assignment(cost)
    assert c[0].tolist() == list(range(6))
    _check(cost, False, r, c)
