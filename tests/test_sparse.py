"""Sparse family: every backend (C++ cpu, torch, Triton under the interpreter, CUDA when a GPU is
present) against the plain-torch reference (itself checked against mergekit in
test_sparse_mergekit.py), plus the API contract: errors, no input mutation, layouts, compile."""
import zlib
import random

import pytest
import torch

import wweight
from wweight import _dispatch
from wweight.reference import sparse as ref
from wweight.reference.philox import philox_uniform

from conftest import HAS_CUDA, requires_cuda, requires_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TA = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"]


def backends():
    out = ["torch"]
    if _dispatch.cpu_extension() is not None:
        out.append("cpu")
    try:
        import triton  # noqa: F401

        out.append("triton")
    except ImportError:
        pass
    if HAS_CUDA and _dispatch.cuda_extension() is not None:
        out.append("cuda")
    return out


def dev_for(backend):
    return "cuda" if backend in ("cuda",) or (backend == "triton" and HAS_CUDA) else "cpu"


def make_case(rng: random.Random, g: torch.Generator, dtype, n_max=3000):
    shape = rng.choice([(0,), (1,), (5,), (1023,), (1025,), (37, 29), (3, 4, 5), (n_max,)])
    base = torch.randn(shape, generator=g).to(dtype)
    K = rng.choice([1, 2, 3, 4])
    ts = []
    for _ in range(K):
        t = base.float() + 0.1 * torch.randn(shape, generator=g)
        if rng.random() < 0.5 and t.numel() > 4:          # plant ties and exact zeros in the delta
            flat = t.reshape(-1)
            flat[:: rng.choice([3, 7])] = flat[1]
            flat[2::11] = base.reshape(-1)[2::11].float()
        ts.append(t.to(dtype))
    return base, ts


def assert_same(got, want, exact=True, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if exact:
        assert torch.equal(got, want), (what, (got.float() - want.float()).abs().max())
    else:
        # float32 rescale factors reduce the norms in another order than torch.sum: last bits. Up to
        # K = 5 rescaled deltas, each factor an ulp or two off, times weights up to 1.7 and summed:
        # a few ulps of the largest magnitude in play (3.6e-6 at scale 2.9 was seen under load)
        scale = max(1.0, float(want.float().abs().max())) if want.numel() else 1.0
        if got.dtype in (torch.float16, torch.bfloat16):  # a last-bit factor change can flip one output rounding
            ulp = float(torch.finfo(got.dtype).eps)
            torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp * scale, msg=what)
            return
        torch.testing.assert_close(got.float(), want.float(), rtol=4e-6, atol=4e-6 * scale, msg=what)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_largest_abs_exact(backend, dtype):
    g = torch.Generator().manual_seed(0)
    dev = dev_for(backend)
    for n in (1, 2, 1000, 5000):
        x = torch.randn(n, generator=g).to(dtype)
        if n > 10:
            x[::3] = x[5]                  # ties
            x[1::17] = 0.0
        for k in sorted({1, 2, n // 3 + 1, n // 2, n}):
            if not 1 <= k <= n:
                continue
            want = torch.kthvalue(x.abs().float(), n - k + 1).values.to(dtype)
            got = wweight.kth_largest_abs(x.to(dev), k, backend=backend)
            assert got.shape == () and got.dtype == dtype
            assert torch.equal(got.cpu(), want), (n, k)


def test_kth_largest_abs_nan_counts_as_largest():
    x = torch.tensor([1.0, float("nan"), -3.0, 2.0])
    assert torch.isnan(wweight.kth_largest_abs(x, 1))
    assert wweight.kth_largest_abs(x, 2) == 3.0
    assert torch.equal(wweight.kth_largest_abs(x, 2, backend="reference"), torch.tensor(3.0))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsify_matches_reference(backend, dtype):
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    dev = dev_for(backend)
    for trial in range(24):
        base, ts = make_case(rng, g, dtype)
        x = ts[0] - base
        method = ["magnitude", "magnitude_outliers", "random"][trial % 3]
        density = rng.choice([0.0, 0.05, 0.3, 0.5, 0.99, 1.0])
        gamma = rng.choice([0.0, 0.01, 0.2])
        norm = rng.choice([None, "l1", "l2", "linf", "density"])
        if norm == "density" and density == 0:
            norm = None
        want = ref.sparsify_ref(x, density, method, gamma=gamma, rescale_norm=norm, seed=trial)
        got = wweight.sparsify(x.to(dev), density, method, gamma=gamma, rescale_norm=norm, seed=trial,
                               backend=backend).cpu()
        assert torch.equal(got != 0, want != 0), (trial, method, density, norm)
        assert_same(got, want, exact=norm in (None, "density") or dtype != torch.float32 or density >= 1,
                    what=(trial, method, density, gamma, norm))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", TA + ["linear"])
def test_merge_matches_reference(backend, dtype, method):
    rng, g = random.Random(zlib.crc32(repr((method, str(dtype))).encode()) % 10_000), torch.Generator().manual_seed(2)
    dev = dev_for(backend)
    for trial in range(5):
        base, ts = make_case(rng, g, dtype)
        K = len(ts)
        weights = [rng.choice([1.0, 0.5, 0.3, -0.4, 1.7]) for _ in range(K)]
        if method == "linear" and abs(sum(weights)) < 0.1:
            weights[0] += 1.0
        density = [rng.choice([0.1, 0.5, 0.9, 1.0]) for _ in range(K)]
        gamma = [rng.choice([0.0, 0.01, 0.1]) for _ in range(K)]
        kw = dict(weights=weights, density=density, gamma=gamma, seed=trial,
                  lambda_=rng.choice([1.0, 0.6]), normalize=rng.choice([None, True, False]),
                  rescale=rng.choice([None, True, False]))
        if method == "linear":
            kw = dict(weights=weights, seed=trial)
        want = wweight.merge_tensors(method, base, ts, backend="reference", **kw)
        got = wweight.merge_tensors(method, base.to(dev), [t.to(dev) for t in ts], backend=backend, **kw).cpu()
        rescaled = "dare" in method or kw.get("rescale")
        if method == "linear":
            # mergekit accumulates with addcmul (possibly fused): one rounding of the output dtype apart
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6,
                                       atol=1e-6)
        else:
            # rescale factors are computed in the work dtype, float32 for fp32 and fp16 inputs (fp16 upcasts as
            # in mergekit): the reference's torch sum and the kernels' float64 partials can differ in its last bit
            exact = not (rescaled and dtype in (torch.float32, torch.float16))
            assert_same(got, want, exact=exact, what=(method, trial))


@pytest.mark.parametrize("backend", backends())
def test_della_runs_on_every_backend(backend):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g)
    ts = [base + 0.1 * torch.randn(40, 30, generator=g) for _ in range(3)]
    dev = dev_for(backend)
    for m in ("della", "della_linear"):
        want = wweight.merge_tensors(m, base, ts, density=0.5, epsilon=0.1, seed=4, backend="reference")
        got = wweight.merge_tensors(m, base.to(dev), [t.to(dev) for t in ts], density=0.5, epsilon=0.1, seed=4,
                                    backend=backend)
        # della rescales by l1 norms: the reference reduces them as mergekit does (torch's fp32 sum, thread-count
        # dependent), the other backends in a fixed order (float64 row sums + fsum): last-bit differences
        torch.testing.assert_close(got.cpu(), want, rtol=2e-6, atol=1e-7)


_THREADS_SCRIPT = r"""
import hashlib, sys, torch, wweight
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
out = []
for dt in (torch.float32, torch.bfloat16):
    base = torch.randn(300, 700, generator=g).to(dt)   # 210k elements: above torch's parallel grain
    ts = [(base.float() + 0.05 * torch.randn(300, 700, generator=g)).to(dt) for _ in range(3)]
    for m in sys.argv[2].split(","):
        r = wweight.merge_tensors(m, base, ts, density=0.4, epsilon=0.1, seed=3)
        out.append(hashlib.sha256(r.view(torch.int16 if dt == torch.bfloat16 else torch.int32).numpy().tobytes())
                   .hexdigest()[:16])
print(" ".join(out))
"""


def test_merges_do_not_depend_on_the_thread_count():
    """Issue 14: every task-arithmetic method, DELLA included, gives the same bits with 1 and 2 threads (the
    README promises identical reruns across thread counts for them; the iso methods are excluded there)."""
    import subprocess
    import sys

    methods = "linear,task_arithmetic,ties,dare_ties,dare_linear,breadcrumbs,breadcrumbs_ties,della,della_linear"
    import tempfile

    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, and a bare checkout's source
    # tree has no compiled extensions (the test would exercise the torch path instead of the installed one)
    outs = [subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(t), methods], capture_output=True, text=True,
                           check=True, cwd=tempfile.gettempdir()).stdout.split() for t in (1, 2)]
    assert len(outs[0]) == 18
    diff = [m for m, a, b in zip(methods.split(",") * 2, *outs) if a != b]
    assert not diff, f"thread-count dependent: {diff}"


try:
    import triton
    import triton.language as tl

    from wweight.kernels.philox import uniform_block

    @triton.jit
    def _uniform_kernel(out, start, n, seed_lo, seed_hi, stream, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        u = uniform_block(start + pid.to(tl.int64) * BLOCK, seed_lo, seed_hi, stream, BLOCK)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, u, mask=offs < n)
except ImportError:  # pragma: no cover
    _uniform_kernel = None


@requires_triton
def test_triton_philox_matches_torch_stream_past_2_32_counters():
    seed = 0x0123456789ABCDEF
    dev = "cuda" if HAS_CUDA else "cpu"
    for start in (0, 4 * (2 ** 32) - 256, 2 ** 40):      # counters beyond 32 bits: 64-bit index path
        out = torch.empty(600, device=dev)
        _uniform_kernel[(3,)](out, start, 600, seed & 0xFFFFFFFF, seed >> 32, 7, BLOCK=256)
        assert torch.equal(out.cpu(), philox_uniform(600, seed, 7, start=start))


def test_cpu_extension_philox_matches_torch_stream():
    ext = _dispatch.cpu_extension()
    if ext is None:
        pytest.skip("C++ CPU extension not built")
    for start in (0, 3, 2 ** 33 + 1):
        out = torch.empty(100)
        ext.philox_uniform(99, 5, start, 100, out.data_ptr())
        assert torch.equal(out, philox_uniform(100, 99, 5, start=start))


def test_philox_known_answer():
    from wweight.reference.philox import philox4x32

    z = torch.zeros(1, dtype=torch.int64)
    got = [int(v) for v in philox4x32(z, z, z, z, 0, 0)]
    assert got == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]   # Random123 KAT, philox4x32_10


@pytest.mark.parametrize("backend", backends())
def test_same_seed_same_mask_everywhere(backend):
    x = torch.randn(4099)
    want = wweight.sparsify(x, 0.3, "random", seed=123, backend="reference")
    got = wweight.sparsify(x.to(dev_for(backend)), 0.3, "random", seed=123, backend=backend).cpu()
    assert torch.equal(got, want)
    other = wweight.sparsify(x, 0.3, "random", seed=124)
    assert not torch.equal(other, want)
    kept = (want != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.03


@pytest.mark.slow
def _available_memory():
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def test_big_tensor_index_path_past_2_31():
    """kth_largest_abs and a fused sparsify over > 2**31 elements (64-bit offsets), on the CPU kernels."""
    if _dispatch.cpu_extension() is None:
        pytest.skip("C++ CPU extension not built")
    n = 2 ** 31 + 4096
    need = 9 * 2 ** 30          # the bf16 input (4.3 GB), the output and the work buffers: 8.8 GB measured
    avail = _available_memory()
    if avail is not None and avail < need:
        pytest.skip(f"needs about {need / 2**30:.0f} GiB of free memory, this machine has {avail / 2**30:.1f} GiB")
    try:
        x = torch.zeros(n, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("not enough memory")
    idx = torch.tensor([5, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 7, n - 1])
    x[idx] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0], dtype=torch.bfloat16)
    assert wweight.kth_largest_abs(x, 2).item() == 4.0
    y = wweight.sparsify(x, 3.5 / n, "magnitude")          # keeps int(density * n) = 3 elements
    assert y[idx].tolist() == [0.0, 0.0, 3.0, -4.0, 5.0]
    assert int(torch.count_nonzero(y)) == 3
    del x, y


# ------------------------------------------------------------------------------ API contract


def test_inputs_not_modified_and_layouts():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 48, generator=g)
    ts = [base + 0.1 * torch.randn(64, 48, generator=g) for _ in range(3)]
    nc = [t.t() for t in ts]                       # non-contiguous views
    copies = [t.clone() for t in ts]
    out = wweight.merge_tensors("ties", base.t(), nc, density=0.3)
    want = wweight.merge_tensors("ties", base.t().contiguous(), [t.contiguous() for t in nc], density=0.3)
    assert torch.equal(out, want) and out.shape == (48, 64)
    for a, b in zip(ts, copies):
        assert torch.equal(a, b)
    empty = torch.empty(0, 3)
    assert wweight.merge_tensors("ties", empty, [empty, empty], density=0.5).shape == (0, 3)
    assert wweight.sparsify(empty, 0.5).shape == (0, 3)
    s = wweight.sparsify(base, 1.0)
    assert torch.equal(s, base) and s.data_ptr() != base.data_ptr()


@pytest.mark.parametrize("bad, err, match", [
    (dict(method="nope"), ValueError, "method"),
    (dict(density=1.5), ValueError, "density"),
    (dict(density=-0.1), ValueError, "density"),
    (dict(gamma=2.0), ValueError, "gamma"),
    (dict(weights=[1.0]), ValueError, "weights"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(lambda_=float("nan")), ValueError, "lambda_"),
])
def test_bad_arguments_are_named(bad, err, match):
    base = torch.randn(10)
    ts = [base + 1, base - 1]
    kw = dict(method="ties", density=0.5)
    kw.update(bad)
    with pytest.raises(err, match=match):
        wweight.merge_tensors(kw.pop("method"), base, ts, **kw)


def test_bad_tensors_are_named():
    base = torch.randn(10)
    with pytest.raises(ValueError, match="tensors is empty"):
        wweight.merge_tensors("ties", base, [])
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape"):
        wweight.merge_tensors("ties", base, [base, torch.randn(11)])
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype"):
        wweight.merge_tensors("ties", base, [base.half()])
    with pytest.raises(TypeError, match="floating-point"):
        wweight.merge_tensors("ties", base.long(), [base.long()])
    # base=None: the tensors are task vectors (PEFT's habit, issue 14), not an error
    assert torch.equal(wweight.merge_tensors("ties", None, [base]),
                       wweight.merge_tensors("ties", torch.zeros_like(base), [base]))
    with pytest.raises(ValueError, match="epsilon"):
        wweight.merge_tensors("della", base, [base + 1], density=0.5, epsilon=0.6)
    with pytest.raises(ValueError, match=r"k must be in"):
        wweight.kth_largest_abs(base, 11)
    with pytest.raises(TypeError, match="k must be an int"):
        wweight.kth_largest_abs(base, 2.0)
    with pytest.raises(ValueError, match="rescale_norm"):
        wweight.sparsify(base, 0.5, rescale_norm="l3")


@pytest.mark.parametrize("backend", backends())
def test_nan_and_inf_are_refused_with_the_input_named(backend):
    dev = dev_for(backend)
    base = torch.randn(3000).to(dev)
    good = base + 1
    bad = good.clone()
    bad[1234] = float("nan")
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        wweight.merge_tensors("ties", base, [good, bad], density=0.5, backend=backend)
    inf_base = base.clone()
    inf_base[7] = float("inf")
    with pytest.raises(ValueError, match="base"):
        wweight.merge_tensors("task_arithmetic", inf_base, [good], backend=backend)
    with pytest.raises(ValueError, match="NaN"):
        wweight.sparsify(bad, 0.5, backend=backend)


def test_backend_forcing():
    x = torch.randn(100)
    with wweight.use_backend("reference"):
        assert _dispatch.requested() == "reference"
        wweight.sparsify(x, 0.5)
    with pytest.raises(ValueError, match="backend"):
        wweight.sparsify(x, 0.5, backend="gpu")
    with pytest.raises(RuntimeError, match="cuda"):
        wweight.sparsify(x, 0.5, backend="cuda")


def test_float64_goes_through_the_reference():
    base = torch.randn(50, dtype=torch.float64)
    ts = [base + 0.1, base - 0.2]
    out = wweight.merge_tensors("ties", base, ts, density=0.5)
    assert out.dtype == torch.float64
    assert torch.equal(out, wweight.merge_tensors("ties", base, ts, density=0.5, backend="reference"))


def test_merge_state_dicts_task_arithmetic_family():
    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(8, 4, generator=g), "b": torch.randn(8, generator=g), "step": torch.tensor(3)}
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
           for _ in range(3)]
    out = wweight.merge_state_dicts("task_arithmetic", base, fts, alpha=0.5)
    for k in ("w", "b"):
        torch.testing.assert_close(out[k], base[k] + 0.5 * sum(f[k] - base[k] for f in fts))
    assert torch.equal(out["step"], base["step"])
    a = wweight.merge_state_dicts("dare_ties", base, fts, density=0.5, seed=1)
    b = wweight.merge_state_dicts("dare_ties", base, fts, density=0.5, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"finetuned\[1\] keys differ"):
        wweight.merge_state_dicts("ties", base, [fts[0], {"w": base["w"]}])
    with pytest.raises(ValueError, match="key 'w'"):
        wweight.merge_state_dicts("ties", base, fts, density=2.0)


def test_custom_ops_work_under_torch_compile():
    base = torch.randn(300)
    ts = [base + 0.1 * torch.randn(300) for _ in range(2)]

    def f(b, t0, t1):
        return wweight.merge_tensors("ties", b, [t0, t1], density=0.5, seed=0) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(base, *ts), f(base, *ts))
    torch.library.opcheck(torch.ops.wweight.kth_largest_abs.default, (base, 7, "auto"))
    torch.library.opcheck(torch.ops.wweight.sparsify.default, (base, 0.5, "magnitude", 0.01, 0.15, "", 0, 0, "auto"))


@requires_cuda
def test_cuda_selftest_passes():
    from wweight.backends.cuda import sparse as cuda_sparse

    assert cuda_sparse.selftest(torch.device("cuda"))


def test_deterministic_merges_leave_the_global_rng_alone():
    """Only DARE/DELLA draw a seed from torch's generator when none is given (PEFT adapter finding)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, generator=g)
    ts = [base + torch.randn(64, generator=g) for _ in range(2)]
    for m in ("linear", "task_arithmetic", "ties", "breadcrumbs_ties"):
        torch.manual_seed(5)
        wweight.merge_tensors(m, None if m == "linear" else base, ts)
        wweight.merge_state_dicts(m, None if m == "linear" else {"w": base}, [{"w": t} for t in ts])
        assert torch.equal(torch.rand(3), torch.manual_seed(5) and torch.rand(3)), m
    torch.manual_seed(5)
    wweight.merge_tensors("dare_ties", base, ts)
    drawn = torch.rand(3)
    assert not torch.equal(drawn, torch.manual_seed(5) and torch.rand(3))
