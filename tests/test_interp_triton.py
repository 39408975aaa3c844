"""The Triton kernels of slerp's blend, nearswap, RAM and RAM+ against mergekit 0.1.5 and the reference.

Here (no GPU) the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors: numpy float32 semantics,
i.e. every op one IEEE rounding, ``div_rn`` exact, no FMA contraction, bf16 rounded by the integer
RTNE of ``_round`` (the interpreter's float->bf16 cast truncates, so the kernels never rely on it),
fp16 by numpy's RTNE cast (= ``cvt.rn.f16.f32``). Each case is compared bit for bit (signed zeros
included; NaN equal to NaN) with mergekit's own method object and with ``backend="reference"``.

What only a GPU can show, and what covers it without one (``tests/test_triton_aot.py`` compiles
these kernels for sm_90 / sm_80): contraction of a product into a sum (the launch disables it,
the PTX check requires 0 ``fma.rn``), approximate division (no ``div.full`` / ``rcp.approx``),
vector widths and spills. Not covered by either: NaN semantics of nearswap's clamp (fp16: 1/1e-6
overflows to inf, inf * t=0 is NaN; the interpreter's max/min propagate NaN whatever the flag, the
GPU's only with the explicit ``propagate_nan=ALL`` the kernel passes) -- the ``gpu`` test at the end
runs the same cases on CUDA tensors. (Signed zeros of masked-out task-vector entries cannot reach a
result: RAM's K-sum starts at +0, so ``x * mask`` and a select give the same bits.) On a GPU
slerp's coefficients come from CUDA's reductions (another summation order than the CPU's), so there
slerp is compared with the reference on the same CUDA tensors; the elementwise methods with the CPU
reference (mergekit's CPU bits: their only reduction, RAM's K-sum, is in the kernel).
"""
import random
import warnings

import pytest
import torch

import wweight
from conftest import HAS_CUDA, requires_triton
from wweight.backends.triton.launch import recording
from wweight.interp import fast

mk_base = pytest.importorskip("mergekit.merge_methods.base")
mk_registry = pytest.importorskip("mergekit.merge_methods.registry")

pytestmark = requires_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (1,), (1, 1), (2,), (7,), (3, 5), (17, 33), (1030,), (2, 1031)]
KERNEL = {"slerp": "_slerp_blend_kernel", "nearswap": "_nearswap_kernel", "ram": "_ram_merge_kernel",
          "ramplus_tl": "_ram_merge_kernel"}
N_CASES = 50


def mergekit(name, base, tensors, params):
    """mergekit's registered method on one TensorGroup (base first), as its executor calls it."""
    group = mk_base.TensorGroup.from_tensors([base] + list(tensors), base_index=0)
    (out,) = mk_registry.get(name)([group], parameters=params)
    return out.to(tensors[0].dtype)


def bits_equal(a, b):
    """Same shape, dtype and bits (so -0 != +0); NaN equal to NaN (payloads differ across devices)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    iv = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return bool(((a.view(iv) == b.view(iv)) | (a.isnan() & b.isnan())).all())


def _case(name, rng):
    """(base, tensors, wweight kwargs, mergekit parameters) of one random case."""
    shape, dtype = rng.choice(SHAPES), rng.choice(DTYPES)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    base = torch.randn(shape, generator=g) * rng.choice([1.0, 1e-3])
    if name == "slerp":
        kind = rng.choice(["random", "random", "colinear", "opposite", "zero_other", "zero_base", "near", "same"])
        other = {"random": lambda: torch.randn(shape, generator=g),
                 "colinear": lambda: base * rng.choice([0.5, 2.0]),
                 "opposite": lambda: -base,
                 "zero_other": lambda: torch.zeros(shape),
                 "zero_base": lambda: torch.randn(shape, generator=g),
                 "near": lambda: base + 1e-3 * torch.randn(shape, generator=g),   # dot > 0.9995: linear
                 "same": lambda: base.clone()}[kind]()
        if kind == "zero_base":
            base = torch.zeros(shape)
        t = rng.choice([0.0, 0.25, 0.5, 0.7, 1.0])
        return base.to(dtype), [other.to(dtype)], {"t": t}, {"t": t}
    if name == "nearswap":
        other = base + torch.randn(shape, generator=g) * rng.choice([0.0, 1e-6, 1e-3, 0.1, 1.0])
        t = rng.choice([0.0, 1e-4, 0.01, 0.1, 1.0])
        return base.to(dtype), [other.to(dtype)], {"t": t}, {"t": t}
    K = rng.randint(1, 4)
    eps = rng.choice([1e-5, 1e-3, 0.05])
    ds = []
    for _ in range(K):
        d = torch.randn(shape, generator=g) * rng.choice([1e-3, 0.02, 0.3])
        d = d * (torch.rand(shape, generator=g) < 0.5)          # disjoint and overlapping supports
        near = torch.rand(shape, generator=g) < 0.2              # entries at the epsilon threshold
        d = torch.where(near, eps * (1 + torch.randn(shape, generator=g) * 0.01), d)
        ds.append(d)
    b = base.to(dtype)
    ts = [(b.float() + d).to(dtype) for d in ds]
    kw = {"epsilon": eps}
    if name == "ramplus_tl":
        kw.update(r=rng.choice([0.1, 0.5]), alpha=rng.choice([0.2, 1.0]))
    return b, ts, kw, dict(kw)


def _run_triton(name, base, ts, kw, device):
    with recording() as launches, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)        # numpy: fp16 1/1e-6 overflows to inf (as torch)
        out = wweight.merge_tensors(name, base.to(device), [t.to(device) for t in ts], backend="triton", **kw)
    return out, {k.fn.__name__ for k, *_ in launches}


def _check_cases(name, device):
    rng = random.Random(sum(map(ord, name)))
    rounding_mattered = 0
    for i in range(N_CASES):
        base, ts, kw, mk = _case(name, rng)
        saved = [x.clone() for x in [base] + ts]
        got, kernels = _run_triton(name, base, ts, kw, device)
        assert KERNEL[name] in kernels, (name, kernels)
        if device != "cpu" and name == "slerp":
            # CUDA's norm / dot reductions: the reference on the same device (mergekit on that GPU)
            want = wweight.merge_tensors(name, base.to(device), [t.to(device) for t in ts], backend="reference", **kw)
        else:
            want = mergekit(name, base, ts, mk)
            assert bits_equal(wweight.merge_tensors(name, base, ts, backend="reference", **kw), want), (i, name)
        assert got.device.type == torch.device(device).type
        assert bits_equal(got, want), (i, name, base.shape, base.dtype, kw, int((got.cpu() != want.cpu()).sum()))
        for x, x0 in zip([base] + ts, saved):
            assert bits_equal(x, x0)
        if base.dtype != torch.float32 and base.numel() and name in ("nearswap", "ram"):
            # the same method rounded once at the end instead of after each op: must differ somewhere
            fb, fts = base.float(), [t.float() for t in ts]
            once = fast.nearswap(fb, fts[0], kw["t"]) if name == "nearswap" else fast.ram(fb, fts, kw["epsilon"])
            once = once.to(base.dtype)
            rounding_mattered += not bits_equal(once, want)
    if name in ("nearswap", "ram"):
        assert rounding_mattered > 0   # the cases exercise the per-op 16-bit rounding


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors under the interpreter; the gpu test covers CUDA")
@pytest.mark.parametrize("name", list(KERNEL))
def test_kernels_bit_identical_to_mergekit_interpreted(name):
    _check_cases(name, "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors under the interpreter")
def test_routing_and_fallbacks():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(33, generator=g).bfloat16()
    ts = [base + 0.1 * torch.randn(33, generator=g).bfloat16() for _ in range(5)]
    # CPU tensors by default: fast.py (torch), no launch
    with recording() as launches:
        wweight.merge_tensors("nearswap", base, ts[:1], t=0.1)
    assert not launches
    # K >= 5: RAM / RAM+ keep torch's K-sum (its CPU order past 4 models depends on the column)
    for name in ("ram", "ramplus_tl"):
        with recording() as launches:
            got = wweight.merge_tensors(name, base, ts, backend="triton")
        assert not launches
        assert bits_equal(got, getattr(fast, name)(base, ts))
    # float64 and empty tensors: fast.py, same numbers as the reference
    d = [t.double() for t in ts]
    for name, xs, kw in [("slerp", d[1:2], {"t": 0.3}), ("nearswap", d[1:2], {"t": 0.1}), ("ram", d[1:3], {})]:
        with recording() as launches:
            got = wweight.merge_tensors(name, d[0], xs, backend="triton", **kw)
        assert not launches and torch.equal(got, wweight.merge_tensors(name, d[0], xs, backend="reference", **kw))
    e = torch.empty(0, 3)
    assert wweight.merge_tensors("slerp", e, [e], t=0.5, backend="triton").shape == (0, 3)
    assert wweight.merge_tensors("ramplus_tl", e, [e, e], backend="triton").shape == (0, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(KERNEL))
def test_kernels_bit_identical_on_cuda(name):
    _check_cases(name, "cuda")
    # the default route for CUDA tensors is the kernel
    base = torch.randn(4099, device="cuda").bfloat16()
    ts = [base + 0.01 * torch.randn_like(base) for _ in range(2)]
    kw = {"t": 0.4} if name in ("slerp", "nearswap") else {}
    with recording() as launches:
        wweight.merge_tensors(name, base, ts[:1] if kw else ts, **kw)
    assert KERNEL[name] in {k.fn.__name__ for k, *_ in launches}
