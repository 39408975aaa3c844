"""The large-n auction LAP solver's CPU-runnable forms against scipy.

Two forms run here, both on CPU tensors: the torch model ``wweight.backends.torch.permute.lap_solve``
(batched forward/reverse auction with eps scaling and the dual certificate) and the CUDA kernel's own
solve (``wweight::lap::solve`` of csrc/lap_auction_elem.h) compiled into ``wweight._cpu`` as a serial
model (``wweight.backends.cuda.lap_auction.cpu_model_solve``). Every solved problem must reach scipy's
optimal value and come with duals that prove it (the rectangular LP dual); the kernel model must make
the torch model's rounds one for one.
"""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as sp_lsa

from wweight._ext import cpu_extension
from wweight.backends.cuda import lap_auction as glue
from wweight.backends.torch import permute as model

_cpu = cpu_extension()
requires_cpu_model = pytest.mark.skipif(_cpu is None or not hasattr(_cpu, "lap_auction_cpu"),
                                        reason="wweight._cpu without lap_auction_cpu (C++ extension not built)")


def make(kind, B, n, m, rng):
    """(B, n, m) float64 costs of one adversarial family."""
    s = (B, n, m)
    if kind == "float":
        return rng.random(s)
    if kind == "int_ties":
        return rng.integers(0, 4, s).astype(np.float64)
    if kind == "forbidden":
        c = rng.random(s)
        c[rng.random(s) < 0.35] = np.inf
        return c
    if kind == "forbidden_int":
        c = rng.integers(-5, 5, s).astype(np.float64)
        c[rng.random(s) < 0.5] = np.inf
        return c
    if kind == "tiny_range":
        return 1 + 1e-13 * rng.random(s)
    if kind == "offset_int":
        return 1e15 + rng.integers(0, 20, s).astype(np.float64)
    if kind == "col_scales":
        return rng.random(s) * 10.0 ** rng.uniform(-8, 8, (B, 1, m))
    if kind == "constant":
        return np.full(s, 3.25)
    if kind == "negative":
        return -1e3 * rng.random(s) - 1e6
    raise ValueError(kind)


def scipy_value(c):
    """Optimal value, or None when scipy says infeasible."""
    try:
        r, k = sp_lsa(c)
    except ValueError:
        return None
    return c[r, k].sum()


def check_solution(c, col, u, v, label):
    """col is a full optimal assignment (scipy's value) and (u, v) the duals that certify it."""
    n, m = c.shape
    col = col.numpy()
    assert len(set(col.tolist())) == n and col.min() >= 0 and col.max() < m, label
    assert np.isfinite(c[np.arange(n), col]).all(), label
    ref = scipy_value(c)
    fin = np.isfinite(c)
    scale = np.abs(c[fin]).max() if fin.any() else 1.0
    val = c[np.arange(n), col].sum()
    # same value as scipy up to float64 rounding of the sums (exact on integer costs)
    assert abs(val - ref) <= 1e-13 * n * max(scale, 1.0) + 4 * np.spacing(abs(ref)) * n, (label, val, ref)
    u, v = u.numpy(), v.numpy()
    tol = 64 * np.finfo(np.float64).eps * max(scale, 1.0)
    red = c - u[:, None] - v[None, :]
    assert (red[fin] >= -tol).all(), (label, red[fin].min())                     # dual feasible
    assert (np.abs(red[np.arange(n), col]) <= tol).all(), label                  # tight on the assignment
    assert (v <= 0).all(), label
    free = np.ones(m, dtype=bool)
    free[col] = False
    assert (v[free] == 0).all(), label                                             # v = 0 where unassigned


SHAPES = [(1, 1), (1, 7), (2, 2), (3, 5), (5, 5), (6, 11), (9, 9), (8, 13), (13, 20), (16, 16)]
# status 2 (the caller re-solves with scipy) allowed per 40 problems: column scales 1e-8..1e8 put
# differences that matter below float64 resolution of the prices (gap ~1e-6 at range 1e8: no auction
# eps resolves them), the other families are solved outright
FALLBACKS_ALLOWED = {"col_scales": 12}
# the kernel stops at its first certificate (eps = range / (8n)^2): on column scales most fall back
KERNEL_FALLBACKS_ALLOWED = {"col_scales": 40}
KINDS = ["float", "int_ties", "forbidden", "forbidden_int", "tiny_range", "offset_int", "col_scales", "constant",
         "negative"]


# 9 kinds x 10 shapes x 4 problems = 360 random problems per solver


@pytest.mark.parametrize("kind", KINDS)
def test_torch_model_matches_scipy(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    solved = feasible = 0
    for n, m in SHAPES:
        c = make(kind, 4, n, m, rng)
        cost = torch.from_numpy(c).contiguous()
        before = cost.clone()
        col, u, v, st = model.lap_solve(cost)
        assert torch.equal(cost, before)                                           # input untouched
        assert col.dtype == torch.long and u.dtype == v.dtype == torch.float64 and st.dtype == torch.int32
        for b in range(c.shape[0]):
            ref = scipy_value(c[b])
            if ref is None:
                assert int(st[b]) == 1, (kind, n, m, b)
                continue
            feasible += 1
            assert int(st[b]) in (0, 2), (kind, n, m, b)
            if int(st[b]) == 0:
                solved += 1
                check_solution(c[b], col[b], u[b], v[b], (kind, n, m, b))
    assert feasible - solved <= FALLBACKS_ALLOWED.get(kind, 1), (kind, solved, feasible)


@requires_cpu_model
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_model_matches_scipy_and_torch_rounds(kind):
    """The kernel's solve (serial C++ build) gives scipy's optimum, and exactly the torch model's rounds."""
    rng = np.random.default_rng(100 + KINDS.index(kind))
    fallbacks = 0
    for n, m in SHAPES:
        c = make(kind, 4, n, m, rng)
        cost = torch.from_numpy(c).contiguous()
        col, u, v, st = glue.cpu_model_solve(cost)
        counters = glue.last_counters.clone()
        for b in range(c.shape[0]):
            one = cost[b:b + 1].contiguous()
            ref = scipy_value(c[b])
            for k in model.stats:
                model.stats[k] = 0
            mcol, mu, mv, mst = model.lap_solve(one, first_try_only=True)
            if ref is None:
                assert int(st[b]) in (1, 2) and int(mst[0]) == 1, (kind, n, m, b)  # the kernel: 2 past the bound
                continue
            assert int(st[b]) == int(mst[0]), (kind, n, m, b)
            phases, rounds, rev, kst = counters[b].tolist()
            assert (phases, rounds, rev) == (model.stats["phases"], model.stats["rounds"],
                                             model.stats["reverse_rounds"]), (kind, n, m, b)
            if int(st[b]) == 0:
                assert torch.equal(col[b], mcol[0]), (kind, n, m, b)
                check_solution(c[b], col[b], u[b], v[b], (kind, n, m, b))
            else:
                fallbacks += 1
    assert fallbacks <= KERNEL_FALLBACKS_ALLOWED.get(kind, 4), (kind, fallbacks)


def test_infeasible():
    # a row without a finite entry; fewer usable columns than rows; a Hall violation (3 rows, 2 columns)
    c1 = np.array([[1.0, 2.0, 3.0], [np.inf, np.inf, np.inf]])
    c2 = np.array([[1.0, np.inf, np.inf], [2.0, np.inf, np.inf]])
    c3 = np.full((3, 5), np.inf)
    c3[:, :2] = [[1, 2], [3, 4], [5, 6]]
    c3[0, 4] = np.inf
    for c in (c1, c2, c3):
        with pytest.raises(ValueError):
            sp_lsa(c)
        _, _, _, st = model.lap_solve(torch.from_numpy(c)[None].contiguous())
        assert int(st[0]) == 1
    # feasible with a single finite entry in a row (the capped increment) and a forced column
    c4 = np.array([[np.inf, 5.0, np.inf, np.inf], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, np.inf, np.inf]])
    col, u, v, st = model.lap_solve(torch.from_numpy(c4)[None].contiguous())
    assert int(st[0]) == 0
    check_solution(c4, col[0], u[0], v[0], "c4")


def test_mixed_batch_and_transposed_contract():
    rng = np.random.default_rng(7)
    c = rng.random((5, 6, 9))
    c[1] = np.inf
    c[1, :, 0] = 1.0                                      # infeasible: 6 rows share one column
    c[3] = np.round(c[3] * 5)
    col, u, v, st = model.lap_solve(torch.from_numpy(c).contiguous())
    assert st.tolist() == [0, 1, 0, 0, 0]
    for b in (0, 2, 3, 4):
        check_solution(c[b], col[b], u[b], v[b], b)
    with pytest.raises(ValueError, match="n <= m"):
        model.lap_solve(torch.zeros(1, 3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        model.lap_solve(torch.zeros(1, 2, 2, dtype=torch.float32))


def test_rectangular_has_no_price_war():
    """256 x 384: the padded auction took 10k-17k rounds; forward/reverse takes a few hundred."""
    c = np.random.default_rng(0).random((1, 256, 384))
    for k in model.stats:
        model.stats[k] = 0
    col, u, v, st = model.lap_solve(torch.from_numpy(c))
    assert int(st[0]) == 0
    check_solution(c[0], col[0], u[0], v[0], "256x384")
    assert model.stats["rounds"] + model.stats["reverse_rounds"] < 2000, model.stats


def test_keys_order_and_truncate():
    inc = torch.tensor([1.0, 1.0, 2.0, 1.0 + 2.0 ** -40], dtype=torch.float64)
    key = model.pack_key(inc, torch.tensor([5, 3, 9, 0]))
    assert key.argmax().item() == 2                                        # larger value wins
    assert key[1] > key[0]                                                 # a tie: row 3 beats row 5
    # values that differ below the 36 kept mantissa bits tie, and then the lower index wins
    assert key[3] > key[1] and model.key_value(key[3:4]).item() == 1.0
    assert (model.key_value(key) <= inc).all() and (model.key_value(key) >= inc * (1 - 2.0 ** -36)).all()


def test_solve_square_max_still_works():
    b = torch.from_numpy(np.random.default_rng(3).random((3, 7, 7)))
    col, cert = model.solve_square_max(b)
    assert cert.all()
    for k in range(3):
        r, cc = sp_lsa(b[k].numpy(), maximize=True)
        assert np.isclose(b[k].numpy()[np.arange(7), col[k].numpy()].sum(), b[k].numpy()[r, cc].sum())
