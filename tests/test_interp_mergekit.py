"""mergekit 0.1.5's other merge methods (wweight.interp) against mergekit itself.

Every case runs mergekit's registered method object (``mergekit.merge_methods.registry.get(name)``)
on a ``TensorGroup`` of the same tensors, the way mergekit's own executor calls it, and requires
wweight's default path and its reference to give the same bits. The cases are randomised: fp32 /
bf16 / fp16, odd shapes, 0-d and one-element tensors, and for the spherical methods colinear,
opposite, identical and zero task vectors. Documented differences (README, "mergekit's other
methods"): SCE's elements tied at the top-k cut (mergekit's torch.topk keeps an unspecified
subset; wweight the lowest flat indices, like its TIES) and arcee_fusion above 1M elements
(mergekit samples 1M elements with torch.randint for its quantiles; wweight uses all of them).
"""
import zlib
import contextlib
import random

import pytest
import torch

import wweight
from wweight import methods as M
from wweight.interp import fast
from wweight.reference import interp as ref

mk_base = pytest.importorskip("mergekit.merge_methods.base")
mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_arcee = pytest.importorskip("mergekit.merge_methods.arcee_fusion")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (1,), (1, 1), (2,), (7,), (3, 5), (17, 33), (4, 3, 5), (64, 129), (1, 300)]
ALL = list(M.INTERP_METHODS)


def mergekit(name, base, tensors, params):
    """mergekit's own method on one group: base first (base_index 0) where the method takes one."""
    method = mk_registry.get(name)
    inputs = ([base] if base is not None else []) + list(tensors)
    group = mk_base.TensorGroup.from_tensors(inputs, base_index=0 if base is not None else None)
    (out,) = method([group], parameters=params)
    return out.to(tensors[0].dtype)


def same(a, b):
    """Bit-identical values (NaN equal to NaN), same shape and dtype."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _models(rng, shape, dtype, K, kind="random"):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    base = torch.randn(shape, generator=g)
    d = [torch.randn(shape, generator=g) * rng.choice([1e-3, 0.02, 0.3, 1.0]) for _ in range(K)]
    if kind == "colinear":
        d = [d[0] * rng.choice([0.5, 2.0, 1.0]) for _ in range(K)]
    elif kind == "opposite":
        d = [d[0] * (1 if i % 2 == 0 else -1) for i in range(K)]
    elif kind == "zero":
        d = [torch.zeros(shape) for _ in range(K)]
    elif kind == "one_zero":
        d[0] = torch.zeros(shape)
    elif kind == "sparse":  # RAM / SCE: task vectors with disjoint and overlapping supports
        d = [x * (torch.rand(shape, generator=g) < 0.4) for x in d]
    return base.to(dtype), [(base + x).to(dtype) for x in d]


KINDS = ["random", "random", "colinear", "opposite", "zero", "one_zero", "sparse"]


def _case(name, rng):
    """(base or None, tensors, wweight kwargs, mergekit parameters) of one random case."""
    m = M.get(name)
    shape, dtype = rng.choice(SHAPES), rng.choice(DTYPES)
    K = rng.randint(m.min_models, m.max_models or 4)
    base, ts = _models(rng, shape, dtype, K, rng.choice(KINDS))
    if not m.needs_base:          # karcher / passthrough: all inputs are models
        ts, base = [base] + ts if name == "karcher" else ts[:1], None
    elif m.base_optional and rng.random() < 0.4:
        base = None
    w = [rng.choice([0.3, 0.5, 1.0, 2.0]) for _ in ts]
    kw, mk = {}, {}
    if name in ("slerp", "nearswap"):
        kw["t"] = mk["t"] = rng.choice([0.0, 0.25, 0.5, 0.7, 1.0] if name == "slerp" else [1e-4, 0.01, 0.1, 1.0])
    elif name == "nuslerp":
        kw = dict(weights=w, nuslerp_flatten=rng.random() < 0.5, nuslerp_row_wise=rng.random() < 0.5)
        mk = dict(weight=w, nuslerp_flatten=kw["nuslerp_flatten"], nuslerp_row_wise=kw["nuslerp_row_wise"])
    elif name == "multislerp":
        kw = dict(weights=w, normalize_weights=rng.random() < 0.7, eps=rng.choice([1e-8, 1e-6]))
        mk = dict(weight=w, normalize_weights=kw["normalize_weights"], eps=kw["eps"])
    elif name == "karcher":
        kw = mk = dict(max_iter=rng.choice([1, 3, 10]), tol=rng.choice([1e-5, 1e-3]))
    elif name == "model_stock":
        kw = mk = dict(filter_wise=rng.random() < 0.5)
    elif name == "sce":
        kw = mk = dict(select_topk=rng.choice([1.0, 0.5, 0.1, 0.0]))
    elif name == "ram":
        kw = mk = dict(epsilon=rng.choice([1e-5, 1e-3, 0.05]))
    elif name == "ramplus_tl":
        kw = mk = dict(epsilon=rng.choice([1e-5, 1e-3]), r=rng.choice([0.1, 0.5]), alpha=rng.choice([0.2, 1.0]))
    elif name == "passthrough":
        s = rng.choice([None, 0.5, 2.0])
        kw, mk = ({"scale": s} if s is not None else {}), {"scale": [s]}
    return base, ts, kw, mk


@contextlib.contextmanager
def stable_topk():
    """mergekit's sce_mask with torch.topk's tie choice fixed to the lowest flat indices."""
    real = torch.topk

    def topk(x, k, largest=True, **kw):
        idx = torch.sort(x, descending=largest, stable=True).indices[:k]
        return x[idx], idx

    torch.topk = topk
    try:
        yield
    finally:
        torch.topk = real


@pytest.mark.parametrize("name", ALL)
def test_identical_to_mergekit(name):
    """Hundreds of random cases per method: wweight (default path and reference) == mergekit."""
    rng = random.Random(zlib.crc32(name.encode()) % 1000)
    n = 0
    for i in range(240):
        base, ts, kw, mk = _case(name, rng)
        try:
            with (stable_topk() if name == "sce" else contextlib.nullcontext()):
                want = mergekit(name, base, ts, mk)
        except ValueError as e:   # multislerp: antipodal inputs with balancing weights
            assert "zero" in str(e), e
            with pytest.raises(ValueError, match="zero"):
                wweight.merge_tensors(name, base, ts, **kw)
            continue
        got = wweight.merge_tensors(name, base, ts, **kw)
        with (stable_topk() if name == "sce" else contextlib.nullcontext()):   # the reference calls torch.topk
            got_ref = wweight.merge_tensors(name, base, ts, backend="reference", **kw)
        assert same(got, want), (i, name, ts[0].shape, ts[0].dtype, kw, (got.float() - want.float()).abs().max())
        assert same(got_ref, want), (i, name, "reference", ts[0].shape, ts[0].dtype, kw)
        for t, t0 in zip(ts, [t.clone() for t in ts]):
            assert torch.equal(t, t0)
        n += 1
    assert n >= 200


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensors_identical(dtype, shape=(3, 400_001)):
    """Past mergekit's 1M-element slerp chunks and with large K-way reductions."""
    rng = random.Random(1)
    base, ts = _models(rng, shape, dtype, 3)
    for name, kw in [("slerp", dict(t=0.3)), ("nearswap", dict(t=0.01)), ("ram", {}), ("ramplus_tl", {}),
                     ("model_stock", {}), ("sce", dict(select_topk=0.3)), ("multislerp", dict(weights=[1, 2, 3])),
                     ("karcher", {}), ("nuslerp", dict(weights=[1, 2]))]:
        m = M.get(name)
        xs = ts[:m.max_models] if m.max_models else ts
        mk = dict(kw)
        if "weights" in mk:
            mk["weight"] = mk.pop("weights")[:len(xs)]
            kw = dict(kw, weights=kw["weights"][:len(xs)])
        with (stable_topk() if name == "sce" else contextlib.nullcontext()):
            want = mergekit(name, base if m.needs_base else None, xs if m.needs_base else [base] + xs, mk)
        got = wweight.merge_tensors(name, base if m.needs_base else None, xs if m.needs_base else [base] + xs, **kw)
        assert same(got, want), (name, (got.float() - want.float()).abs().max())


def test_slerp_edge_cases_match_mergekit():
    a = torch.tensor([1.0, 2.0, 3.0])
    for b in (a, 2 * a, -a, -3 * a, torch.zeros(3), a + 1e-9, torch.tensor([3.0, 2.0, 1.0])):
        for t in (0.0, 0.3, 1.0):
            for base, other in ((a, b), (b, a)):
                want = mergekit("slerp", base, [other], {"t": t})
                assert same(wweight.merge_tensors("slerp", base, [other], t=t), want)
    # nearly colinear: mergekit interpolates linearly above |cos| 0.9995
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    y = x + 0.01 * torch.randn(1000, generator=torch.Generator().manual_seed(1))
    lin = (1 - 0.4) * x + 0.4 * y
    assert torch.allclose(wweight.merge_tensors("slerp", x, [y], t=0.4), lin, atol=1e-6)


def test_sce_ties_at_the_cut_documented():
    """bf16 variances tie a lot: same count kept and every element above the cut as mergekit's
    unpatched torch.topk; the tied ones are the lowest flat indices (mergekit + a stable top-k)."""
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(4000).bfloat16()
    ts = [(torch.randint(-3, 4, (4000,), generator=g) * 0.125).bfloat16() for _ in range(3)]
    with stable_topk():
        want = mergekit("sce", base, ts, {"select_topk": 0.3})
    got = wweight.merge_tensors("sce", base, ts, select_topk=0.3)
    assert same(got, want)
    tvs = torch.stack([t - base for t in ts])
    k = int(torch.count_nonzero(torch.var(tvs, 0, unbiased=False)) * 0.3)
    mine = fast.sce_mask(tvs, 0.3, tvs.dtype)
    theirs = ref.sce_mask(tvs, 0.3, tvs.dtype)
    assert int(mine.float().sum()) == int(theirs.float().sum()) == k
    var = torch.var(tvs, 0, unbiased=False)
    cut = var[mine.bool()].min()
    assert torch.equal(mine[var > cut], theirs[var > cut])


def test_arcee_fusion_large_uses_exact_quantiles(monkeypatch):
    """Above 1M elements mergekit estimates its quantiles from 1M random samples; wweight takes
    all elements, which is mergekit with its sample size raised past the tensor."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1100, 1000, generator=g)
    other = base + 0.05 * torch.randn(1100, 1000, generator=g)
    monkeypatch.setattr(mk_arcee, "_QUANTILE_SAMPLE_SIZE", 1 << 40)
    assert same(wweight.merge_tensors("arcee_fusion", base, [other]), mergekit("arcee_fusion", base, [other], {}))


@pytest.mark.parametrize("name", ALL)
def test_state_dict_merge_matches_per_key(name):
    rng = random.Random(7)
    m = M.get(name)
    base, ts, kw, _ = _case(name, rng)
    while base is None and m.needs_base:
        base, ts, kw, _ = _case(name, rng)
    sd_b = {"w": base if base is not None else ts[0], "step": torch.tensor(3)}
    fts = [{"w": t, "step": torch.tensor(3)} for t in ts]
    w = kw.pop("weights", None)
    out = wweight.merge_state_dicts(name, sd_b if base is not None else None, fts, w, **kw)
    assert same(out["w"], wweight.merge_tensors(name, base, ts, w, **kw)) and out["step"].item() == 3


def test_bad_arguments_name_them():
    b, x = torch.zeros(4), torch.ones(4)
    with pytest.raises(TypeError, match="needs t"):
        wweight.merge_tensors("slerp", b, [x])
    with pytest.raises(ValueError, match="exactly 1 tensor"):
        wweight.merge_tensors("slerp", b, [x, x], t=0.5)
    with pytest.raises(ValueError, match="needs base"):
        wweight.merge_tensors("nearswap", None, [x], t=0.5)
    with pytest.raises(TypeError, match="density is not a parameter of slerp"):
        wweight.merge_tensors("slerp", b, [x], t=0.5, density=0.5)
    with pytest.raises(ValueError, match="weights are not used by model_stock"):
        wweight.merge_tensors("model_stock", b, [x, x], weights=[1, 2])
    with pytest.raises(TypeError, match=r"unexpected keyword arguments.*\['tt'\]"):
        wweight.merge_tensors("slerp", b, [x], tt=0.5)
    with pytest.raises(ValueError, match="select_topk must be <= 1"):
        wweight.merge_tensors("sce", b, [x], select_topk=1.5)
    with pytest.raises(TypeError, match="max_iter must be an integer"):
        wweight.merge_tensors("karcher", None, [x, b], max_iter=2.5)
    with pytest.raises(ValueError, match=r"weights must be one number or 2"):
        wweight.merge_tensors("nuslerp", b, [x, x], weights=[1, 2, 3])
    with pytest.raises(ValueError, match=r"tensors\[0\] contains NaN"):
        wweight.merge_tensors("ram", b, [torch.tensor([1.0, float("nan"), 0, 0])])
    for bad in (float("inf"), float("-inf")):
        with pytest.raises(ValueError, match=r"base contains NaN or Inf"):
            wweight.merge_tensors("slerp", torch.tensor([0.0, bad, 1.0, 2.0]).bfloat16(), [x.bfloat16()], t=0.5)
    with pytest.raises(ValueError, match="weights sum to 0"):
        wweight.merge_tensors("multislerp", b, [x, -x], weights=[1, -1])
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype"):
        wweight.merge_tensors("nearswap", b, [x.double()], t=0.1)


# ------------------------------------------------------------------ YAML -> wweight merge vs mergekit's run_merge

YAML_CASES = {
    "slerp": ("base", ["base", "ft0"], {}, {"t": [{"filter": "self_attn", "value": 0.2}, {"value": 0.7}]}),
    "nuslerp": ("base", ["ft0", "ft1"], {"weight": [1.0, 2.0]}, {"nuslerp_flatten": False,
                                                                  "nuslerp_row_wise": True}),
    "multislerp": (None, ["ft0", "ft1", "ft2"], {"weight": [1.0, 0.5, 2.0]}, {}),
    "karcher": (None, ["ft0", "ft1", "ft2"], {}, {"max_iter": 5}),
    "model_stock": ("base", ["ft0", "ft1", "ft2"], {}, {"filter_wise": True}),
    "sce": ("base", ["ft0", "ft1", "ft2"], {}, {"select_topk": 0.4}),
    "ram": ("base", ["ft0", "ft1", "ft2"], {}, {"epsilon": 1e-4}),
    "ramplus_tl": ("base", ["ft0", "ft1", "ft2"], {}, {"r": 0.5, "alpha": 0.3, "epsilon": 1e-4}),
    "nearswap": ("base", ["ft0"], {}, {"t": 1e-3}),
    "arcee_fusion": ("base", ["ft0"], {}, {}),
    "passthrough": (None, ["ft1"], {"scale": [0.5]}, {}),
}


@pytest.fixture(scope="module")
def llama_zoo(tmp_path_factory):
    from wweight.examples.zoo import make_llama_zoo

    root = tmp_path_factory.mktemp("interp_zoo")
    make_llama_zoo(str(root), "tiny", 3, dtype=torch.bfloat16, seed=5)
    return root


def _yaml(zoo, name, dtype):
    base, models, per, top = YAML_CASES[name]
    cfg = {"merge_method": name, "models": [], "dtype": dtype}
    if base:
        cfg["base_model"] = str(zoo / base)
    for i, mname in enumerate(models):
        entry = {"model": str(zoo / mname)}
        params = {k: v[i - (models[0] == base)] for k, v in per.items()} if mname != base else {}
        if params:
            entry["parameters"] = params
        cfg["models"].append(entry)
    if top:
        cfg["parameters"] = top
    return cfg


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", ALL)
def test_wweight_merge_yaml_matches_mergekit_run_merge(tmp_path, capsys, llama_zoo, name, dtype):
    """One mergekit YAML per method on a tiny HF-layout Llama zoo: ``wweight merge`` (the CLI,
    in-process) and mergekit's own ``run_merge`` (what ``mergekit-yaml`` runs; here in-process and
    offline) write the same tensors, bit for bit."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file
    from test_checkpoint_helpers import run_main

    cfg = _yaml(llama_zoo, name, dtype)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_main(capsys, "merge", path, tmp_path / "ww", "-q")
    assert code == 0, err
    with (stable_topk() if name == "sce" else contextlib.nullcontext()):
        run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
                  MergeOptions(copy_tokenizer=False, quiet=True))
    ww = {}
    for f in (tmp_path / "ww").glob("*.safetensors"):
        ww.update(load_file(str(f)))
    mk = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        mk.update(load_file(str(f)))
    assert ww.keys() == mk.keys()
    if name in ("ramplus_tl", "arcee_fusion") and dtype == "bfloat16":
        # mergekit's float32 lambda_ / fusion mask promote its result, and run_merge writes it as
        # float32 although dtype is bfloat16; wweight writes the config's dtype: mergekit's values
        # rounded once to it (what mergekit writes with out_dtype: bfloat16)
        assert all(t.dtype == torch.float32 for t in mk.values())
        mk = {k: t.to(torch.bfloat16) for k, t in mk.items()}
    bad = [k for k in mk if not same(ww[k], mk[k])]
    assert not bad, (name, bad[:3], [(ww[k].float() - mk[k].float()).abs().max().item() for k in bad[:3]])
