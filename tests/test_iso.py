"""Isotropic merging (Iso-C, Iso-CTS, TSV-M): reference vs the authors' code, fast paths vs the
float64 reference, the Triton task-vector kernel under the interpreter, state-dict plumbing, bad input."""

import pytest
import torch

from wweight.iso import ops as iso
from wweight.reference import iso as ref
from conftest import requires_triton


def rel(a, b):
    a, b = a.double(), b.double()
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float((a - b).norm())


# ------------------------------------------------------------------------------------------
# The authors' code, transcribed (danielm1405/iso-merging src/utils/iso.py, TSVM_utils.py),
# as an independent check of wweight.reference.iso on full-rank inputs.
# ------------------------------------------------------------------------------------------

def authors_iso_c(tvs):
    new = sum(tvs) / len(tvs)
    new *= len(tvs)
    U, S, Vh = torch.linalg.svd(new, full_matrices=False)
    return torch.linalg.multi_dot((U, torch.diag(torch.ones_like(S) * S.mean()), Vh))


def authors_iso_cts(tvs, f):
    shape_ = tvs[0].shape
    T = len(tvs)
    combined_w = sum(tvs)
    k = int(min(shape_) * f)
    ts_total = round((min(shape_) - k) / T) * T
    k = min(shape_) - ts_total
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    cu, cs, cv = u[:, :k], s[:k], v[:k, :]
    n_dims = int((min(shape_) - k) / T)
    for i, w in enumerate(tvs):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            U_, S_, V_ = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
        U_[:, i * n_dims:(i + 1) * n_dims] = u_ts[:, :n_dims]
        S_[i * n_dims:(i + 1) * n_dims] = s_ts[:n_dims]
        V_[i * n_dims:(i + 1) * n_dims, :] = v_ts[:n_dims, :]
    U_[:, T * n_dims:T * n_dims + k] = cu
    S_[T * n_dims:T * n_dims + k] = cs
    V_[T * n_dims:T * n_dims + k, :] = cv
    a, _, b = torch.linalg.svd(U_, full_matrices=False)
    c, _, d = torch.linalg.svd(V_, full_matrices=False)
    S_ = torch.ones_like(S_) * S_.mean()
    return torch.linalg.multi_dot((a @ b, torch.diag(S_), c @ d))


def authors_tsv_m(tvs):
    T = len(tvs)
    for i, vec in enumerate(tvs):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            su, ss, sv = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        p = int(s.shape[0] * (1 / T))
        su[:, i * p:(i + 1) * p] = u[:, :p]
        ss[i * p:(i + 1) * p] = s[:p]
        sv[i * p:(i + 1) * p, :] = v[:p, :]
    a, _, b = torch.linalg.svd(su, full_matrices=False)
    c, _, d = torch.linalg.svd(sv, full_matrices=False)
    return torch.linalg.multi_dot((a, b, torch.diag(ss), c, d))


@pytest.mark.parametrize("shape", [(20, 50), (50, 20), (33, 33)])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_reference_matches_authors_code(shape, T):
    g = torch.Generator().manual_seed(T)
    tvs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(T)]
    assert rel(ref.iso_c(tvs), authors_iso_c(tvs)) < 1e-10
    assert rel(ref.tsv_m(tvs), authors_tsv_m(tvs)) < 1e-10
    for f in (0.8, 0.5, 0.95):
        assert rel(ref.iso_cts(tvs, f), authors_iso_cts(tvs, f)) < 1e-10


def test_iso_cts_split():
    assert ref.iso_cts_split(768, 8, 0.8) == (616, 19)  # int(614.4)=614; round(154/8)=19
    assert ref.iso_cts_split(768, 20, 0.8) == (608, 8)  # round(7.7)=8
    assert ref.iso_cts_split(10, 4, 0.8) == (10, 0)     # round(2/4) = 0 (half to even, as Python)
    assert ref.iso_cts_split(10, 4, 0.5) == (6, 1)      # round(5/4) = 1
    assert ref.iso_cts_split(1, 2, 0.8) == (1, 0)
    assert ref.iso_cts_split(100, 3, 1.0) == (100, 0)
    # authors' formula gives k = 10 - round(9/16)*16 = -6 (their code crashes): capped
    assert ref.iso_cts_split(10, 16, 0.1) == (10, 0)
    for r in (1, 7, 64, 768):
        for T in (1, 2, 5, 20):
            for f in (0.05, 0.5, 0.8, 1.0):
                k, p = ref.iso_cts_split(r, T, f)
                assert 0 <= k <= r and k + p * T == r


# ------------------------------------------------------------------------------------------
# Accuracy bar: relative Frobenius error <= 1e-4 vs the float64 reference, every method/dtype.
# ------------------------------------------------------------------------------------------

def make_models(shape, T, dtype, *, seed=0, kind="random"):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = torch.randn(shape, generator=g).to(dtype)
    deltas = []
    for t in range(T):
        if kind == "random":
            d = 0.02 * torch.randn(shape, generator=g)
        elif kind == "lowrank":  # each task rank 2: M has rank <= 2T < min(m, n)
            d = 0.02 * torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
        elif kind == "illcond":  # singular values 1 ... 1e-3 (kappa 1e3) and a shared part
            r = min(m, n)
            u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
            v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
            s = torch.logspace(0, -3, r)
            d = 0.02 * (u * s) @ v.T
        elif kind == "identical":
            d = deltas[0] if deltas else 0.02 * torch.randn(shape, generator=g)
        else:
            raise AssertionError(kind)
        deltas.append(d)
    fts = [(base.float() + d).to(dtype) for d in deltas]
    return base, fts


def check_against_reference(method, base, fts, backend="torch", tol=1e-4, **kw):
    # float64 ground truth from the same (exactly upcast) inputs
    exp = ref.iso_merge_tensors(method, base.double(), [f.double() for f in fts], 1.0,
                                kw.get("common_space_fraction", 0.8), torch.float64)
    got = iso.iso_merge_tensors(method, base, fts, backend=backend, **kw)
    assert got.dtype == base.dtype and got.shape == base.shape
    # compare merged deltas in float64 (the base's rounding back to 16 bits is not the merge's error)
    got64 = iso.iso_merge_tensors(method, base.double(), [f.double() for f in fts], backend=backend,
                                  compute_dtype=torch.float32, **kw) if base.dtype != torch.float32 else got
    b = base.double()
    err = rel(got64.double() - b, exp.double() - b)
    assert err <= tol, (method, tuple(base.shape), len(fts), base.dtype, err)
    return err


CASES = [((48, 96), 2), ((96, 48), 5), ((64, 64), 20), ((1, 64), 3), ((64, 1), 2), ((3, 40), 2)]


@pytest.mark.parametrize("method", iso.ISO_METHODS)
@pytest.mark.parametrize("dtype,shape,T", [(torch.float32, s, T) for s, T in CASES]
                         + [(d, s, T) for d in (torch.bfloat16, torch.float16) for s, T in (CASES[1], CASES[2], CASES[5])])
def test_accuracy_vs_float64(method, dtype, shape, T):
    base, fts = make_models(shape, T, dtype, seed=T)
    check_against_reference(method, base, fts)


@pytest.mark.parametrize("method", iso.ISO_METHODS)
@pytest.mark.parametrize("kind", ["lowrank", "illcond", "identical"])
@pytest.mark.parametrize("shape", [(40, 72), (72, 40)])
def test_accuracy_hard_spectra(method, kind, shape):
    base, fts = make_models(shape, 4, torch.float32, seed=3, kind=kind)
    check_against_reference(method, base, fts)


@pytest.mark.parametrize("method,shape", [("iso_c", (3072, 768)), ("iso_c", (768, 3072)),
                                          ("iso_cts", (1024, 256)), ("iso_cts", (256, 1024)),
                                          ("tsv_m", (1024, 256)), ("tsv_m", (256, 1024))])
def test_accuracy_large_nonsquare(method, shape):
    # ViT-B/32 MLP shapes (3072x768, 768x3072) for Iso-C; a third of them for the methods whose
    # float64 reference needs T+3 SVDs (the benchmark measures them at ViT sizes)
    base, fts = make_models(shape, 2, torch.float32, seed=1)
    check_against_reference(method, base, fts)


@pytest.mark.parametrize("f", [0.1, 0.5, 0.9, 1.0])
def test_iso_cts_fractions(f):
    base, fts = make_models((30, 50), 3, torch.float32, seed=5)
    check_against_reference("iso_cts", base, fts, common_space_fraction=f)
    base, fts = make_models((50, 30), 3, torch.float32, seed=5)
    check_against_reference("iso_cts", base, fts, common_space_fraction=f)


def test_rank_deficient_definition_is_independent_of_svd():
    # M = U diag(s) V^T of exact rank 3 on 20 x 30: Iso-C must give mean(s over r=20) U_3 V_3^T,
    # built here from the known factors, not from any SVD.
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=torch.float64))
    s = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    m = (u * s) @ v.T
    base = torch.zeros(20, 30, dtype=torch.float64)
    tvs = [0.25 * m, 0.75 * m]
    expect = (s.sum() / 20) * (u @ v.T)
    assert rel(ref.iso_c(tvs), expect) < 1e-10
    for be in ("torch", "reference"):
        got = iso.iso_merge_tensors("iso_c", base, tvs, backend=be, compute_dtype=torch.float64)
        assert rel(got, expect) < 1e-10
    # zero task vectors -> zero merged delta (nothing to amplify), all methods
    for method in iso.ISO_METHODS:
        got = iso.iso_merge_tensors(method, base.float(), [base.float(), base.float()])
        assert torch.equal(got, base.float())


def test_compute_dtype_float64_meets_tighter_bar_on_very_ill_conditioned():
    # kappa 1e6 stored in float64: the float64 path agrees with the reference to ~1e-8
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(48, 32, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    tvs = [(u * torch.logspace(0, -6, 32, dtype=torch.float64)) @ v.T for _ in range(2)]
    tvs[1] = tvs[1] + 1e-3 * torch.randn(48, 32, generator=g, dtype=torch.float64)
    base = torch.zeros(48, 32, dtype=torch.float64)
    for method in iso.ISO_METHODS:
        exp = ref.merged_delta(method, tvs)
        got = iso.iso_merge_tensors(method, base, tvs, compute_dtype=torch.float64)
        assert rel(got, exp) < 1e-8, method


# ------------------------------------------------------------------------------------------
# Triton task-vector kernel (interpreter on CPU)
# ------------------------------------------------------------------------------------------

@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_task_vectors_kernel(dtype, triton_device):
    g = torch.Generator().manual_seed(0)
    shape = (37, 61)  # 2257 elements: not a multiple of the block
    base = torch.randn(shape, generator=g).to(dtype).to(triton_device)
    fts = [(base.float() + 0.1 * torch.randn(shape, generator=g).to(triton_device)).to(dtype) for _ in range(3)]
    fts[2].view(-1)[1500] = float("nan")
    each, total, bad = iso._iso_task_vectors(base, fts, torch.float32, True, True, "triton")
    exp = [f.float() - base.float() for f in fts]
    for t in range(2):
        assert torch.equal(each[t], exp[t])
    assert bad.tolist() == [0, 0, 1]
    ok = torch.ones(shape, dtype=torch.bool, device=triton_device)
    ok.view(-1)[1500] = False
    assert torch.allclose(total[ok], (exp[0] + exp[1] + exp[2])[ok], atol=1e-6)
    # sum only, float64 accumulation
    _, total64, bad = iso._iso_task_vectors(base, fts[:2], torch.float64, False, True, "triton")
    assert torch.equal(total64, fts[0].double() - base.double() + (fts[1].double() - base.double()))
    assert bad.tolist() == [0, 0]


@requires_triton
@pytest.mark.parametrize("method", iso.ISO_METHODS)
def test_triton_backend_end_to_end(method, triton_device):
    base, fts = make_models((24, 40), 3, torch.bfloat16, seed=7)
    base, fts = base.to(triton_device), [f.to(triton_device) for f in fts]
    got = iso.iso_merge_tensors(method, base, fts, backend="triton")
    exp = iso.iso_merge_tensors(method, base, fts, backend="torch")
    assert torch.equal(got, exp)
    sd = {"w": base, "b": base[0].clone()}
    out = iso.iso_merge_state_dicts(method, sd, [{"w": f, "b": f[0].clone()} for f in fts], backend="triton")
    assert torch.equal(out["w"], exp)


# ------------------------------------------------------------------------------------------
# State dicts: grouping, batching, memory options, dtypes, non-2-D keys, inputs untouched
# ------------------------------------------------------------------------------------------

def make_state_dicts(T=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"l0.weight": (24, 16), "l0.bias": (24,), "l1.weight": (24, 16), "l2.weight": (16, 24),
              "emb.weight": (50, 8), "conv.weight": (4, 3, 2, 2), "scale": (), "head.weight": (1, 24)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    base["bn.num_batches_tracked"] = torch.tensor(7)
    fts = []
    for _ in range(T):
        ft = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()
              if v.is_floating_point()}
        ft["bn.num_batches_tracked"] = torch.tensor(9)
        fts.append(ft)
    return base, fts


@pytest.mark.parametrize("method", iso.ISO_METHODS)
def test_state_dict_matches_reference_and_options(method):
    base, fts = make_state_dicts()
    snap = ({k: v.clone() for k, v in base.items()}, [{k: v.clone() for k, v in f.items()} for f in fts])
    exp = ref.iso_merge_state_dicts(method, base, fts, alpha=0.7, compute_dtype=torch.float64)
    outs = [iso.iso_merge_state_dicts(method, base, fts, alpha=0.7),
            iso.iso_merge_state_dicts(method, base, fts, alpha=0.7, batch_size=1),
            iso.iso_merge_state_dicts(method, base, fts, alpha=0.7, memory_budget=1),
            iso.iso_merge_state_dicts(method, base, fts, alpha=0.7, compute_dtype=torch.float64),
            iso.iso_merge_state_dicts(method, base, fts, alpha=0.7, backend="reference"),
            iso.iso_merge_state_dicts(method, base, fts, alpha=0.7, device="cpu")]
    for out in outs:
        assert list(out) == list(base)
        for k in base:
            assert out[k].dtype == base[k].dtype and out[k].shape == base[k].shape
            if base[k].is_floating_point():
                assert rel(out[k] - base[k], exp[k] - base[k]) < 1e-4, k
        assert out["bn.num_batches_tracked"].item() == 7  # non-floating: copied from base
    assert torch.equal(outs[0]["l0.weight"], outs[1]["l0.weight"])
    # non-2-D keys: plain mean of the task vectors
    mean = sum(f["l0.bias"] - base["l0.bias"] for f in fts) / 3
    assert torch.allclose(outs[0]["l0.bias"], base["l0.bias"] + 0.7 * mean, atol=1e-6)
    # inputs untouched
    for k in base:
        assert torch.equal(base[k], snap[0][k])
        for f, s in zip(fts, snap[1]):
            assert torch.equal(f[k], s[k])


def test_alpha_scales_the_merged_delta():
    base, fts = make_state_dicts()
    a = iso.iso_merge_state_dicts("iso_cts", base, fts, alpha=1.0, compute_dtype=torch.float64)
    b = iso.iso_merge_state_dicts("iso_cts", base, fts, alpha=2.5, compute_dtype=torch.float64)
    for k in ("l0.weight", "l0.bias", "emb.weight"):
        assert torch.allclose(b[k] - base[k], 2.5 * (a[k] - base[k]), atol=1e-5)


def test_bf16_state_dict_keeps_dtype():
    base, fts = make_state_dicts(dtype=torch.bfloat16)
    out = iso.iso_merge_state_dicts("tsv_m", base, fts)
    assert all(out[k].dtype == base[k].dtype for k in base)


def test_custom_op_fake_and_opcheck():
    d = torch.randn(2, 3, 6, 9, dtype=torch.float64)
    for method in iso.ISO_METHODS:
        torch.library.opcheck(torch.ops.wweight.iso_merge_batch.default, (d, method, 0.8, 1e-5),
                              test_utils=("test_schema", "test_faketensor"))
    base = torch.randn(5, 4)
    torch.library.opcheck(torch.ops.wweight.iso_task_vectors.default,
                          (base, [base + 1, base + 2], torch.float32, True, True, "torch"),
                          test_utils=("test_schema", "test_faketensor"))


def test_explicit_cuda_backend_is_refused_on_cpu():
    base, fts = make_models((8, 8), 2, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        iso.iso_merge_tensors("iso_c", base, fts, backend="cuda")


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

def test_bad_input():
    base, fts = make_state_dicts()
    with pytest.raises(ValueError, match="method"):
        iso.iso_merge_state_dicts("ties", base, fts)
    with pytest.raises(ValueError, match="finetuned.*empty"):
        iso.iso_merge_state_dicts("iso_c", base, [])
    with pytest.raises(TypeError, match="finetuned"):
        iso.iso_merge_state_dicts("iso_c", base, fts[0])
    missing = [dict(fts[0]), fts[1]]
    del missing[0]["l1.weight"]
    with pytest.raises(ValueError, match=r"finetuned\[0\] is missing key 'l1.weight'"):
        iso.iso_merge_state_dicts("iso_c", base, missing)
    extra = [fts[0], dict(fts[1], extra=torch.zeros(2))]
    with pytest.raises(ValueError, match=r"finetuned\[1\] has key 'extra'"):
        iso.iso_merge_state_dicts("iso_c", base, extra)
    bad_shape = [fts[0], dict(fts[1], **{"l2.weight": torch.zeros(24, 16)})]
    with pytest.raises(ValueError, match=r"finetuned\[1\]\['l2.weight'\].*shape"):
        iso.iso_merge_state_dicts("iso_c", base, bad_shape)
    bad_dtype = [fts[0], dict(fts[1], **{"l2.weight": fts[1]["l2.weight"].double()})]
    with pytest.raises(TypeError, match=r"finetuned\[1\]\['l2.weight'\].*dtype"):
        iso.iso_merge_state_dicts("iso_c", base, bad_dtype)
    for f in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="common_space_fraction"):
            iso.iso_merge_state_dicts("iso_cts", base, fts, common_space_fraction=f)
    for a in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            iso.iso_merge_state_dicts("iso_c", base, fts, alpha=a)
    with pytest.raises(TypeError, match="compute_dtype"):
        iso.iso_merge_state_dicts("iso_c", base, fts, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="batch_size"):
        iso.iso_merge_state_dicts("iso_c", base, fts, batch_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        iso.iso_merge_state_dicts("iso_c", base, fts, memory_budget=-5)
    with pytest.raises(ValueError, match="backend"):
        iso.iso_merge_state_dicts("iso_c", base, fts, backend="gpu")
    for method in iso.ISO_METHODS:
        for key in ("l2.weight", "l0.bias"):
            nan = [fts[0], fts[1], dict(fts[2])]
            nan[2][key] = fts[2][key].clone()
            nan[2][key].view(-1)[3] = float("nan")
            with pytest.raises(ValueError, match=rf"finetuned\[2\]\['{key}'\].*NaN"):
                iso.iso_merge_state_dicts(method, base, nan)
    # merge_tensors names its own arguments
    b, ts = make_models((6, 5), 2, torch.float32)
    with pytest.raises(ValueError, match="tensors.*empty"):
        iso.iso_merge_tensors("iso_c", b, [])
    with pytest.raises(ValueError, match=r"tensors\[1\].*shape"):
        iso.iso_merge_tensors("iso_c", b, [ts[0], ts[1][:3]])
    with pytest.raises(TypeError, match=r"tensors\[0\].*dtype"):
        iso.iso_merge_tensors("iso_c", b, [ts[0].half(), ts[1]])
    with pytest.raises(TypeError, match="base"):
        iso.iso_merge_tensors("iso_c", b.long(), ts)
    inf = ts[1].clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"tensors\[1\].*NaN or Inf"):
        iso.iso_merge_tensors("tsv_m", b, [ts[0], inf])


def test_empty_and_zero_size_keys():
    b = torch.zeros(0, 5)
    for method in iso.ISO_METHODS:
        assert iso.iso_merge_tensors(method, b, [b, b]).shape == (0, 5)
        out = iso.iso_merge_state_dicts(method, {"e": b, "s": torch.zeros(3)}, [{"e": b, "s": torch.ones(3)}] * 2)
        assert out["e"].shape == (0, 5) and torch.equal(out["s"], torch.ones(3))


def test_iso_state_dict_merge_reports_progress(monkeypatch):
    # progress=True was ignored by the iso methods (a silent multi-second run): keys are counted per batch
    import tqdm as tqdm_mod

    bars = []

    class Bar:
        def __init__(self, total=None, **kw):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            pass

    monkeypatch.setattr(tqdm_mod, "tqdm", Bar)
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(6, 4, generator=g), "c": torch.randn(5, generator=g),
            "n": torch.tensor(3)}
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
           for _ in range(2)]
    import wweight

    out = wweight.merge_state_dicts("iso_c", base, fts, progress=True, batch_size=1)
    assert set(out) == set(base)
    (bar,) = bars
    assert bar.total == bar.n == 3          # the float keys
