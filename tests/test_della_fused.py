"""The fused C++ DELLA path (csrc/cpu/della_cpu.cpp, backend "cpu") against the torch reference.

The fused path must give the numbers every other backend gives today (the reference with
thread-count independent norms, ``fixed_order=True``) bit for bit: compared as raw bits, so a -0 /
+0 difference fails too. mergekit itself is compared in tests/test_sparse_mergekit.py (which runs
the default backend, i.e. this path, on CPU).
"""
import os
import subprocess
import sys

import pytest
import torch

import wweight
from wweight.backends.cpu import sparse as cpu_sparse
from wweight.reference import sparse as ref

pytestmark = pytest.mark.skipif(not cpu_sparse.della_available(), reason="wweight._cpu without the DELLA kernels")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def assert_bit_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (bits(got) != bits(want)).sum().item()
    assert diff == 0, f"{diff} of {want.numel()} elements differ"


def make(shape, dtype, K, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = []
    for _ in range(K):
        if ties:   # few distinct magnitudes (and zeros): many ties inside every row
            d = torch.randint(-3, 4, shape, generator=g).float() * 0.125
        else:
            d = torch.randn(shape, generator=g) * 0.01
        xs.append((base.float() + d).to(dtype))
    return base, xs


def merge_both(method, base, xs, **kw):
    K = len(xs)
    weights = kw.pop("weights", [1.0] * K)
    density = kw.pop("density", [0.4] * K)
    epsilon = kw.pop("epsilon", [0.15] * K)
    lam = kw.pop("lambda_", 1.0)
    seed = kw.pop("seed", 7)
    normalize = kw.pop("normalize", None)
    rescale = kw.pop("rescale", None)
    got = wweight.merge_tensors(method, base, xs, weights=weights, density=density, epsilon=epsilon, lambda_=lam,
                                normalize=normalize, rescale=rescale, seed=seed, backend="cpu")
    want = ref.task_arithmetic_family_ref(method, base, xs, weights, density, [0.0] * K, epsilon, lam, normalize,
                                          rescale, seed, fixed_order=True)
    return got, want


SHAPES = [(37, 129), (5, 300), (3, 1000), (200, 700), (1000,), (), (4, 70, 3), (6, 1), (9, 20), (2, 65)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_della_merge_bit_identical(shape, dtype):
    for i, method in enumerate(("della", "della_linear")):
        K = 2 + (len(shape) + i + SHAPES.index(shape)) % 4   # K = 2..5 over the cases
        base, xs = make(shape, dtype, K, seed=SHAPES.index(shape) * 10 + i)
        got, want = merge_both(method, base, xs, weights=[1.0, 0.5, -0.3, 2.0, 0.7][:K])
        assert_bit_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_della_ties_within_rows(dtype):
    # stable ranks: equal magnitudes are ranked by index, as argsort(stable=True)
    for shape in [(8, 40), (8, 500), (3, 4000)]:
        base, xs = make(shape, dtype, 3, seed=1, ties=True)
        for method in ("della", "della_linear"):
            got, want = merge_both(method, base, xs)
            assert_bit_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_della_options(dtype, rescale, normalize):
    base, xs = make((17, 333), dtype, 4, seed=3)
    for method in ("della", "della_linear"):
        got, want = merge_both(method, base, xs, rescale=rescale, normalize=normalize, lambda_=0.7,
                               weights=[0.3, 1.0, 0.6, 0.2])
        assert_bit_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_della_density_epsilon_edges(dtype):
    base, xs = make((11, 257), dtype, 4, seed=4)
    cases = [([1.0, 0.0, 0.5, 0.3], [0.15, 0.15, 0.4999, 0.001]),   # keep all, drop all, widest, narrowest
             ([0.999, 0.001, 0.5, 0.5], [0.0009, 0.0009, 0.0, 0.25])]
    for density, epsilon in cases:
        for method in ("della", "della_linear"):
            got, want = merge_both(method, base, xs, density=density, epsilon=epsilon)
            assert_bit_equal(got, want)


def test_della_seeds_and_streams_differ():
    # a test that can fail the other way: the draw depends on the seed and on the model index
    base, xs = make((64, 256), torch.float32, 2, seed=5)
    a = wweight.merge_tensors("della_linear", base, xs, density=0.5, seed=1, backend="cpu")
    b = wweight.merge_tensors("della_linear", base, xs, density=0.5, seed=2, backend="cpu")
    assert not torch.equal(a, b)
    s0 = wweight.sparsify(xs[0] - base, 0.5, "della_magprune", seed=1, stream=0, backend="cpu")
    s1 = wweight.sparsify(xs[0] - base, 0.5, "della_magprune", seed=1, stream=1, backend="cpu")
    assert not torch.equal(s0 != 0, s1 != 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [None, "l1", "l2", "linf", "density"])
def test_della_sparsify_bit_identical(dtype, norm):
    for j, shape in enumerate([(37, 129), (4000,), (), (3, 50, 2), (2, 3000)]):
        x = (torch.randn(shape, generator=torch.Generator().manual_seed(j)) * 0.02).to(dtype)
        for density, eps in [(0.3, 0.1), (0.5, 0.0), (1.0, 0.1), (0.0, 0.1)]:
            if density == 0 and norm == "density":
                continue   # refused: rescale_norm='density' needs density > 0
            got = wweight.sparsify(x, density, "della_magprune", epsilon=eps, rescale_norm=norm, seed=11, stream=2,
                                   backend="cpu")
            want = ref.sparsify_ref(x, density, "della_magprune", epsilon=eps, rescale_norm=norm, seed=11, stream=2,
                                    fixed_order=True)
            assert_bit_equal(got, want)


def test_della_bf16_long_rows_round_ranks():
    # bf16 ranks above 256 are rounded to 8 bits as torch rounds them: rows of 5000 exercise that
    base, xs = make((2, 5000), torch.bfloat16, 3, seed=9)
    got, want = merge_both("della", base, xs, density=[0.2, 0.5, 0.8], epsilon=[0.1, 0.3, 0.15])
    assert_bit_equal(got, want)


def test_della_matches_reference_backend_default_path():
    # the cpu backend and today's non-reference path (triton/torch/cuda run the reference with
    # fixed_order=True): the same call through backend="torch" must give the same bits
    base, xs = make((33, 77), torch.bfloat16, 3, seed=12)
    a = wweight.merge_tensors("della", base, xs, density=0.4, seed=3, backend="cpu")
    b = wweight.merge_tensors("della", base, xs, density=0.4, seed=3, backend="torch")
    assert_bit_equal(a, b)


def test_della_nonfinite_named_and_inputs_untouched():
    base, xs = make((8, 100), torch.float32, 3, seed=13)
    xs[1][3, 7] = float("nan")
    copies = [t.clone() for t in xs]
    with pytest.raises(ValueError, match=r"tensors\[1\] contains NaN or Inf"):
        wweight.merge_tensors("della", base, xs, density=0.4, seed=0, backend="cpu")
    for t, c in zip(xs, copies):
        assert torch.equal(t.nan_to_num(0.5), c.nan_to_num(0.5))
    b2 = base.clone()
    b2[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"base contains NaN or Inf"):
        wweight.merge_tensors("della", b2, copies[:1] + [copies[0]], density=0.4, seed=0, backend="cpu")
    with pytest.raises(ValueError, match=r"tensor contains NaN or Inf"):
        wweight.sparsify(xs[1], 0.4, "della_magprune", seed=0, backend="cpu")


def test_della_inputs_not_modified():
    base, xs = make((16, 300), torch.bfloat16, 3, seed=14)
    copies = [base.clone()] + [t.clone() for t in xs]
    wweight.merge_tensors("della", base, xs, density=0.4, seed=0, backend="cpu")
    for t, c in zip([base] + xs, copies):
        assert_bit_equal(t, c)


def test_della_empty_tensor():
    base = torch.zeros((0, 5))
    out = wweight.merge_tensors("della", base, [base.clone(), base.clone()], density=0.4, seed=0, backend="cpu")
    assert out.shape == (0, 5)


def test_della_thread_count_independent(tmp_path):
    # the fused path in a child with one OpenMP thread gives the bits of this process (2+ threads here);
    # the child runs outside the checkout: `python -c` there would import the extension-less source tree
    code = ("import torch,wweight;assert wweight.__file__ == %r, wweight.__file__;"
            "g=torch.Generator().manual_seed(0);b=torch.randn(300,900,generator=g);" % wweight.__file__ +
            "xs=[b+0.01*torch.randn(300,900,generator=g) for _ in range(3)];"
            "o=wweight.merge_tensors('della',b,xs,density=0.3,seed=5,backend='cpu');"
            "import sys;sys.stdout.buffer.write(o.view(torch.int32).numpy().tobytes())")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    one = proc.stdout
    g = torch.Generator().manual_seed(0)
    b = torch.randn(300, 900, generator=g)
    xs = [b + 0.01 * torch.randn(300, 900, generator=g) for _ in range(3)]
    here = wweight.merge_tensors("della", b, xs, density=0.3, seed=5, backend="cpu")
    assert one == here.view(torch.int32).numpy().tobytes()


@pytest.mark.parametrize("K", [6, 8, 9, 13, 16])
def test_della_many_models_sum_order(K):
    # K >= 5: the reference's sums over the models follow torch's row_sum order on the tail columns
    # (interleaved partials); K >= 16 goes to the reference itself
    for dtype in (torch.float32, torch.bfloat16):
        base, xs = make((3, 100), dtype, K, seed=K)
        w = [0.3 + 0.1 * i for i in range(K)]
        for method in ("della", "della_linear"):
            got, want = merge_both(method, base, xs, weights=w, density=[0.6] * K, epsilon=[0.2] * K)
            assert_bit_equal(got, want)


def test_della_elem_compiles_for_sm90(tmp_path):
    # csrc/della_elem.h is meant for a CUDA DELLA kernel too: it must compile as device code (sm_90) with
    # setup.py's flags, and its element logic must need no stack or local memory (no spills)
    from wweight.backends.cuda import aot
    if aot.nvcc() is None or aot.cuobjdump() is None or aot.pybind11_include() is None:
        pytest.skip("needs nvcc, cuobjdump and pybind11 headers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, "tests", "cuda", "della_elem_check.cu")
    out = str(tmp_path / "della_elem_check.cubin")
    r = aot.compile_cubin(src, out, 90, extra=[f"-I{os.path.join(root, 'csrc')}"], timeout=300)
    assert r.returncode == 0, f"nvcc failed:\n{r.stderr[-4000:]}"
    usage = {k: v for k, v in aot.res_usage(out).items() if "della_elem_check" in k}
    assert len(usage) == 3, f"expected the fp32 / fp16 / bf16 instantiations, got {list(usage)}"
    for k, v in usage.items():
        assert v["stack"] == 0 and v["local"] == 0, f"{k}: stack {v['stack']} / local {v['local']} bytes"
