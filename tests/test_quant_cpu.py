"""The C++/OpenMP quant backend (csrc/cpu/quant_cpu.cpp, wweight/backends/cpu/quant.py): bit for bit
against the plain reference (wweight/reference/quant.py) and the vectorised torch backend on
hundreds of random cases, plus the corners (constant blocks, zeros, -0, huge / tiny magnitudes,
blocks too large for the one-pass tiles, the OpenMP path), dispatch and the explicit fallbacks."""
import math
import random

import pytest
import torch

import wweight
from wweight.backends.cpu import quant as CQ
from wweight.backends.torch import quant as TQ
from wweight.reference import quant as R

pytestmark = pytest.mark.skipif(not CQ.available(), reason="wweight._cpu without the quant kernels")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INF = math.inf


def _bits_equal(a, b) -> bool:
    """Equal dtype, shape and bits (NaN-safe: compares the raw bytes), except the sign of a zero: the
    min / max of a block holding both +0 and -0 is either (torch's vectorised amin / amax and the
    reference's loop already pick differently), so a stored zero, and a value of a block whose
    scale is 0, may be -0 on one path and +0 on another; codes never differ (tested as uint8)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype.is_floating_point and b.dtype == a.dtype:
        a, b = a + 0.0, b + 0.0  # -0 + 0 == +0 in IEEE arithmetic; every other value unchanged
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def _ref_quantize(x, mask, thr, bits, bs, sym, clip, sd):
    m = None
    if math.isfinite(thr) or mask is not None:
        m = x.float().abs() >= thr
        if mask is not None:
            m |= mask
    codes, scale, zero, idx, _ = R.quantize(x, bits, bs, sym, m, clip, sd)
    return codes, scale, zero, idx


def _check(x, mask, thr, bits, bs, sym, clip, sd):
    """cpu == torch == reference for quantize, and for dequantize of the reference's codes."""
    x0 = x.clone()
    got = CQ.quantize(x, mask, thr, bits, bs, sym, clip, sd)
    assert torch.equal(x, x0)  # never modifies its input
    for name, want in (("torch", TQ.quantize(x, mask, thr, bits, bs, sym, clip, sd)),
                       ("reference", _ref_quantize(x, mask, thr, bits, bs, sym, clip, sd))):
        for part, g, w in zip(("codes", "scale", "zero", "outlier idx"), got, want):
            assert _bits_equal(g, w), f"{part} differs from the {name} backend"
    codes, scale, zero, _ = got
    n = x.numel()
    want = R.dequantize(codes, scale, zero, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=x.dtype),
                        (n,), x.dtype, bits, bs)
    dq = CQ.dequantize(codes, scale, zero, n, x.dtype, bits, bs)
    assert _bits_equal(dq, want), "dequantize differs from the reference"
    assert _bits_equal(dq, TQ.dequantize(codes, scale, zero, n, x.dtype, bits, bs)), "dequantize differs from torch"


def _random_case(rng: random.Random):
    dt = rng.choice(DTYPES)
    sd = rng.choice(SCALE_DTYPES)
    rows, cols = rng.randint(1, 40), rng.randint(1, 130)
    n = rows * cols
    bs = rng.choice((32, 64, 128, 100, "row", "tensor", 1, 7, 8, 24, 1000))
    bs = {"row": cols, "tensor": n}.get(bs, bs)
    bs = min(bs, n)
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    # magnitudes: keep float16 scales / zeros finite (an overflow is refused above the backends)
    hi_exp = 2 if (sd == torch.float16 or dt == torch.float16) else 30
    x = torch.randn(n, generator=g) * 10.0 ** rng.uniform(-6, hi_exp)
    kind = rng.random()
    if kind < 0.15:  # constant blocks, zeros and signed zeros
        x[: max(1, n // 3)] = rng.choice((0.0, -0.0, 1.5, -2.25))
        x[torch.rand(n, generator=g) < 0.2] = -0.0
    elif kind < 0.25:  # coarse values: many ties at .5 after scaling
        x = torch.round(x * 4) / 4
    x = x.to(dt)
    mask, thr = None, INF
    o = rng.random()
    if o < 0.3:
        k = max(1, n // 100)
        thr = float(torch.sort(x.float().abs(), descending=True).values[k - 1])
    elif o < 0.45:
        mask = torch.rand(n, generator=g) < 0.05
    elif o < 0.55:
        thr = float(x.float().abs().max()) * 0.8
        mask = torch.rand(n, generator=g) < 0.02
    bits = rng.randint(2, 8)
    sym = rng.random() < 0.5
    clip = None if rng.random() < 0.6 else rng.uniform(0.5, 1.0)
    return x, mask, thr, bits, bs, sym, clip, sd


@pytest.mark.parametrize("seed", range(30))
def test_random_cases_bit_identical(seed):
    rng = random.Random(seed)
    for _ in range(10):  # 300 cases in all
        _check(*_random_case(rng))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bits_and_dtype_multithreaded(dt, bits):
    # n > 65536: the OpenMP path (several tiles per thread); blocks 64 and 100 (groups straddle blocks)
    x = (torch.randn(150_001, generator=torch.Generator().manual_seed(bits)) * 3).to(dt)
    for bs, sym in ((64, False), (100, True)):
        _check(x, None, INF, bits, bs, sym, None, torch.float16)


@pytest.mark.parametrize("bs,sym", [(100_001, False), (70_000, True), (300_007, False), (65_536, True)])
def test_large_blocks_two_pass_path(bs, sym):
    # lcm(bs, 8) > 65536: per-chunk statistics, then the codes; outliers by threshold and mask
    g = torch.Generator().manual_seed(bs)
    x = torch.randn(300_007, generator=g)
    x[12345] = 50.0
    mask = torch.rand(x.numel(), generator=g) < 0.001
    _check(x, mask, 4.0, 4, bs, sym, None, torch.float32)
    _check(x.to(torch.bfloat16), None, INF, 3, bs, sym, 0.9, torch.float16)


@pytest.mark.parametrize("sd", SCALE_DTYPES)
def test_corner_values(sd):
    big = 1e30 if sd != torch.float16 else 1e3
    tiny = 1e-40 if sd != torch.float16 else 1e-6
    parts = [
        torch.zeros(64), torch.full((64,), -0.0), torch.full((64,), 3.0),           # constant blocks
        torch.tensor([0.0, -0.0] * 32),                                               # signed zeros
        torch.linspace(-big, big, 64), torch.linspace(-tiny, tiny, 64),               # huge / tiny
        torch.tensor([1.0] * 63 + [-1.0]), torch.arange(64.0) * 0.5,                  # halves: ties
    ]
    x = torch.cat(parts)
    for bits in (2, 4, 8):
        for sym in (False, True):
            for bs in (64, 32, 48, 512):
                _check(x, None, INF, bits, bs, sym, None, sd)
                _check(x, None, float(x.abs().max()), bits, bs, sym, 0.75, sd)  # the max as outlier


def test_all_outlier_block_and_nan_propagation():
    x = torch.randn(256, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(256, dtype=torch.bool)
    mask[64:128] = True  # block 1 is all outliers: statistics 0
    _check(x, mask, INF, 4, 64, False, None, torch.float32)
    _check(x, mask, INF, 4, 64, True, None, torch.float32)
    x[70 + 64] = math.nan  # block 2 gets a NaN scale, the others stay finite
    for sym in (False, True):
        s = CQ.quantize(x, None, INF, 4, 64, sym, None, torch.float32)[1]
        assert torch.equal(torch.isfinite(s), torch.tensor([True, True, False, True]))


@pytest.mark.parametrize("outliers", [None, 0.01, {"zscore": 3.0}, torch.tensor([[0, 5], [7, 100]])])
@pytest.mark.parametrize("dt", DTYPES)
def test_public_op_auto_picks_cpu_and_matches_torch(outliers, dt):
    w = (torch.randn(64, 200, generator=torch.Generator().manual_seed(1)) * 0.02).to(dt)
    w0 = w.clone()
    before = CQ.stats["quantize"], CQ.stats["dequantize"]
    q = wweight.quantize(w, bits=4, block_size=64, outliers=outliers)       # auto: the cpu backend
    d = wweight.dequantize(q)
    assert CQ.stats["quantize"] > before[0] and CQ.stats["dequantize"] > before[1]
    qt = wweight.quantize(w, bits=4, block_size=64, outliers=outliers, backend="torch")
    for f in ("codes", "scale", "zero", "outlier_idx", "outlier_val"):
        assert _bits_equal(getattr(q, f), getattr(qt, f)), f
    assert _bits_equal(d, wweight.dequantize(qt, backend="torch"))
    assert _bits_equal(d, wweight.dequantize(qt, backend="reference"))
    assert torch.equal(w, w0)


def test_public_op_scale_fallbacks_match_torch():
    # tiny weights: float16 scales underflow -> float32 scales; huge: float16 overflows -> float32
    for w in (torch.randn(1000) * 1e-7, torch.randn(1000) * 1e6):
        q = wweight.quantize(w, bits=3, block_size=100, backend="cpu")
        qt = wweight.quantize(w, bits=3, block_size=100, backend="torch")
        assert q.scale.dtype == torch.float32
        assert _bits_equal(q.codes, qt.codes) and _bits_equal(q.scale, qt.scale) and _bits_equal(q.zero, qt.zero)


def test_float64_falls_back_to_torch_explicitly():
    w = torch.randn(500, dtype=torch.float64)
    fb = CQ.stats["fallback"]
    q = wweight.quantize(w, bits=4, block_size=64, backend="cpu")
    d = wweight.dequantize(q, backend="cpu")
    assert CQ.stats["fallback"] == fb + 2
    qt = wweight.quantize(w, bits=4, block_size=64, backend="torch")
    assert _bits_equal(q.codes, qt.codes) and _bits_equal(d, wweight.dequantize(qt, backend="torch"))
    x = torch.randn(100)  # a float64 scale dtype: torch as well
    got = CQ.quantize(x, None, INF, 4, 32, False, None, torch.float64)
    assert all(_bits_equal(a, b) for a, b in zip(got, TQ.quantize(x, None, INF, 4, 32, False, None, torch.float64)))


def test_bad_input_names_the_argument():
    x = torch.randn(100)
    codes, scale, zero, _ = CQ.quantize(x, None, INF, 4, 32, False, None, torch.float16)
    with pytest.raises(ValueError, match="codes"):
        CQ.dequantize(codes[:-1], scale, zero, 100, torch.float32, 4, 32)
    with pytest.raises(ValueError, match="scale"):
        CQ.dequantize(codes, scale[:-1], zero, 100, torch.float32, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        wweight.quantize(x, bits=9, backend="cpu")


def test_cuda_selftests_pass_on_the_cpu_backend():
    # the CUDA kernels' self-tests (same contract) must pass on this backend too
    from wweight.backends.cuda import quant as CUQ

    for op, fn in CUQ.SELFTESTS.items():
        assert fn(torch.device("cpu"), prims=CQ), op


def _plain_outliers(x, thr, mask):
    """The definition: sorted flat indices where float32 |x| >= thr (thr = inf: no threshold) or mask."""
    hit = x.float().abs() >= thr if math.isfinite(thr) else torch.zeros(x.numel(), dtype=torch.bool)
    if mask is not None:
        hit = hit | mask
    return torch.arange(x.numel(), dtype=torch.int64)[hit]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 65536 + 7, 300_001])
def test_outlier_indices_kernel_matches_the_definition(dt, n):
    from wweight.quant.outliers import outlier_indices
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 4).round().div(4).to(dt)   # a grid: big tie groups at every threshold
    if n > 70:
        x[3], x[70], x[-1] = float("nan"), float("inf"), -float("inf")
    mask = torch.rand(n, generator=g) < 0.01
    a = x.float().abs()
    finite = a[torch.isfinite(a)]
    thrs = [INF, 0.0, 1e-30]
    if finite.numel():
        thrs += [float(finite.max()), float(finite.median()), float(torch.nextafter(finite.max(), torch.tensor(0.0)))]
    for thr in thrs:
        for m in (None, mask):
            got = CQ.outliers(x, thr, m)
            want = _plain_outliers(x, thr, m)
            assert got.dtype == torch.int64 and torch.equal(got, want), (thr, m is not None)
            assert torch.equal(got, outlier_indices(x, thr, m))   # the torch path the kernel replaces


def test_outlier_indices_kernel_runs_multithreaded():
    # more than one OpenMP chunk per thread, the chunks' offsets in order
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 21, generator=g)
    thr = float(x.abs().kthvalue(x.numel() - 5000).values)
    got = CQ.outliers(x, thr, None)
    assert got.numel() >= 5000 and torch.equal(got, _plain_outliers(x, thr, None))
