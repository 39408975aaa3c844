"""The CPU sparse kernels' one-pass select and their two ISA builds (csrc/cpu/sparse_kernels.h).

* ``select`` (sample bracket + one counting pass) must give what the radix passes give: the
  same key, count above, count equal and per-block tie counts, or say it could not
  (``resolved = 0``) -- checked on plain, tie-heavy, all-zero and skewed inputs, where the last
  two force the fallbacks; and the plans built with and without it must be identical.
* The baseline and AVX2 builds run the same source: every merge must give the same bits on both.
* Random masks: the statistics pass keeps the Philox masks it draws as bits (``MaskPlan.keep_bits``)
  for the merge; they must be the torch Philox stream's masks, and a merge from them must give the
  bits of a merge that draws them itself.
"""
import pytest
import torch

import wweight
from wweight._ext import cpu_extension, empty_like

ext = cpu_extension()
pytestmark = pytest.mark.skipif(ext is None or not hasattr(ext, "sparse_select"),
                                reason="the C++ CPU extension is not built")

from wweight.backends.cpu import sparse as S  # noqa: E402
from wweight.sparse import plan as P  # noqa: E402


def _inputs(kind, n, dt, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    xs = [base + 0.01 * torch.randn(n, generator=g) for _ in range(K)]
    if kind == "ties":        # deltas on a coarse grid: big tie groups at every cut
        xs = [base + torch.round(50 * (x - base)) / 50 for x in xs]
    elif kind == "zeros":     # model 0 equals the base: every key 0
        xs[0] = base.clone()
    elif kind == "skewed":    # sorted magnitudes: a strided sample still brackets, runs are correlated
        xs = [base + torch.sort((x - base).abs())[0] for x in xs]
    elif kind == "spike":     # almost all equal, a few large: the bracket is one huge tie group
        xs = [base + torch.where(torch.rand(n, generator=g) < 0.001, torch.randn(n, generator=g), 0.5e-2) for _ in xs]
    return base.to(dt), [x.to(dt) for x in xs]


def _radix(xs, base, qm, ks, dt):
    k, g, e = P.radix_select(S, xs, base, torch.tensor(qm), torch.tensor(ks), dt)
    return k, g, e, S.tie_counts(xs, base, torch.tensor(qm), k)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["plain", "ties", "zeros", "skewed", "spike"])
@pytest.mark.parametrize("n", [1, 777, 300_001])
def test_select_matches_radix(dt, kind, n):
    K = 3
    base, xs = _inputs(kind, n, dt, K)
    qm = [0, 1, 2, 2]
    ks = [max(1, n // 5), max(1, n // 2), max(1, n // 50), n]
    res, ties = S.select(xs, base, qm, ks)
    k, g, e, tc = _radix(xs, base, qm, ks, dt)
    for q in range(len(qm)):
        if res[q, 3]:
            assert res[q, :3].tolist() == [int(k[q]), int(g[q]), int(e[q])], (kind, q)
            assert torch.equal(ties[q], tc[q]), (kind, q)


def test_select_resolves_plain_inputs_in_one_pass():
    base, xs = _inputs("plain", 1 << 20, torch.float32, 4)
    res, _ = S.select(xs, base, [0, 1, 2, 3], [1 << 18] * 4)
    assert res[:, 3].tolist() == [1, 1, 1, 1]


def test_select_one_tie_group_is_counted_per_block():
    # every key of model 0 is 0: a one-key bracket, counted per block (no candidates kept)
    base, xs = _inputs("zeros", 1 << 20, torch.float32, 2)
    res, ties = S.select(xs, base, [0, 1], [1 << 18] * 2)
    assert res[0].tolist() == [0, 0, 1 << 20, 1]
    assert torch.equal(ties[0], torch.full_like(ties[0], P.BLOCK))


def test_select_falls_back_when_the_sample_misses():
    # the sampled runs (csrc/cpu/sparse_select.h: 4096 runs of 8 at evenly spaced starts for n >= 2^20) hold
    # tiny values, everything else is large: the bracket lies far below the k-th key
    n, runs = 1 << 20, 4096
    g = torch.Generator().manual_seed(3)
    x = 1.0 + torch.rand(n, generator=g)
    for r in range(runs):
        i0 = r * (n - 8) // (runs - 1)
        x[i0:i0 + 8] = 1e-3 * torch.rand(8, generator=g)
    res, _ = S.select([x], None, [0], [n // 5])
    assert res[0, 3] == 0
    # and the plan still gets the exact cut through the radix passes
    plan = P.build_plan(S, [x], None, "magnitude", [0.2], [0.0], 0)
    kth = torch.sort(x.abs(), descending=True)[0][n // 5 - 1]
    assert int(plan.kp[0, 0]) == int(kth.view(torch.int32))


class _NoSelect:
    """The CPU primitives without the one-pass select: build_plan takes the radix passes."""

    def __init__(self):
        for name in ("digit_hist", "tie_counts", "rescale_stats", "merge", "digits_for"):
            setattr(self, name, getattr(S, name))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "ties", "zeros", "spike"])
@pytest.mark.parametrize("method", ["magnitude", "magnitude_outliers"])
def test_plan_same_with_and_without_select(dt, kind, method):
    base, xs = _inputs(kind, 200_003, dt, 3, seed=1)
    dens, gam = [0.2, 0.5, 0.9], [0.01, 0.05, 0.0]
    a = P.build_plan(S, xs, base, method, dens, gam, 0)
    b = P.build_plan(_NoSelect(), xs, base, method, dens, gam, 0)
    assert torch.equal(a.kp, b.kp)
    assert a.has_ties == b.has_ties
    if a.has_ties:
        assert torch.equal(a.tie_offsets, b.tie_offsets)


def _isas():
    """The builds of the sparse kernels this CPU and extension run (baseline always)."""
    have = ["baseline"]
    prev = ext.sparse_use_isa("auto")
    try:
        for name in ("avx2", "avx512"):
            try:
                ext.sparse_use_isa(name)
                have.append(name)
            except ValueError:
                pass
    finally:
        ext.sparse_use_isa(prev)
    return have


def test_auto_picks_the_widest_build():
    prev = ext.sparse_use_isa("auto")
    try:
        assert ext.sparse_isa() == _isas()[-1]
    finally:
        ext.sparse_use_isa(prev)


@pytest.mark.skipif(len(_isas()) < 2, reason="this CPU or build has no AVX2 / AVX-512 kernels")
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "task_arithmetic", "dare_linear"])
def test_every_build_gives_the_same_bits(dt, method):
    base, xs = _inputs("ties", 70_001, dt, 3, seed=2)
    kw = {"gamma": 0.02} if method.startswith("breadcrumbs") else {}
    outs = {}
    prev = ext.sparse_use_isa("auto")
    try:
        for isa in _isas():
            ext.sparse_use_isa(isa)
            outs[isa] = (wweight.merge_tensors(method, base, xs, weights=[1.0, -0.5, 0.7], density=0.3, seed=4,
                                               backend="cpu", **kw),
                         wweight.sparsify(xs[0] - base, 0.3, "random", rescale_norm="l1", seed=4, backend="cpu"))
    finally:
        ext.sparse_use_isa(prev)
    for isa in _isas()[1:]:
        for a, b in zip(outs["baseline"], outs[isa]):
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), isa


@pytest.mark.skipif(len(_isas()) < 2, reason="this CPU or build has no AVX2 / AVX-512 kernels")
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,kw", [
    ("ties", {"lambda_": 0.7}), ("ties", {"normalize": False}), ("breadcrumbs_ties", {"gamma": 0.05}),
    ("dare_ties", {"rescale": True}), ("breadcrumbs", {"gamma": 0.05}), ("linear", {}),
    ("task_arithmetic", {"lambda_": 1.3}),
])
def test_every_build_gives_the_same_bits_with_unit_weights(dt, method, kw):
    # the AVX-512 build's register-resident merge (csrc/cpu/sparse_merge16.h) skips the products by a
    # weight or scale of exactly 1, counts tie ranks only in blocks a window edge falls into, and
    # leaves a tile's last n % 32 elements to the tile loops: K = 4 on a coarse grid (cut keys that
    # hold a tenth of the elements, edges inside the tensor), 293 blocks, a 17-element tail
    base, xs = _inputs("ties", 300_017, dt, 4, seed=5)
    outs = {}
    prev = ext.sparse_use_isa("auto")
    try:
        for isa in _isas():
            ext.sparse_use_isa(isa)
            outs[isa] = wweight.merge_tensors(method, None if method == "linear" else base, xs, density=0.35,
                                              seed=6, backend="cpu", **kw)
    finally:
        ext.sparse_use_isa(prev)
    for isa in _isas()[1:]:
        assert torch.equal(outs["baseline"].view(-1).view(torch.uint8), outs[isa].view(-1).view(torch.uint8)), isa


def test_use_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="isa"):
        ext.sparse_use_isa("avx9000")


def test_empty_like_large_cpu_output():
    t = torch.zeros(3 << 20, dtype=torch.float32)       # 12 MB: advised
    out = empty_like(t)
    assert out.shape == t.shape and out.dtype == t.dtype and out.data_ptr() != t.data_ptr()
    out.fill_(1.5)
    assert bool((out == 1.5).all())
    assert isinstance(ext.advise_huge_pages(out.data_ptr(), out.nbytes), bool)


def _unpack(bits, n):
    shifts = torch.arange(32, dtype=torch.int64)
    return ((bits.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(bits.shape[0], -1)[:, :n].bool()


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("n", [1, 33, 777, 300_001])
def test_random_keep_bits_are_the_philox_masks(isa, n):
    # the statistics pass keeps the masks it draws (MaskPlan.keep_bits): element i of model t is
    # kept where the torch Philox stream stream0 + t gives u_i < density
    from wweight.reference.philox import philox_uniform
    if isa not in _isas():
        pytest.skip(f"this CPU or build has no {isa} kernels")
    base, xs = _inputs("plain", n, torch.float32, 3)
    dens = [0.2, 0.5, 0.9]
    plan = P.build_plan(S, xs, base, "random", dens, [0.0] * 3, seed=7, stream0=2)
    prev = ext.sparse_use_isa(isa)
    try:
        S.rescale_stats(xs, base, plan, "l1")
    finally:
        ext.sparse_use_isa(prev)
    assert plan.keep_bits is not None and tuple(plan.keep_bits.shape) == (3, (n + 31) // 32)
    got = _unpack(plan.keep_bits, n)
    for t in range(3):
        assert torch.equal(got[t], philox_uniform(n, 7, 2 + t) < dens[t]), t
    tail = n % 32   # the last word's unused high bits are 0
    if tail:
        assert int(plan.keep_bits[:, -1].to(torch.int64).bitwise_right_shift(tail).abs().sum()) == 0


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_from_keep_bits_equals_merge_drawing_them(dt):
    # the merge reads the statistics pass's masks; with them dropped it draws its own: same bits,
    # and both equal the reference merge
    base, xs = _inputs("plain", 70_001, dt, 3, seed=3)
    dens, w = [0.3, 0.6, 0.9], torch.tensor([1.0, -0.5, 0.7], dtype=dt).float()   # weights as merge_tensors rounds them
    plan = P.build_plan(S, xs, base, "random", dens, [0.0] * 3, seed=5)
    scales = P.rescale_factors(S, xs, base, plan, "l1", dens, dt, P.work_dtype(dt, "random"))
    assert plan.keep_bits is not None
    outs = []
    for bits in (plan.keep_bits, None):
        plan.keep_bits = bits
        out = torch.empty_like(base)
        assert not S.merge(xs, base, out, plan, w, scales, 1.0, 1.2, True, False).any()
        outs.append(out)
    assert torch.equal(outs[0].view(-1).view(torch.uint8), outs[1].view(-1).view(torch.uint8))
    # the reference's float32 rescale factors can differ in their last bit (tests/test_sparse.py)
    ref = wweight.merge_tensors("dare_ties", base, xs, weights=w.tolist(), density=dens, seed=5,
                                backend="reference")
    torch.testing.assert_close(outs[0].float(), ref.float(), rtol=1e-2 if dt != torch.float32 else 1e-5,
                               atol=1e-6)


def test_keep_bits_are_read_and_only_of_their_shape():
    base, xs = _inputs("plain", 5000, torch.float32, 2, seed=4)
    plan = P.build_plan(S, xs, base, "random", [0.4, 0.4], [0.0] * 2, seed=1)
    scales = P.rescale_factors(S, xs, base, plan, "l1", [0.4, 0.4], torch.float32, torch.float32)
    good = torch.empty_like(base)
    S.merge(xs, base, good, plan, torch.ones(2), scales, 1.0, 2.0, True, False)
    plan.keep_bits = torch.zeros((2, 3), dtype=torch.int32)   # stale: would drop every element if read
    out = torch.empty_like(base)
    S.merge(xs, base, out, plan, torch.ones(2), scales, 1.0, 2.0, True, False)
    assert torch.equal(out, good)
    plan.keep_bits = torch.zeros((2, (5000 + 31) // 32), dtype=torch.int32)   # read: every delta dropped
    S.merge(xs, base, out, plan, torch.ones(2), scales, 1.0, 2.0, True, False)
    assert torch.equal(out, base) and not torch.equal(good, base)


@pytest.mark.parametrize("kind", ["plain", "ties"])
def test_select_wide_bracket_against_sort(kind):
    # fp32 keys, 2M elements: the bracket holds ~10^5 candidates spread over many of the 2^12
    # histogram buckets that locate the answer; key and counts must be the sort's, for cuts at
    # several densities
    n = (1 << 21) + 5
    base, xs = _inputs(kind, n, torch.float32, 2, seed=3)
    qm = [0, 0, 1, 1]
    ks = [n // 5, n // 10, n // 2 + 1, n // 100]
    res, _ = S.select(xs, base, qm, ks)
    for q, (m, k) in enumerate(zip(qm, ks)):
        assert res[q, 3] == 1, q
        keys = ((xs[m] - base).view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
        kth = int(torch.sort(keys, descending=True)[0][k - 1])
        assert res[q, :3].tolist() == [kth, int((keys > kth).sum()), int((keys == kth).sum())], q


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_select_few_key_bracket_against_sort(dt):
    # 16-bit keys on a bf16-rounded model (deltas quantised to the base's ulp): the bracket holds
    # ~16-64 keys with a few % of the elements, counted per block and key by scattered increments;
    # key, counts and per-block tie counts must be the sort's
    n = (1 << 21) + 3
    g = torch.Generator().manual_seed(5)
    base = (0.02 * torch.randn(n, generator=g)).to(dt)
    xs = [(base.float() + 1e-3 * torch.randn(n, generator=g)).to(dt) for _ in range(2)]
    qm, ks = [0, 0, 1], [n // 5, n // 100, n // 2]
    res, ties = S.select(xs, base, qm, ks)
    for q, (m, k) in enumerate(zip(qm, ks)):
        assert res[q, 3] == 1, q
        d = (xs[m].float() - base.float()).to(dt)
        keys = (d.view(torch.int16).to(torch.int64) & 0x7FFF)
        kth = int(torch.sort(keys, descending=True)[0][k - 1])
        assert res[q, :3].tolist() == [kth, int((keys > kth).sum()), int((keys == kth).sum())], q
        B = P.BLOCK
        eq = torch.nn.functional.pad((keys == kth).to(torch.int64), (0, (-n) % B)).view(-1, B).sum(1)
        assert torch.equal(ties[q], eq), q


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"])
def test_a_nonfinite_lane_anywhere_names_its_input(dt, method):
    # the AVX-512 merge tests a tile's inputs for NaN / inf as one mask and finds the input again
    # only when it fires: the error must still name the right tensor, wherever the lane lies
    n = 3000
    kw = {"linear": {}, "task_arithmetic": {}, "ties": dict(density=0.5), "dare_ties": dict(density=0.5, seed=0),
          "breadcrumbs_ties": dict(density=0.5, gamma=0.01)}[method]
    for pos in (5, 1234, n - 1):
        base = torch.randn(n).to(dt)
        good = (base.float() + 1).to(dt)
        bad = good.clone()
        bad[pos] = float("inf")
        with pytest.raises(ValueError, match=r"tensors\[1\]"):
            wweight.merge_tensors(method, base, [good, bad], backend="cpu", **kw)
        if method != "linear":
            nb = base.clone()
            nb[pos] = float("nan")
            with pytest.raises(ValueError, match="base"):
                wweight.merge_tensors(method, nb, [good, good], backend="cpu", **kw)
