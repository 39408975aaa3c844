"""``wweight.integrations.mergekit``: wweight's methods inside mergekit, proven with mergekit's own tests.

The model-level cases are mergekit's ``tests/test_basic_merges.py`` (github.com/arcee-ai/mergekit,
``TestBasicMerges``: the same configs - ``two_model_config``'s weights 0.6 / 0.4, ``dtype: bfloat16``,
each test's parameters - and ``tests/common.py``'s ``run_and_check_merge`` checks: a model and
config.json written, no NaN, every tensor present). mergekit's ``make_picollama`` models are replaced by
a tiny HF-layout Llama zoo (``wweight.examples.zoo.make_llama_zoo``, offline; model_a / model_b /
model_c = ft0 / ft1 / base). Each config runs through mergekit's ``run_merge`` (what ``mergekit-yaml``
runs) twice, without and with the adapter installed, and the outputs are compared bit for bit. Where
wweight is documented to differ (README "Sparse masks", "mergekit's other methods") the mergekit-alone run
gets the patch that removes the documented cause: a stable sort (TIES / Breadcrumbs / DELLA ties at the
magnitude cut), a stable top-k (SCE), and torch.bernoulli drawing from wweight's Philox stream keyed
like ``install(seed=...)`` (DARE / DELLA); ramplus_tl / arcee_fusion are compared after rounding
mergekit's float32 output to bfloat16 (mergekit's dtype promotion).
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import wweight
from wweight import methods as M
from wweight.reference.philox import philox_uniform

pytest.importorskip("mergekit")
yaml = pytest.importorskip("yaml")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402
from mergekit.merge_methods import base as mk_base  # noqa: E402
from mergekit.merge_methods import generalized_task_arithmetic as mk_gta  # noqa: E402
from mergekit.merge_methods import registry as mk_registry  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from wweight.integrations import mergekit as adapter  # noqa: E402
from test_interp_mergekit import stable_topk  # noqa: E402  (mergekit's SCE with a stable top-k)

SEED = 11


@pytest.fixture(autouse=True)
def _clean_registry():
    adapter.uninstall()
    yield
    adapter.uninstall()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from wweight.examples.zoo import make_llama_zoo

    root = tmp_path_factory.mktemp("mk_zoo")
    make_llama_zoo(str(root), "tiny", 3, dtype=torch.bfloat16, seed=3)
    return {"model_a": str(root / "ft0"), "model_b": str(root / "ft1"), "model_c": str(root / "base")}


def two_model_config(z, a, b, merge_method, base_model=None, params=None):
    """mergekit's ``TestBasicMerges.two_model_config``."""
    cfg = {"merge_method": merge_method, "dtype": "bfloat16",
           "models": [{"model": z[a], "parameters": {"weight": 0.6}}, {"model": z[b], "parameters": {"weight": 0.4}}]}
    if base_model:
        cfg["base_model"] = z[base_model]
    if params:
        cfg["parameters"] = dict(params)
    return cfg


def _nuslerp(base, row_wise, flatten, weights=None):
    def make(z):
        cfg = two_model_config(z, "model_a", "model_b", "nuslerp", base,
                               {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten})
        if weights:
            for m, w in zip(cfg["models"], weights):
                m["parameters"]["weight"] = w
        return cfg
    return make


# mergekit's TestBasicMerges, one entry per config it runs (the GPT-2 / Granite / LLaVA models replaced by
# the Llama zoo; test_della_invalid_epsilon is test_refuses_what_mergekit_refuses below)
CASES = {
    "gpt2_copy": lambda z: {"merge_method": "passthrough", "models": [{"model": z["model_a"]}], "dtype": "bfloat16"},
    "gpt2_stack": lambda z: {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": z["model_a"], "layer_range": [0, 2]}]}] * 2},
    "passthrough_scale": lambda z: {"merge_method": "passthrough", "models": [{"model": z["model_a"], "parameters": {
        "scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
    "linear": lambda z: two_model_config(z, "model_a", "model_b", "linear"),
    "slerp": lambda z: two_model_config(z, "model_a", "model_b", "slerp", "model_a", {"t": 0.35}),
    "granite_slerp": lambda z: two_model_config(z, "model_a", "model_b", "slerp", "model_a", {"t": 0.5}),
    **{f"nuslerp_{b or 'nobase'}_row{int(r)}_flat{int(f)}": _nuslerp(b, r, f)
       for b in (None, "model_c") for r in (False, True) for f in (False, True)},
    "nuslerp_zero_sum_weights": _nuslerp("model_c", False, False, (-0.5, 0.5)),
    "task_arithmetic": lambda z: two_model_config(z, "model_a", "model_b", "task_arithmetic", "model_c"),
    "breadcrumbs": lambda z: two_model_config(z, "model_a", "model_b", "breadcrumbs", "model_c"),
    "ties": lambda z: two_model_config(z, "model_a", "model_b", "ties", "model_c", {"density": 0.3}),
    "sce": lambda z: two_model_config(z, "model_a", "model_b", "sce", "model_c", {"select_topk": 0.5}),
    "ram": lambda z: two_model_config(z, "model_a", "model_b", "ram", "model_c"),
    "ramplus_tl": lambda z: two_model_config(z, "model_a", "model_b", "ramplus_tl", "model_c",
                                             {"r": 0.05, "alpha": 1.0}),
    "multislerp": lambda z: two_model_config(z, "model_a", "model_b", "multislerp", "model_c"),
    "dare_ties": lambda z: two_model_config(z, "model_a", "model_b", "dare_ties", "model_c", {"density": 0.66}),
    "model_stock": lambda z: two_model_config(z, "model_b", "model_c", "model_stock", "model_a"),
    "model_stock_filterwise": lambda z: two_model_config(z, "model_b", "model_c", "model_stock", "model_a",
                                                         {"filter_wise": True}),
    "arcee_fusion": lambda z: two_model_config(z, "model_a", "model_b", "arcee_fusion", "model_a"),
    "nearswap": lambda z: two_model_config(z, "model_a", "model_b", "nearswap", "model_a", {"t": 0.0001}),
    "della": lambda z: two_model_config(z, "model_a", "model_b", "della", "model_c",
                                        {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    "karcher": lambda z: two_model_config(z, "model_a", "model_b", "karcher", "model_c", {"max_iter": 5, "tol": 1e-5}),
}


def _stable(real):
    def f(*a, **k):
        k["stable"] = True
        return real(*a, **k)
    return f


@contextlib.contextmanager
def stable_sorts():
    """mergekit's TIES / Breadcrumbs / DELLA with torch.sort / argsort stable: ties at a magnitude cut
    kept by lowest index, wweight's documented rule."""
    real_sort, real_argsort = torch.sort, torch.argsort
    torch.sort, torch.argsort = _stable(real_sort), _stable(real_argsort)
    try:
        yield
    finally:
        torch.sort, torch.argsort = real_sort, real_argsort


@contextlib.contextmanager
def philox_masks(seed):
    """mergekit's DARE / DELLA drawing their Bernoulli masks from wweight's stream: per tensor the key
    ``key_seed(seed, tensor name)`` (what ``install(seed=seed)`` uses), model i (its i-th draw) stream i."""
    real_bernoulli, real_merge = torch.bernoulli, mk_gta.GeneralizedTaskArithmeticMerge.merge_group
    state = {"key": None, "n": 0}

    def bernoulli(p, *a, **k):
        u = philox_uniform(p.numel(), state["key"], state["n"], device=p.device).reshape(p.shape)
        state["n"] += 1
        return (u < p.float()).to(p.dtype)

    def merge_group(self, group, /, **params):
        state["key"], state["n"] = wweight.key_seed(seed, group.metadata.name), 0
        return real_merge(self, group, **params)

    torch.bernoulli, mk_gta.GeneralizedTaskArithmeticMerge.merge_group = bernoulli, merge_group
    try:
        yield
    finally:
        torch.bernoulli, mk_gta.GeneralizedTaskArithmeticMerge.merge_group = real_bernoulli, real_merge


def _mergekit_patches(method):
    stack = contextlib.ExitStack()
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        stack.enter_context(stable_sorts())
    if method in ("dare_ties", "dare_linear", "della", "della_linear"):
        stack.enter_context(philox_masks(SEED))
    if method == "sce":
        stack.enter_context(stable_topk())
    return stack


def _load(out):
    sd = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(out, f)))
    return sd


def _run(cfg, out):
    """mergekit's run_merge (the body of mergekit-yaml), in-process and offline; the merged tensors."""
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options=MergeOptions(copy_tokenizer=False, quiet=True))
    return _load(out)


def _check_output(out, sd, reference):
    """mergekit's run_and_check_merge checks: model and config.json written, no NaN, every tensor present."""
    assert os.path.exists(os.path.join(out, "config.json")), "No config json produced by merge"
    assert sd, "No model produced by merge"
    assert not [k for k, t in sd.items() if t.is_floating_point() and t.isnan().any()], "Output contains NaN"
    assert sd.keys() == reference.keys()


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_basic_merges_identical_with_adapter(tmp_path, zoo, case):
    cfg = CASES[case](zoo)
    method = cfg["merge_method"]
    with _mergekit_patches(method):
        mk = _run(cfg, tmp_path / "mk")
    assert adapter.install(seed=SEED)
    assert isinstance(mk_registry.get(method), adapter.WweightMergeMethod)
    ww = _run(cfg, tmp_path / "ww")
    _check_output(tmp_path / "ww", ww, mk)
    if method in ("ramplus_tl", "arcee_fusion"):
        # mergekit's float32 lambda_ / fusion mask promote its result to float32; wweight keeps the
        # inputs' bfloat16: mergekit's values rounded once (what mergekit writes with out_dtype set)
        assert all(t.dtype == torch.float32 for t in mk.values())
        assert all(t.dtype == torch.bfloat16 for t in ww.values())
        mk = {k: t.to(torch.bfloat16) for k, t in mk.items()}
    bad = [k for k in mk if not same(ww[k], mk[k])]
    assert not bad, (case, bad[:3], [(ww[k].float() - mk[k].float()).abs().max().item() for k in bad[:3]])
    if case == "gpt2_stack":  # mergekit's _check_config_layers
        import json
        assert json.load(open(tmp_path / "ww" / "config.json"))["num_hidden_layers"] == 4
    if case == "passthrough_scale":  # mergekit's _check_o_proj
        assert any("o_proj" in k for k in ww)
        assert all((t == 0).all() for k, t in ww.items() if "o_proj" in k)
        assert all(t.count_nonzero() > 0 for k, t in ww.items() if "lm_head" in k)


def test_refuses_what_mergekit_refuses(tmp_path, zoo):
    """mergekit's test_della_invalid_epsilon (density 0.66 +- 1.35 leaves (0, 1)): ValueError with and
    without the adapter; out-of-range parameters name the argument."""
    cfg = two_model_config(zoo, "model_a", "model_b", "della", "model_c",
                           {"density": 0.66, "epsilon": 1.35, "lambda": 0.5})
    with pytest.raises(ValueError):
        _run(cfg, tmp_path / "mk")
    adapter.install()
    with pytest.raises(ValueError, match="epsilon"):
        _run(cfg, tmp_path / "ww")
    with pytest.raises(ValueError, match="density"):
        _run(two_model_config(zoo, "model_a", "model_b", "ties", "model_c", {"density": 1.5}), tmp_path / "ww2")


def test_uninstall_restores_mergekit(tmp_path, zoo):
    """uninstall() puts mergekit's own objects back (the same objects) and so mergekit's numbers."""
    before = dict(mk_registry._METHODS)
    cfg = two_model_config(zoo, "model_a", "model_b", "dare_ties", "model_c", {"density": 0.66})
    torch.manual_seed(0)
    mk = _run(cfg, tmp_path / "mk")
    names = adapter.install()
    assert adapter.install() == names  # idempotent: same names, originals still remembered
    assert set(adapter.installed()) == set(M.MERGE_METHODS) == set(names)
    assert {"iso_c", "iso_cts", "tsv_m"} - set(before) == {"iso_c", "iso_cts", "tsv_m"}
    for n in before:
        if n in names:
            assert mk_registry.get(n).spec is before[n].spec  # configs validate exactly as mergekit's
    assert sorted(adapter.uninstall()) == sorted(names)
    assert adapter.uninstall() == () and adapter.installed() == ()
    assert mk_registry._METHODS == before and all(mk_registry._METHODS[n] is before[n] for n in before)
    torch.manual_seed(0)
    again = _run(cfg, tmp_path / "again")
    assert all(same(again[k], mk[k]) for k in mk)  # mergekit's own torch.bernoulli draws again


def test_install_options():
    before = dict(mk_registry._METHODS)
    assert adapter.install(override=False) == ("iso_c", "iso_cts", "tsv_m")
    assert mk_registry.get("ties") is before["ties"]
    with pytest.raises(ValueError, match=r"methods \['ties'\] are mergekit's own"):
        adapter.install(["ties", "iso_c"], override=False)
    assert adapter.install("slerp", backend="torch", seed=3) == ("slerp",)
    assert mk_registry.get("slerp").backend == "torch" and mk_registry.get("slerp").original is before["slerp"]
    assert adapter.install("slerp") == ("slerp",) and mk_registry.get("slerp").original is before["slerp"]
    with pytest.raises(ValueError, match="methods must be names from"):
        adapter.install(["slerpp"])
    with pytest.raises(ValueError, match="backend must be one of"):
        adapter.install(backend="gpu")
    with pytest.raises(TypeError, match="seed must be an int"):
        adapter.install(seed=1.5)
    assert adapter.uninstall("slerp") == ("slerp",) and mk_registry.get("slerp") is before["slerp"]
    assert set(adapter.installed()) == {"iso_c", "iso_cts", "tsv_m"}


def _random_group(g, name, layout):
    """Tensors of one key and a TensorGroup in mergekit's executor layout: inputs in config order, the
    base flagged where the config lists it (``layout``: base position among the inputs, or None)."""
    m = M.get(name)
    k = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "nuslerp": 2, "passthrough": 1}.get(name, 3)
    base = torch.randn(6, 10, generator=g)
    models = [base + 0.1 * torch.randn(6, 10, generator=g) for _ in range(k)]
    ids = [f"m{i}" for i in range(k + 1)]
    if not m.needs_base:
        inputs = models if name == "passthrough" else [base] + models
        return mk_base.TensorGroup.from_tensors([t.bfloat16() for t in inputs], ids=ids[:len(inputs)])
    pos = min(layout, k) if layout is not None else None
    inputs = models[:pos] + [base] + models[pos:] if pos is not None else models
    return mk_base.TensorGroup.from_tensors([t.bfloat16() for t in inputs], ids=[f"m{i}" for i in range(len(inputs))],
                                            base_index=pos, name="model.layers.0.mlp.up_proj.weight")


PARAMS = {"linear": {"weight": [0.6, 0.3, 0.1, 1.0]}, "slerp": {"t": 0.3}, "nearswap": {"t": 0.01},
          "nuslerp": {"weight": [0.6, 0.4]}, "multislerp": {"weight": [0.5, 1.0, 2.0]}, "ties": {"density": 0.5},
          "passthrough": {"scale": [0.5]}, "breadcrumbs": {"density": 0.7}, "sce": {"select_topk": 0.3}}


@pytest.mark.parametrize("layout", [0, 1, None])
def test_group_layouts_per_tensor(layout):
    """Each shared method called as mergekit's executor calls it (``method._execute_resolved`` on one
    TensorGroup) with the base first, second or absent: the adapter's result is mergekit's."""
    g = torch.Generator().manual_seed(layout or 7)
    for name in M.MERGE_METHODS:
        if name in M.ISO_METHODS or (layout is None and M.get(name).needs_base and not M.get(name).base_optional):
            continue
        group = _random_group(g, name, layout)
        params = dict(PARAMS.get(name, {}))
        if "weight" in params:
            ids = [e.id for e in (group.entries if not M.get(name).needs_base else group.non_base)]
            params["weight"] = dict(zip(ids, params["weight"]))
        elif "weight" in {p.name for p in mk_registry.get(name).spec.parameters}:
            params["weight"] = 0.7
        if name == "passthrough":
            params["scale"] = {group.entries[0].id: 0.5}
        patches = _mergekit_patches(name)
        with patches:
            (want,) = mk_registry.get(name)([group], parameters=params)
        adapter.install(name, seed=SEED)
        (got,) = mk_registry.get(name)([group], parameters=params)
        adapter.uninstall(name)
        if name in ("ramplus_tl", "arcee_fusion"):
            want = want.to(got.dtype)
        assert same(got, want), (name, layout, (got.float() - want.float()).abs().max())


def _iso_yaml(tmp_path, zoo, method, extra=None):
    cfg = {"merge_method": method, "base_model": zoo["model_c"], "dtype": "bfloat16",
           "models": [{"model": zoo["model_a"]}, {"model": zoo["model_b"]}],
           "parameters": {"alpha": 0.8, **(extra or {})}}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wweight_merge(capsys, *argv):
    from wweight import cli

    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err


def test_iso_c_through_mergekit_yaml_equals_wweight_merge(tmp_path, zoo, capsys):
    """``python -m wweight.integrations.mergekit CONFIG OUT`` (mergekit-yaml with the adapter installed, a
    fresh process) writes the same iso_c tensors as ``wweight merge`` on the same YAML. The process first
    checks that importing wweight and wweight.integrations imports no mergekit, then runs the module as
    ``python -m`` does (``runpy.run_module(..., run_name="__main__", alter_sys=True)``; one process for both)."""
    path = _iso_yaml(tmp_path, zoo, "iso_c")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = ("import runpy, sys, wweight, wweight.integrations\n"
            "assert 'mergekit' not in sys.modules, 'importing wweight imported mergekit'\n"
            "runpy.run_module('wweight.integrations.mergekit', run_name='__main__', alter_sys=True)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "mk"),
                        "--no-copy-tokenizer", "--quiet"], env=env, capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    torch.set_num_threads(1)  # iso SVDs are identical for one thread count (README)
    _wweight_merge(capsys, "merge", path, tmp_path / "ww", "-q")
    mk, ww = _load(tmp_path / "mk"), _load(tmp_path / "ww")
    assert mk.keys() == ww.keys()
    bad = [k for k in ww if not same(mk[k], ww[k])]
    assert not bad, (bad[:3], [(ww[k].float() - mk[k].float()).abs().max().item() for k in bad[:3]])


@pytest.mark.parametrize("method,extra,options", [
    ("iso_cts", {"common_space_fraction": 0.6}, []),
    ("tsv_m", {}, []),
    ("dare_ties", {"density": 0.5}, ["--random-seed", "5"]),
])
def test_module_main_equals_wweight_merge(tmp_path, zoo, capsys, method, extra, options):
    """The module main in-process: iso_cts / tsv_m, and dare_ties with mergekit's --random-seed as the
    Philox run seed, equal ``wweight merge`` (with the same --random-seed) bit for bit."""
    path = _iso_yaml(tmp_path, zoo, method, extra)
    if method == "dare_ties":
        cfg = yaml.safe_load(path.read_text())
        del cfg["parameters"]["alpha"]
        cfg["models"] = [{"model": m["model"], "parameters": {"weight": w}} for m, w in zip(cfg["models"], (0.6, 0.4))]
        path.write_text(yaml.safe_dump(cfg))
    torch.set_num_threads(1)
    assert adapter.main([str(path), str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet", *options]) == 0
    _wweight_merge(capsys, "merge", path, tmp_path / "ww", "-q", *options)
    mk, ww = _load(tmp_path / "mk"), _load(tmp_path / "ww")
    assert mk.keys() == ww.keys() and all(same(mk[k], ww[k]) for k in ww)
