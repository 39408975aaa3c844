"""Exact linear sum assignment: every solver path against scipy's optimum (an independent solver)."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as sp_lsa

import wweight
import wweight.backends.torch.permute as lap
import wweight.permute.lap as lap_op
from wweight.reference.permute import lap_reference


def _scipy_value(c: np.ndarray, maximize: bool) -> float:
    r, cc = sp_lsa(c, maximize=maximize)
    return float(c[r, cc].sum())


def _check(cost: torch.Tensor, maximize: bool, r: torch.Tensor, c: torch.Tensor):
    """(r, c) is a valid assignment whose value equals scipy's optimum."""
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
        want = _scipy_value(batch[b], maximize)
        got = float(batch[b][rb, cb].sum())
        assert got == pytest.approx(want, rel=1e-10, abs=1e-9), (b, got, want)


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
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("method", ["auto", "auction"])
def test_lap_matches_scipy(case, maximize, method):
    g = torch.Generator().manual_seed(list(CASES).index(case))
    cost = CASES[case](g)
    r, c = wweight.linear_sum_assignment(cost, maximize=maximize, method=method)
    _check(cost, maximize, r, c)
    # single-problem form
    r1, c1 = wweight.linear_sum_assignment(cost[0], maximize=maximize, method=method)
    _check(cost[0], maximize, r1, c1)


def test_auction_certifies_without_fallback():
    """The auction + certificate itself (no scipy rescue) solves typical problems."""
    g = torch.Generator().manual_seed(0)
    for cost in (torch.rand(4, 50, 50, generator=g, dtype=torch.float64),
                 torch.randint(0, 3, (4, 50, 50), generator=g).double(),
                 torch.randn(16, 16, 16, generator=g, dtype=torch.float64)):
        col, cert = lap._auction_batched(cost)
        assert bool(cert.all())
        rows = torch.arange(cost.shape[1]).expand(cost.shape[0], -1)
        _check(cost, True, rows, col)


def test_failed_certificate_falls_back_to_scipy(monkeypatch):
    """A certificate that never passes must route the problem to scipy, never return it as is."""
    monkeypatch.setattr(lap, "_certify", lambda a, col, price, it: torch.zeros(a.shape[0], dtype=torch.bool))
    before = lap.stats["fallbacks"]
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(3, 30, 30, generator=g, dtype=torch.float64)
    r, c = wweight.linear_sum_assignment(cost, method="auction")
    _check(cost, False, r, c)
    assert lap.stats["fallbacks"] - before == 3


def test_certificate_rejects_suboptimal_assignment():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 20, 20, generator=g, dtype=torch.float64)
    opt = torch.from_numpy(sp_lsa(a[0].numpy(), maximize=True)[1])[None]
    bad = opt.clone()
    bad[0, [0, 1]] = bad[0, [1, 0]]  # a swap of the optimum is strictly worse for random costs
    assert bool(lap._certify(a, opt, torch.zeros(1, 20, dtype=torch.float64), 200).all())
    assert not bool(lap._certify(a, bad, torch.zeros(1, 20, dtype=torch.float64), 200).any())


def test_numpy_in_numpy_out_and_reference_backend():
    c = np.random.default_rng(0).random((12, 9))
    r, cc = wweight.linear_sum_assignment(c)
    assert isinstance(r, np.ndarray) and isinstance(cc, np.ndarray)
    assert c[r, cc].sum() == pytest.approx(_scipy_value(c, False))
    t = torch.from_numpy(c)
    r2, c2 = wweight.linear_sum_assignment(t, backend="reference")
    rr, cr = lap_reference(t)
    assert torch.equal(r2, rr) and torch.equal(c2, cr)


def test_empty():
    r, c = wweight.linear_sum_assignment(torch.zeros(0, 5))
    assert r.shape == (0,) and c.shape == (0,)


def test_inputs_untouched():
    c = torch.rand(3, 10, 10)
    c0 = c.clone()
    wweight.linear_sum_assignment(c, maximize=True, method="auction")
    assert torch.equal(c, c0)


@pytest.mark.parametrize("bad,err", [
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "Inf"),
    (torch.zeros(3), "2-D"),
    (torch.zeros(2, 2, 2, 2), "2-D"),
])
def test_bad_cost(bad, err):
    with pytest.raises(ValueError, match=err):
        wweight.linear_sum_assignment(bad)


def test_bad_arguments():
    with pytest.raises(TypeError, match="cost"):
        wweight.linear_sum_assignment([[1.0, 2.0]])
    with pytest.raises(ValueError, match="method"):
        wweight.linear_sum_assignment(torch.zeros(2, 2), method="hungarian")
    with pytest.raises(TypeError, match="maximize"):
        wweight.linear_sum_assignment(torch.zeros(2, 2), maximize="yes")
    with pytest.raises(ValueError, match="backend"):
        wweight.linear_sum_assignment(torch.zeros(2, 2), backend="nope")


def test_custom_op_fake_shapes():
    """The torch.library op traces with fake tensors (shape (B, min(n, m)))."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        c = torch.empty(4, 7, 5)
        r, cc = lap_op._lap_op(c, True, "torch", "auto")
    assert r.shape == (4, 5) and cc.shape == (4, 5) and r.dtype == torch.long
