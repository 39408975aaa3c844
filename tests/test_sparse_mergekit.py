"""wweight's sparse reference against mergekit 0.1.5 itself (the peer that defines the semantics).

mergekit's random masks come from ``torch.bernoulli``; here it is patched to draw from the same
Philox stream wweight uses, so DARE / DELLA merges are compared number for number too. Ties at a
magnitude cut are avoided in the exact comparisons (mergekit's unstable sort breaks them
arbitrarily), and checked separately for the documented rule.
"""
import zlib
import contextlib
import random

import pytest
import torch

import wweight
from wweight.reference.philox import philox_uniform

mk_sparsify = pytest.importorskip("mergekit.sparsify")
mk_gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
mk_base = pytest.importorskip("mergekit.merge_methods.base")
mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_linear = pytest.importorskip("mergekit.merge_methods.linear")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TA = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


@contextlib.contextmanager
def philox_bernoulli(seed):
    """Make torch.bernoulli(p) return (philox_uniform(stream=call index) < p), as wweight draws."""
    real = torch.bernoulli
    calls = {"n": 0}

    def fake(p, *a, **k):
        u = philox_uniform(p.numel(), seed, calls["n"], device=p.device).reshape(p.shape)
        calls["n"] += 1
        return (u < p.float()).to(p.dtype)

    torch.bernoulli = fake
    try:
        yield
    finally:
        torch.bernoulli = real


@contextlib.contextmanager
def stable_sorts():
    """Force torch.sort/argsort to be stable inside mergekit, so tie breaking is defined."""
    real_sort, real_argsort = torch.sort, torch.argsort

    def sort(*a, **k):
        k["stable"] = True
        return real_sort(*a, **k)

    def argsort(*a, **k):
        k["stable"] = True
        return real_argsort(*a, **k)

    torch.sort, torch.argsort = sort, argsort
    try:
        yield
    finally:
        torch.sort, torch.argsort = real_sort, real_argsort


def _spec(name):
    from wweight.methods import TA_METHODS

    cons, spars, norm, resc = TA_METHODS[name]
    C, S = mk_gta.ConsensusMethod, mk_sparsify.SparsificationMethod
    return (C(cons) if cons else None, S(spars) if spars else None, norm, resc, name, name, None)


def mergekit_merge(name, base, tensors, weights, density, gamma, epsilon, lam, normalize, rescale):
    method = mk_gta.GeneralizedTaskArithmeticMerge(*_spec(name))
    group = mk_base.TensorGroup.from_tensors([base, *tensors], base_index=0)
    ids = [e.id for e in group.entries if not e.is_base]
    params = {
        "int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": lam,
        "weight": dict(zip(ids, weights)), "density": dict(zip(ids, density)),
        "gamma": dict(zip(ids, gamma)), "epsilon": dict(zip(ids, epsilon)),
    }
    return method.merge_group(group, **params)


def unique_magnitudes(shape, dtype, g, scale=1.0):
    """Random values whose magnitudes are all distinct in ``dtype`` (no ties at any cut)."""
    n = int(torch.tensor(shape).prod()) if len(shape) else 1
    if dtype == torch.float32:
        v = torch.randn(n, generator=g)
    else:
        # distinct 16-bit magnitudes: a random subset of positive normal bit patterns
        lo, hi = (0x1C00, 0x5000) if dtype == torch.float16 else (0x3000, 0x4400)
        bits = torch.randperm(hi - lo, generator=g)[:n] + lo
        v = bits.to(torch.int16).view(dtype).float()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (v.abs() * sign * scale).to(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["magnitude", "magnitude_outliers"])
def test_sparsify_matches_mergekit(method, dtype):
    g = torch.Generator().manual_seed(1)
    for trial in range(25):
        shape = random.Random(trial).choice([(1,), (7,), (33, 5), (64, 48), (3, 5, 7)])
        x = unique_magnitudes(shape, dtype, g)
        density = [0.0, 0.01, 0.1, 0.37, 0.5, 0.9, 1.0][trial % 7]
        gamma = [0.0, 0.01, 0.05, 0.2][trial % 4]
        norm = [None, "l1", "l2", "linf"][trial % 4]
        kw = {"gamma": gamma} if method == "magnitude_outliers" else {}
        want = mk_sparsify.sparsify(x, density, mk_sparsify.SparsificationMethod(method),
                                    rescale_norm=mk_sparsify.RescaleNorm(norm) if norm else None, **kw)
        got = wweight.sparsify(x, density, method, gamma=gamma, rescale_norm=norm, backend="reference")
        assert torch.equal((got != 0), (want != 0)), (shape, density, gamma, norm)
        if norm is None or dtype != torch.float32:
            assert torch.equal(got, want), (shape, density, gamma, norm)
        else:  # the norms are reduced in another order: the rescale factor may differ in its last bit
            torch.testing.assert_close(got, want, rtol=4e-7, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["random", "della_magprune"])
def test_random_sparsify_matches_mergekit_under_same_stream(method, dtype):
    g = torch.Generator().manual_seed(2)
    for trial in range(12):
        x = (torch.randn(40, 31, generator=g)).to(dtype)
        density = [0.1, 0.3, 0.5, 0.7][trial % 4]
        eps = 0.05 if method == "della_magprune" else 0.0
        norm = [None, "l1"][trial % 2]
        with philox_bernoulli(seed=trial), stable_sorts():
            want = mk_sparsify.sparsify(x, density, mk_sparsify.SparsificationMethod(method), epsilon=eps,
                                        rescale_norm=mk_sparsify.RescaleNorm(norm) if norm else None)
        got = wweight.sparsify(x, density, method, epsilon=eps, rescale_norm=norm, seed=trial, backend="reference")
        torch.testing.assert_close(got, want, rtol=4e-7 if dtype == torch.float32 else 0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", TA)
def test_merge_matches_mergekit(method, dtype):
    rng = random.Random(zlib.crc32(method.encode()) % 1000)
    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        K = rng.choice([1, 2, 3, 5])
        shape = rng.choice([(17,), (32, 24), (5, 6, 7)])
        base = torch.randn(shape, generator=g).to(dtype)
        tensors = [(base.float() + unique_magnitudes(shape, torch.float32, g, 0.05)).to(dtype) for _ in range(K)]
        weights = [round(rng.uniform(0.2, 1.5), 2) for _ in range(K)]
        # random masks: mergekit skips torch.bernoulli at density 1, which would shift the streams
        choices = [0.2, 0.5, 0.8] if ("dare" in method or "della" in method) else [0.2, 0.5, 0.8, 1.0]
        density = [rng.choice(choices) for _ in range(K)]
        gamma = [rng.choice([0.0, 0.01, 0.1]) for _ in range(K)]
        epsilon = [0.1 if d not in (1.0,) and 0 < d - 0.1 and d + 0.1 < 1 else 0.0 for d in density]
        lam = rng.choice([1.0, 0.7])
        normalize = rng.choice([None, True, False])
        rescale = rng.choice([None, True, False])
        from wweight.methods import TA_METHODS

        _, _, dn, dr = TA_METHODS[method]
        nz = dn if normalize is None else normalize
        rs = dr if rescale is None else rescale
        with philox_bernoulli(seed=11), stable_sorts():
            want = mergekit_merge(method, base, tensors, weights, density, gamma, epsilon, lam, nz, rs)
        got = wweight.merge_tensors(method, base, tensors, weights, density, gamma, epsilon, lam, normalize,
                                    rescale, seed=11, backend="reference")
        if rs and dtype == torch.float32:  # norms reduced in another order: last-bit differences
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
        else:
            assert torch.equal(got, want), (method, K, shape, (got.float() - want.float()).abs().max())


def test_linear_matches_mergekit():
    g = torch.Generator().manual_seed(4)
    fn = getattr(mk_linear.linear_merge, "implementation", None) or mk_linear.linear_merge
    for dtype in DTYPES:
        ts = [torch.randn(33, 9, generator=g).to(dtype) for _ in range(3)]
        w = [0.2, 0.5, 1.3]
        try:
            want = fn(mk_base.TensorBatch(tensors=tuple(t.unsqueeze(0) for t in ts)),
                      torch.tensor([w]), normalize=True)[0]
        except TypeError:
            pytest.skip("mergekit's linear kernel is not callable directly in this version")
        got = wweight.merge_tensors("linear", None, ts, w, backend="reference")
        torch.testing.assert_close(got.float(), want.float(), rtol=0 if dtype != torch.float32 else 1e-6,
                                   atol=1e-2 if dtype != torch.float32 else 1e-7)


def test_tie_rule_equals_stable_sort():
    """At a tie the kept set is mergekit's with a stable sort; count and strict part always equal."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-4, 5, (3000,), generator=g).float()
    for density in (0.1, 0.33, 0.5, 0.8):
        got = wweight.sparsify(x, density, "magnitude")
        want = mk_sparsify.magnitude(x, density)
        assert int((got != 0).sum()) == int((want != 0).sum())
        k = max(1, int(density * x.numel()))
        idx = torch.argsort(x.abs(), descending=True, stable=True)[:k]
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[idx] = True
        assert torch.equal(got, x * mask)
        t = x.abs()[idx[-1]]
        assert torch.equal(got[x.abs() > t], want[x.abs() > t])
