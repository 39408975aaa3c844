"""Parameter gradients (a list of numbers interpolated over the layer position) against mergekit 0.1.5.

``evaluate_setting`` is compared with mergekit's own (``mergekit.config.evaluate_setting``) on
hundreds of random settings and positions; whole merges with gradients, ``{filter, value}`` lists of
gradients and bool gradients run through ``wweight merge`` (the CLI, in-process) and mergekit's
``run_merge`` (in-process, offline) on a tiny HF-layout Llama zoo of 5 layers, bit for bit. The zoo
helpers are shared with tests/test_slices.py.
"""
import contextlib
import json
import math
import os
import random

import pytest
import torch
import yaml

from wweight.config import ConfigError, evaluate_setting, parse_config
from wweight.checkpoint.slices import layer_t, split_layer_key

mk_config = pytest.importorskip("mergekit.config")


# ----- tiny HF-layout Llama models with any number of layers (shared with test_slices.py) -----

def make_model(path, num_layers, seed, base=None, delta=0.05, hidden=32):
    """A Llama-layout checkpoint of ``num_layers`` layers (``hidden`` wide) in ``path``; with ``base``
    (a state dict), base + noise for the keys they share."""
    from safetensors.torch import save_file
    from wweight.examples.zoo import llama_config, llama_shapes

    cfg = llama_config("tiny", torch.bfloat16)
    cfg.update(hidden_size=hidden, intermediate_size=48, vocab_size=40, num_hidden_layers=num_layers,
               num_attention_heads=2, num_key_value_heads=1)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in llama_shapes(cfg):
        t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        if base is not None and k in base:
            t = base[k].float() + delta * t
        sd[k] = t.to(torch.bfloat16)
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return sd


def make_zoo(root, layers=None):
    """``{name: path}``: base and ft0..ft2 of 5 layers (fine-tunes of the base), plus ``layers``'
    extra models ``{name: num_layers}`` of their own (unrelated random weights)."""
    out = {}
    base = make_model(os.path.join(root, "base"), 5, 0)
    out["base"] = os.path.join(root, "base")
    for i in range(3):
        out[f"ft{i}"] = os.path.join(root, f"ft{i}")
        make_model(out[f"ft{i}"], 5, 10 + i, base=base)
    for j, (name, n) in enumerate((layers or {}).items()):
        out[name] = os.path.join(root, name)
        make_model(out[name], n, 100 + j)
    return out


def load_dir(d):
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(d, f)))
    return sd


@contextlib.contextmanager
def stable_argsort():
    """mergekit's magnitude cut (``sparsify.magnitude``: ``torch.argsort(|w|, descending=True)[:k]``)
    with its tie choice fixed to the lowest flat indices, wweight's documented rule (README)."""
    real = torch.argsort

    def argsort(x, *a, **kw):
        kw["stable"] = True
        return real(x, *a, **kw)

    torch.argsort = argsort
    try:
        yield
    finally:
        torch.argsort = real


def both(tmp_path, capsys, cfg, tag="m"):
    """Run ``cfg`` (a dict) through ``wweight merge`` and mergekit's run_merge (its magnitude cut's
    ties broken as wweight's): (wweight's tensors, mergekit's tensors, wweight's config.json,
    mergekit's config.json)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from test_checkpoint_helpers import run_main

    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ww, mk = tmp_path / f"{tag}-ww", tmp_path / f"{tag}-mk"
    code, _, err = run_main(capsys, "merge", path, ww, "-q")
    assert code == 0, err
    with stable_argsort():
        run_merge(MergeConfiguration.model_validate(cfg), str(mk), MergeOptions(copy_tokenizer=False, quiet=True))
    cfgs = [json.load(open(os.path.join(d, "config.json"))) for d in (ww, mk)]
    return load_dir(ww), load_dir(mk), cfgs[0], cfgs[1]


def assert_identical(ww, mk):
    assert sorted(ww) == sorted(mk)
    bad = [k for k in mk if ww[k].dtype != mk[k].dtype or ww[k].shape != mk[k].shape or not torch.equal(ww[k], mk[k])]
    assert not bad, (bad[:4], [(ww[k].float() - mk[k].float()).abs().max().item() for k in bad[:4]
                               if ww[k].shape == mk[k].shape])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(str(tmp_path_factory.mktemp("grad_zoo")))


# ----- evaluate_setting, number for number -----

def _mk_eval(setting, name, t, kind):
    from pydantic import TypeAdapter

    ta = TypeAdapter(kind)
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        setting = [mk_config.ConditionalParameter(**c) for c in setting]
    return mk_config.evaluate_setting(name, setting, t, validate=ta.validate_python)


def _random_setting(rng):
    def scalar_or_gradient():
        r = rng.random()
        if r < 0.2:
            return round(rng.uniform(0.01, 1), rng.choice([1, 3, 7]))
        if r < 0.3:
            return [rng.choice([True, False]) for _ in range(rng.randint(1, 5))]
        # numbers, ints among them (validated to floats on both sides)
        return [rng.choice([rng.uniform(0.01, 1), rng.randint(1, 1)]) for _ in range(rng.randint(1, 7))]

    if rng.random() < 0.6:
        return scalar_or_gradient()
    filters = [None, "*", "mlp", "self_attn", "layers.1", "q_proj", "norm", "nomatch"]
    return [{"filter": rng.choice(filters), "value": scalar_or_gradient()} for _ in range(rng.randint(1, 4))]


def _kind(setting):
    vals = setting if not isinstance(setting, list) or not setting or not isinstance(setting[0], dict) \
        else [c["value"] for c in setting]
    flat = [v for x in vals for v in (x if isinstance(x, list) else [x])] if isinstance(vals, list) else [vals]
    return bool if all(isinstance(v, bool) for v in flat) else float


def test_evaluate_setting_matches_mergekit_on_random_settings():
    rng = random.Random(13)
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight",
             "model.embed_tokens.weight", "lm_head.weight"]
    n = 0
    for _ in range(600):
        s = _random_setting(rng)
        kind = _kind(s)
        if kind is bool and not all(isinstance(v, bool) for v in (s if isinstance(s, list) and s and
                                                                   not isinstance(s[0], dict) else [True])):
            continue
        mixed = isinstance(s, list) and s and isinstance(s[0], dict) and len({_kind([c]) for c in s}) > 1
        if mixed:     # one parameter has one type
            continue
        # wweight evaluates validated settings: numbers are floats (check_param), as mergekit validates
        ww_s = json.loads(json.dumps(s), parse_int=float) if kind is float else s
        for t in [0.0, 1.0, rng.random(), layer_t(rng.randint(0, 6), 7), layer_t(1, 3), layer_t(2, 7)]:
            name = rng.choice(names)
            want = _mk_eval(s, name, t, kind)
            got = evaluate_setting(ww_s, name, t)
            assert got == want and type(got) is type(want), (s, name, t, got, want)
            n += 1
    assert n > 1500


def test_gradient_interpolation_by_hand():
    """The formula, not just agreement: 5 values, t at the layer positions of a 9-layer slice."""
    v = [0.0, 0.5, 0.3, 0.7, 1.0]
    got = [evaluate_setting(v, "x", layer_t(i, 9)) for i in range(9)]
    assert got == pytest.approx([0, 0.25, 0.5, 0.4, 0.3, 0.5, 0.7, 0.85, 1.0])
    assert evaluate_setting([True, False], "x", 0.99) is True and evaluate_setting([True, False], "x", 1.0) is False
    assert evaluate_setting([{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}], "layers.0.mlp.up", 0.25) == 0.25
    assert evaluate_setting([{"filter": "mlp", "value": [0, 1]}], "attn", 0.25) is None
    assert split_layer_key("model.layers.12.mlp.up_proj.weight") == ("model.layers.", 12, "mlp.up_proj.weight")
    assert split_layer_key("transformer.h.3.attn.c_attn.weight")[1] == 3
    assert split_layer_key("model.norm.weight") is None


# ----- whole merges -----

GRAD_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
          {"value": 0.5}]
CASES = {
    # the Hub's most common slerp config: per-module t gradients
    "slerp": {"merge_method": "slerp", "base_model": "ft0", "models": [{"model": "ft0"}, {"model": "ft1"}],
              "parameters": {"t": GRAD_T}},
    "ties": {"merge_method": "ties", "base_model": "base",
             "models": [{"model": "ft0", "parameters": {"weight": [1.0, 0.2], "density": [0.2, 0.9, 0.5]}},
                        {"model": "ft1", "parameters": {"weight": [{"filter": "mlp", "value": [0.3, 1]},
                                                                   {"value": 0.6}],
                                                        "density": ["5e-1", "2e-1"]}}],   # YAML 1.1: strings
             "parameters": {"normalize": [True, False]}},
    "linear": {"merge_method": "linear",
               "models": [{"model": "ft0", "parameters": {"weight": [0, 1]}},
                          {"model": "ft1", "parameters": {"weight": [1, 0.25, 0]}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                        "models": [{"model": "ft0", "parameters": {"weight": [0.1, 0.9]}},
                                   {"model": "ft2", "parameters": {"weight": [{"filter": "layers.2", "value": 2},
                                                                              {"value": [0.5, 1.5]}]}}],
                        "parameters": {"lambda": [1.0, 0.5]}},
}


def _paths(cfg, zoo):
    out = json.loads(json.dumps(cfg))
    if "base_model" in out:
        out["base_model"] = zoo[out["base_model"]]
    for m in out.get("models", []):
        m["model"] = zoo[m["model"]]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_merges_identical_to_mergekit(tmp_path, capsys, zoo, name):
    cfg = _paths(CASES[name], zoo)
    ww, mk, _, _ = both(tmp_path, capsys, cfg, name)
    assert_identical(ww, mk)
    if name == "linear":   # the gradient reaches the layers: layer 0 is ft1 alone, layer 4 ft0 alone
        k0, k4 = "model.layers.0.mlp.up_proj.weight", "model.layers.4.mlp.up_proj.weight"
        from test_config_gradients import load_dir as ld

        ft0, ft1 = ld(zoo["ft0"]), ld(zoo["ft1"])
        assert torch.equal(ww[k0], ft1[k0]) and torch.equal(ww[k4], ft0[k4])
        assert torch.equal(ww["model.embed_tokens.weight"], ft1["model.embed_tokens.weight"])  # t = 0


def test_bad_gradients_name_the_field(zoo):
    def cfg(**params):
        return {"merge_method": "ties", "base_model": zoo["base"],
                "models": [{"model": zoo["ft0"], "parameters": {"weight": 1.0, **params}}]}

    for params, pattern in [
        ({"density": []}, r"models\[0\].parameters.density: an empty list"),
        ({"density": [{"filter": "mlp", "value": []}]}, r"models\[0\].parameters.density\[0\].value: an empty list"),
        ({"density": [0.5, 1.5]}, r"models\[0\].parameters.density must be in"),
        ({"density": [0.5, [0.2]]}, r"models\[0\].parameters.density must be a number, a gradient"),
        ({"density": [0.5, "x"]}, r"density must be a finite number"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            parse_config(cfg(**params))
    with pytest.raises(ConfigError, match=r"parameters.max_iter: gradients of the integer parameter"):
        parse_config({"merge_method": "karcher", "models": [{"model": zoo["ft0"]}, {"model": zoo["ft1"]}],
                      "parameters": {"max_iter": [2, 8]}})


def test_iso_alpha_gradient_per_layer(tmp_path, capsys, zoo):
    """iso_c (not in mergekit) with an ``alpha`` gradient: each layer's tensors equal
    ``merge_state_dicts`` of that layer alone at its position's alpha (the batched groups are cut
    per layer position only when a setting is a gradient)."""
    import wweight
    from test_checkpoint_helpers import run_main

    cfg = {"merge_method": "iso_c", "base_model": zoo["base"], "models": [{"model": zoo["ft0"]}, {"model": zoo["ft1"]}],
           "parameters": {"alpha": [0.5, 1.5]}}
    path = tmp_path / "iso.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_main(capsys, "merge", path, tmp_path / "iso", "-q")
    assert code == 0, err
    got = load_dir(tmp_path / "iso")
    base, fts = load_dir(zoo["base"]), [load_dir(zoo["ft0"]), load_dir(zoo["ft1"])]
    for layer in (0, 2, 4):
        ks = [k for k in base if k.startswith(f"model.layers.{layer}.") and base[k].dim() == 2]
        alpha = 0.5 + layer / 4
        want = wweight.merge_state_dicts("iso_c", {k: base[k] for k in ks}, [{k: f[k] for k in ks} for f in fts],
                                         alpha=alpha)
        for k in ks:
            assert torch.equal(got[k], want[k].to(got[k].dtype)), (k, alpha)
