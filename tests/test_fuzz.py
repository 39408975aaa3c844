"""Seeded fuzz tests, one per op family: a few hundred random calls each, every outcome classified.

Each case either returns the reference's result (``backend="reference"``, the plain-torch code the
kernels are tested against) or raises ``ValueError`` / ``TypeError`` whose message names one of the
op's arguments. Anything else (a deep ``IndexError``, ``ZeroDivisionError``, a silently different
result, a modified input) fails the test with the seed and the case, so it can be replayed.
"""
import math
import random

import pytest
import torch

import wweight

SHAPES = [(), (1,), (7,), (0,), (3, 5), (2, 1, 4), (16, 33)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPARSE_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                  "della", "della_linear"]
SPARSE_ARGS = ("method", "base", "tensors", "weights", "density", "gamma", "epsilon", "lambda", "normalize", "rescale",
               "seed", "shape", "dtype")


def _value(rng):
    """A parameter value: mostly valid, sometimes out of range, NaN, of a wrong type or a wrong length."""
    return rng.choice([0.5, 0.9, 1.0, 0.1, 0.0, 1.5, -0.2, float("nan"), "x", None, [0.5], [0.3, 0.7, 0.2, 0.1]])


def _same(got, want):
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    g, w = got.double(), want.double()
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        return False
    ok = ~torch.isnan(w)
    # float32 rescale factors come from norms reduced in another order than torch.sum (last bits)
    tol = 1e-5 if got.dtype == torch.float32 else 0.0
    return bool(torch.allclose(g[ok], w[ok], rtol=tol, atol=tol * (float(w[ok].abs().max()) if ok.any() else 0.0)))


def _classify(fn, ref, args, names, inputs):
    snapshot = [t.clone() for t in inputs]
    try:
        got = fn()
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert any(n in msg for n in names), f"error names no argument: {type(e).__name__}: {msg}"
        return "refused"
    finally:
        for a, b in zip(inputs, snapshot):
            assert torch.equal(a, b) or (torch.isnan(a) & torch.isnan(b)).any(), "an input was modified"
    want = ref()
    assert _same(got, want), f"result differs from the reference for {args}"
    return "ok"


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_merge_tensors(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    outcomes = {"ok": 0, "refused": 0}
    for case in range(60):
        method = rng.choice(SPARSE_METHODS)
        shape, dt = rng.choice(SHAPES), rng.choice(DTYPES)
        K = rng.choice([1, 2, 3])
        base = torch.randn(shape, generator=g).to(dt)
        ts = [base + 0.1 * torch.randn(shape, generator=g).to(dt) for _ in range(K)]
        if rng.random() < 0.05 and base.numel():
            ts[0].view(-1)[0] = float("nan")
        kw = {}
        for p in ("weights", "density", "gamma", "epsilon", "lambda_"):
            if rng.random() < 0.4:
                kw[p] = _value(rng)
        # a fixed seed for the random masks (None would draw a different one per call)
        kw["seed"] = rng.choice([0, 1, 2 ** 40, 12345])
        args = (method, shape, dt, K, kw)
        b = None if method == "linear" and rng.random() < 0.5 else base
        outcomes[_classify(lambda: wweight.merge_tensors(method, b, ts, backend=None, **kw),
                           lambda: wweight.merge_tensors(method, b, ts, backend="reference", **kw),
                           args, SPARSE_ARGS, ts + [base])] += 1
    assert outcomes["ok"] > 10, outcomes          # the fuzz must mostly reach real merges


@pytest.mark.parametrize("seed", range(3))
def test_fuzz_sparsify_and_kth(seed):
    rng = random.Random(100 + seed)
    g = torch.Generator().manual_seed(seed)
    names = ("tensor", "density", "method", "gamma", "epsilon", "rescale_norm", "seed", "k")
    for case in range(60):
        x = torch.randn(rng.choice(SHAPES), generator=g).to(rng.choice(DTYPES))
        method = rng.choice(["magnitude", "random", "magnitude_outliers", "della_magprune", "bogus"])
        kw = {"density": rng.choice([0.5, 0.0, 1.0, 0.1, -1, float("nan"), "x"])}
        if rng.random() < 0.5:
            kw["rescale_norm"] = rng.choice([None, "l1", "l2", "linf", "density", "l3"])
        if method in ("random", "della_magprune"):
            kw["seed"] = rng.choice([0, 1, 7])
        _classify(lambda: wweight.sparsify(x, method=method, **kw),
                  lambda: wweight.sparsify(x, method=method, backend="reference", **kw), (method, kw), names, [x])
        k = rng.choice([1, 2, 0, -1, x.numel(), x.numel() + 1, 1.5])
        _classify(lambda: wweight.kth_largest_abs(x, k), lambda: wweight.kth_largest_abs(x, k, backend="reference"),
                  ("kth", x.shape, k), names, [x])


@pytest.mark.parametrize("seed", range(3))
def test_fuzz_quantize_roundtrip(seed):
    rng = random.Random(200 + seed)
    g = torch.Generator().manual_seed(seed)
    names = ("weight", "bits", "block_size", "symmetric", "outliers", "clip", "scale_dtype")
    for case in range(40):
        shape = rng.choice([(1,), (7,), (3, 5), (16, 33), (4, 64)])
        w = torch.randn(shape, generator=g).to(rng.choice(DTYPES))
        kw = {"bits": rng.choice([2, 3, 4, 8, 1, 9, "4"]), "block_size": rng.choice([64, 7, "row", "tensor", 0, -3]),
              "symmetric": rng.choice([False, True])}
        if rng.random() < 0.3:
            kw["outliers"] = rng.choice([0.01, 0.5, 0.0, 1.5, {"zscore": 3.0}])
        if rng.random() < 0.2:
            kw["clip"] = rng.choice([0.9, 1.0, 0.0, 2.0])

        def run(backend):
            return wweight.dequantize(wweight.quantize(w, backend=backend, **kw), backend=backend)
        _classify(lambda: run(None), lambda: run("reference"), (shape, w.dtype, kw), names, [w])


def test_fuzz_linear_sum_assignment_matches_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    rng = random.Random(7)
    g = torch.Generator().manual_seed(7)
    for case in range(60):
        n, m = rng.choice([0, 1, 2, 5, 9]), rng.choice([0, 1, 3, 5, 9])
        c = torch.randn(n, m, generator=g) if rng.random() < 0.7 else torch.randint(-3, 3, (n, m), generator=g).float()
        maximize = rng.random() < 0.5
        want_r, want_c = scipy_opt.linear_sum_assignment(c.numpy(), maximize=maximize)
        r, cc = wweight.linear_sum_assignment(c, maximize=maximize)
        total = lambda rows, cols: float(c[torch.as_tensor(rows, dtype=torch.long),  # noqa: E731
                                           torch.as_tensor(cols, dtype=torch.long)].sum()) if len(rows) else 0.0
        assert len(r) == len(want_r) and math.isclose(total(r, cc), total(want_r, want_c), rel_tol=1e-6, abs_tol=1e-6)


def _perm_mutations(p):
    """Bad (and a few good) values for one permutation tensor ``p`` (n,)."""
    return [p.tolist(), p.numpy(), p.float(), p.bool(), p.to(torch.int32), -p - 1, p + 1, p.unsqueeze(0), p[0],
            torch.zeros_like(p), p.to("meta"), p.flip(0), torch.tensor([]), None, "x", 3, p.double(),
            torch.cat([p, p]), p.to(torch.uint8), p.half(), p[:-1]]


def test_fuzz_apply_permutation():
    """Bad perms / params / specs are refused with an error naming the argument; good ones match the
    plain-torch reference (``wweight.reference.permute``)."""
    from wweight.permute import apply_permutation, mlp_spec, random_permutation
    from wweight.reference.permute import apply_permutation_reference

    g = torch.Generator().manual_seed(3)
    spec = mlp_spec(["l0", "l1", "l2"])
    sd = {"l0.weight": torch.randn(8, 4, generator=g), "l0.bias": torch.randn(8, generator=g),
          "l1.weight": torch.randn(6, 8, generator=g), "l1.bias": torch.randn(6, generator=g),
          "l2.weight": torch.randn(3, 6, generator=g), "l2.bias": torch.randn(3, generator=g)}
    good = random_permutation(spec, sd, seed=1)
    names = ("perms", "params", "spec")
    outcomes = {"ok": 0, "refused": 0}
    cases = [(spec, {**good, p: bad}, sd) for p in good for bad in _perm_mutations(good[p])]
    bad_perms = (None, [], {"zz": good["P0"]}, {1: 2}, good.items(), {**good, "P9": good["P0"]})
    bad_params = (None, {}, dict(list(sd.items())[:2]), {**sd, "l0.weight": torch.randn(9, 4)},
                  {**sd, "l0.weight": [1.0]}, {**sd, "l0.weight": sd["l0.weight"].to("meta")})
    cases += [(spec, bad, sd) for bad in bad_perms] + [(spec, good, bad) for bad in bad_params]
    cases += [(bad, good, sd) for bad in (None, "mlp", {}, {"l0.weight": ("P0", None)})]
    for sp, perms, params in cases:
        def ref(sp=sp, perms=perms, params=params):
            # the reference indexes with the perms as given: hand it int64 ones (what we convert to)
            return apply_permutation_reference(sp, {k: v.long() for k, v in perms.items()}, params)
        try:
            got = apply_permutation(sp, perms, params)
        except (ValueError, TypeError) as e:
            assert any(n in str(e) for n in names), f"error names no argument: {type(e).__name__}: {e}"
            outcomes["refused"] += 1
            continue
        want = ref()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (perms, params)
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 4 and outcomes["refused"] >= 30, outcomes


@pytest.mark.parametrize("builder,args", [
    ("mlp_spec", (3,)), ("mlp_spec", ("ab",)), ("mlp_spec", ([1, 2],)), ("mlp_spec", ([],)),
    ("cnn_spec", ("ab", ["l"])), ("cnn_spec", (["c"], None)), ("resnet_spec", (3,)), ("resnet_spec", ([1, -1],)),
    ("resnet_spec", ([],)), ("gpt2_spec", ("x", 2, 4)), ("gpt2_spec", (2, 0, 4)), ("llama_spec", (2, 4, 3, 8)),
    ("llama_spec", (None, 4, 2, 8))])
def test_spec_builders_refuse_bad_arguments(builder, args):
    import inspect

    from wweight.permute import specs

    fn = getattr(specs, builder)
    params = list(inspect.signature(fn).parameters)
    with pytest.raises((ValueError, TypeError)) as ei:
        fn(*args)
    assert any(p in str(ei.value) for p in params), str(ei.value)
