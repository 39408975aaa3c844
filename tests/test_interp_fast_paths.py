"""The chunked fast paths of wweight/interp (sphere.py, fast.arcee_fusion) against mergekit itself
where their code paths branch and test_interp_mergekit.py's random small cases do not reach:
pieces of whole rows (non-flattened nuslerp with mixed colinear / non-colinear rows), many
Karcher iterations, the radix-select quantiles and their multi-select fallback (negative values),
sizes past several CHUNK pieces. Bits must be mergekit's."""
import random

import pytest
import torch

import wweight
from wweight.interp import fast, sphere

mk_base = pytest.importorskip("mergekit.merge_methods.base")
mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_arcee = pytest.importorskip("mergekit.merge_methods.arcee_fusion")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def mergekit(name, base, tensors, params):
    inputs = ([base] if base is not None else []) + list(tensors)
    group = mk_base.TensorGroup.from_tensors(inputs, base_index=0 if base is not None else None)
    (out,) = mk_registry.get(name)([group], parameters=params)
    return out.to(tensors[0].dtype)


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_nuslerp_rows_mixed_colinear(dtype):
    """Not flattened: one slerp per row, pieces of whole rows; every third row colinear (the
    linear branch) so pieces hold both branches."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(700, 600, generator=g)
    d0 = 0.02 * torch.randn(700, 600, generator=g)
    d1 = 0.02 * torch.randn(700, 600, generator=g)
    d1[::3] = 2 * d0[::3]
    b, t0, t1 = base.to(dtype), (base + d0).to(dtype), (base + d1).to(dtype)
    for with_base in (True, False):
        bb = b if with_base else None
        want = mergekit("nuslerp", bb, [t0, t1], {"weight": [1.0, 3.0], "nuslerp_flatten": False})
        got = wweight.merge_tensors("nuslerp", bb, [t0, t1], weights=[1.0, 3.0], nuslerp_flatten=False)
        assert same(got, want), (dtype, with_base, (got.float() - want.float()).abs().max())
    want = mergekit("nuslerp", b, [t0, t1], {"weight": [1.0, 1.0], "nuslerp_flatten": False,
                                            "nuslerp_row_wise": True})
    got = wweight.merge_tensors("nuslerp", b, [t0, t1], weights=[1.0, 1.0], nuslerp_flatten=False,
                                nuslerp_row_wise=True)
    assert same(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_karcher_many_iterations(dtype):
    """Unrelated random vectors: the iteration runs to max_iter, each pass chunked (16-bit inputs
    of <= 1M elements take the reference, so past that)."""
    g = torch.Generator().manual_seed(2)
    ts = [(torch.randn(1_100_007, generator=g) * s).to(dtype) for s in (1.0, 0.5, 2.0, 0.1)]
    want = mergekit("karcher", None, ts, {"max_iter": 12, "tol": 1e-9})
    got = wweight.merge_tensors("karcher", None, ts, max_iter=12, tol=1e-9)
    assert same(got, want), (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_multislerp_large_no_base(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1_000_003, generator=g)
    ts = [(base + 0.3 * torch.randn(base.shape, generator=g)).to(dtype) for _ in range(3)]
    want = mergekit("multislerp", None, ts, {"weight": [0.2, 1.0, 0.7]})
    got = wweight.merge_tensors("multislerp", None, ts, weights=[0.2, 1.0, 0.7])
    assert same(got, want)


def _sorted_quantiles(x):
    s = torch.sort(x.reshape(-1)).values
    return [s[int(q * (s.numel() - 1))] for q in (0.25, 0.5, 0.75)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantiles_select_equals_sort(dtype):
    """Both selection routes give the sorted array's entries: non-negative values (radix select)
    with +0.0 / -0.0 and ties, and signed values (the multi-select fallback)."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(4)
    for n in (1, 2, 5, 1000, 300_001):
        x = torch.randn(n, generator=g).abs()
        x[torch.rand(n, generator=g) < 0.3] = 0.0
        x[torch.rand(n, generator=g) < 0.1] = -0.0
        x[torch.rand(n, generator=g) < 0.2] = float(rng.choice([0.5, 1.0]))
        x = x.to(dtype)
        assert [float(v) for v in fast._quantiles(x, True)] == [float(v) for v in _sorted_quantiles(x)]
        y = torch.randn(n, generator=g).to(dtype)
        assert [float(v) for v in fast._quantiles(y, False)] == [float(v) for v in _sorted_quantiles(y)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcee_fusion_large_exact(dtype, monkeypatch):
    """Past 1M elements, rows of mixed KL; mergekit with its sample size raised past the tensor."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1030, 1100, generator=g)
    other = base + 0.05 * torch.randn(base.shape, generator=g)
    other[::7] = base[::7]                      # rows with KL = 0: importance 0 there
    b, o = base.to(dtype), other.to(dtype)
    monkeypatch.setattr(mk_arcee, "_QUANTILE_SAMPLE_SIZE", 1 << 40)
    want = mergekit("arcee_fusion", b, [o], {}).to(dtype)
    assert same(wweight.merge_tensors("arcee_fusion", b, [o]), want)


def test_fast_paths_leave_inputs_and_return_new_tensors():
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(200_000, generator=g) for _ in range(3)]
    keep = [x.clone() for x in xs]
    outs = [sphere.nuslerp(xs[0], xs[1:], [1.0, 1.0]), sphere.multislerp(xs[0], xs[1:], [1.0, 1.0]),
            sphere.karcher(xs), fast.arcee_fusion(xs[0], xs[1])]
    for x, k in zip(xs, keep):
        assert torch.equal(x, k)
    for out in outs:
        assert all(out.data_ptr() != x.data_ptr() for x in xs)
