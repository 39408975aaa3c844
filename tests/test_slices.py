"""``slices:`` (frankenmerges, layer swapping, per-slice merges) against mergekit 0.1.5's run_merge.

Every config runs through ``wweight merge`` (the CLI, in-process) and mergekit's ``run_merge``
(in-process, offline) on tiny HF-layout Llama models (5 layers, plus a 3-layer and a 7-layer model
of other weights), and the outputs must be the same tensors, bit for bit, under the same (renumbered)
names, with the same ``num_hidden_layers`` in config.json. Bad slices get a ConfigError naming the field.
"""
import pytest
import torch

from wweight.config import ConfigError, parse_config
from test_config_gradients import assert_identical, both, load_dir, make_model, make_zoo

pytest.importorskip("mergekit.merge")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(str(tmp_path_factory.mktemp("slices_zoo")), {"short": 3, "long": 7})


def _src(zoo, name, a, b, **params):
    d = {"model": zoo[name], "layer_range": [a, b]}
    if params:
        d["parameters"] = params
    return d


def _check(tmp_path, capsys, cfg, n_layers, tag):
    ww, mk, cw, cm = both(tmp_path, capsys, cfg, tag)
    assert_identical(ww, mk)
    assert cw["num_hidden_layers"] == cm["num_hidden_layers"] == n_layers
    assert sum(k.endswith(".mlp.up_proj.weight") for k in ww) == n_layers
    return ww


def test_passthrough_frankenmerge_overlapping_ranges(tmp_path, capsys, zoo):
    """Layers 0-2 of ft0, then layers 1-3 of ft1 (overlapping ranges): 6 layers, renumbered."""
    cfg = {"merge_method": "passthrough", "dtype": "bfloat16",
           "slices": [{"sources": [_src(zoo, "ft0", 0, 3)]}, {"sources": [_src(zoo, "ft1", 1, 4)]}]}
    ww = _check(tmp_path, capsys, cfg, 6, "franken")
    ft0, ft1 = load_dir(zoo["ft0"]), load_dir(zoo["ft1"])
    # against the inputs themselves: output layer 3 is ft1's layer 1; embeddings ft0's, lm_head ft1's
    assert torch.equal(ww["model.layers.3.self_attn.q_proj.weight"], ft1["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(ww["model.layers.2.mlp.down_proj.weight"], ft0["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(ww["model.embed_tokens.weight"], ft0["model.embed_tokens.weight"])
    assert torch.equal(ww["lm_head.weight"], ft1["lm_head.weight"])


def test_layer_swapping_recipe(tmp_path, capsys, zoo):
    """The "layer swapping" recipe: single-layer slices alternating between two fine-tunes. A
    ``scale`` gradient: a one-layer slice is at t = 1 (scale 1), embeddings / lm_head at t = 0 (0.5)."""
    slices = [{"sources": [_src(zoo, "ft0" if i % 2 == 0 else "ft1", i, i + 1)]} for i in range(5)]
    ww = _check(tmp_path, capsys, {"merge_method": "passthrough", "slices": slices, "parameters": {"scale": [0.5, 1]}},
                5, "swap")
    ft0, ft1 = load_dir(zoo["ft0"]), load_dir(zoo["ft1"])
    assert torch.equal(ww["model.layers.3.mlp.up_proj.weight"], ft1["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(ww["model.embed_tokens.weight"], ft0["model.embed_tokens.weight"] * 0.5)


def test_models_of_different_layer_counts_and_scale(tmp_path, capsys, zoo):
    """A 3-layer and a 7-layer model stacked (the point of frankenmerges), a passthrough ``scale``
    gradient in the second slice."""
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [_src(zoo, "short", 0, 3)]},
                      {"sources": [_src(zoo, "long", 2, 7, scale=[1.0, 0.5])]}]}
    _check(tmp_path, capsys, cfg, 8, "mixed")


def test_per_model_filters_match_the_input_tensor_names(tmp_path, capsys, zoo):
    """mergekit's resolve_parameters: every filter of a per-model parameter (the source's, the
    slice's) sees that source's *input* tensor name (source layer 3 = output layer 1 here), not the
    renumbered output name."""
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [_src(zoo, "ft0", 2, 5, scale=[{"filter": "layers.3.", "value": 0.5},
                                                                 {"value": 1.0}])]},
                      {"sources": [_src(zoo, "ft1", 0, 2)],
                       "parameters": {"scale": [{"filter": "layers.1.", "value": 2.0}, {"value": 1.0}]}}]}
    ww = _check(tmp_path, capsys, cfg, 5, "filters")
    ft0, ft1 = load_dir(zoo["ft0"]), load_dir(zoo["ft1"])
    k = "mlp.up_proj.weight"
    assert torch.equal(ww[f"model.layers.1.{k}"], (ft0[f"model.layers.3.{k}"] * 0.5))    # input layer 3
    assert torch.equal(ww[f"model.layers.4.{k}"], (ft1[f"model.layers.1.{k}"] * 2.0))    # input layer 1
    assert torch.equal(ww[f"model.layers.3.{k}"], ft1[f"model.layers.0.{k}"])


def test_merged_slices_with_per_slice_parameters_and_base(tmp_path, capsys, zoo):
    """Each slice a merge of its sources over equal-length ranges: slerp with a per-slice t gradient
    and a per-slice base_model; task_arithmetic with the base among the sources and per-source weights."""
    cfg = {"merge_method": "slerp", "base_model": zoo["ft0"],
           "slices": [{"sources": [_src(zoo, "ft0", 0, 2), _src(zoo, "ft1", 0, 2)], "parameters": {"t": [0, 1]}},
                      {"sources": [_src(zoo, "ft1", 2, 5), _src(zoo, "ft2", 1, 4)], "base_model": zoo["ft2"],
                       "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.4}]}}],
           "parameters": {"t": 0.5}}
    _check(tmp_path, capsys, cfg, 5, "slerp")
    cfg = {"merge_method": "task_arithmetic", "base_model": zoo["base"],
           "slices": [{"sources": [_src(zoo, "base", 0, 5), _src(zoo, "ft0", 0, 5, weight=[0.2, 1.0]),
                                   _src(zoo, "ft1", 0, 5, weight=0.5)]},
                      {"sources": [_src(zoo, "base", 3, 5), _src(zoo, "ft2", 3, 5)],
                       "parameters": {"weight": 0.7}}],
           # a shared parameter's filter sees the output name: output layer 5 is input layer 3
           "parameters": {"lambda": [{"filter": "layers.5.", "value": 3.0}, {"value": 1.0}]}}
    ww = _check(tmp_path, capsys, cfg, 7, "ta")
    base, ft2 = load_dir(zoo["base"]), load_dir(zoo["ft2"])
    k = "mlp.up_proj.weight"
    b3 = base[f"model.layers.3.{k}"].float()
    d3 = ft2[f"model.layers.3.{k}"].float() - b3
    got = ww[f"model.layers.5.{k}"].float()
    # lambda 3 applied (bf16 roundings aside), not lambda 1
    assert (got - (b3 + 2.1 * d3)).abs().mean() < 0.2 * (2.1 * d3 - 0.7 * d3).abs().mean()


def test_bad_slices_name_the_field(tmp_path, capsys, zoo):
    from test_checkpoint_helpers import run_main
    import yaml

    def pt(*srcs, **kw):
        return {"merge_method": "passthrough", "slices": [{"sources": list(srcs)}], **kw}

    for cfg, pattern in [
        (pt(_src(zoo, "ft0", 3, 1)), r"slices\[0\].sources\[0\].layer_range \[3, 1\]: end must be greater"),
        (pt(_src(zoo, "ft0", -1, 2)), r"slices\[0\].sources\[0\].layer_range \[-1, 2\]: start must be >= 0"),
        (pt({"model": zoo["ft0"], "layer_range": [0]}), r"slices\[0\].sources\[0\].layer_range must be \[start, end\]"),
        (pt({"model": zoo["ft0"]}), r"slices\[0\].sources\[0\] must be a mapping with 'model' and 'layer_range'"),
        (pt(_src(zoo, "ft0", 0, 2), _src(zoo, "ft1", 0, 2)), r"slices\[0\]: merge_method 'passthrough' takes "
                                                               r"exactly 1 source"),
        ({"merge_method": "slerp", "base_model": zoo["ft0"], "parameters": {"t": 0.5},
          "slices": [{"sources": [_src(zoo, "ft0", 0, 2), _src(zoo, "ft1", 0, 3)]}]},
         r"slices\[0\].sources: every source must span the same number of layers \(layer_range lengths \[2, 3\]\)"),
        ({"merge_method": "ties", "base_model": zoo["base"],
          "slices": [{"sources": [_src(zoo, "ft0", 0, 2, weight=1), _src(zoo, "ft1", 0, 2, weight=1)]}]},
         r"slices\[0\].sources must include base_model"),
        ({"merge_method": "passthrough", "slices": []}, r"or slices a non-empty list"),
        ({"merge_method": "passthrough", "slices": [{"sources": [_src(zoo, "ft0", 0, 2)]}], "models": [zoo["ft1"]]},
         r"either models or slices, not both"),
        (pt(_src(zoo, "ft0", 0, 2, density=0.5)), r"slices\[0\].sources\[0\].parameters.density is not a parameter"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            parse_config(cfg)
    # out of range: known once the model is opened (the plan), the CLI's one-line error
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(pt(_src(zoo, "short", 1, 4))))
    code, _, err = run_main(capsys, "merge", path, tmp_path / "o", "-q")
    assert code == 1 and "slices[0].sources[0].layer_range [1, 4] is out of range" in err
    assert "has 3 layers (0 .. 2)" in err and "Traceback" not in err


def test_one_error_names_every_unsupported_key(zoo):
    cfg = {"merge_method": "passthrough", "tokenizer": {"source": "union"}, "chat_template": "chatml",
           "modules": {}, "tokenizer_source": "union", "frobnicate": 1,
           "slices": [{"sources": [_src(zoo, "ft0", 0, 2)], "residual_weight": 0.1}]}
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "c.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("c.yaml: 6 unsupported settings: ")
    for part in ("'modules' is not supported", "the 'tokenizer' block", "'chat_template' is not supported",
                 "tokenizer_source 'union'", "unknown top-level key 'frobnicate'", "slices[0].residual_weight"):
        assert part in msg, part
    with pytest.raises(ConfigError, match=r"^c.yaml: 'chat_template' is not supported by wweight$"):
        parse_config({"merge_method": "linear", "chat_template": "x", "models": [zoo["ft0"]]}, "c.yaml")


def test_rebuilt_config_keeps_the_slices(zoo):
    """A MergeConfig built in Python (no YAML text) writes its slices to mergekit_config.yml, and
    mergekit reads that back as the same slices."""
    from mergekit.config import MergeConfiguration
    from wweight.checkpoint.card import equivalent_config

    cfg = parse_config({"merge_method": "passthrough",
                        "slices": [{"sources": [_src(zoo, "ft0", 0, 2, scale=0.5)]},
                                   {"sources": [_src(zoo, "long", 3, 7)]}]})
    cfg.raw = None
    mk = MergeConfiguration.model_validate(equivalent_config(cfg))
    assert [(s.sources[0].layer_range, s.sources[0].parameters) for s in mk.slices] == [((0, 2), {"scale": 0.5}),
                                                                                       ((3, 7), None)]


def test_sources_of_other_shapes_are_named(tmp_path, capsys, zoo):
    """A merged slice over models of different widths: the first mismatching tensor and both models
    are named, before anything is written."""
    from test_checkpoint_helpers import run_main
    import yaml

    make_model(str(tmp_path / "wide"), 5, 7, hidden=48)
    cfg = {"merge_method": "slerp", "base_model": zoo["ft0"], "parameters": {"t": 0.5},
           "slices": [{"sources": [_src(zoo, "ft0", 0, 2), {"model": str(tmp_path / "wide"), "layer_range": [1, 3]}]}]}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_main(capsys, "merge", path, tmp_path / "o", "-q")
    assert code == 1 and "Traceback" not in err
    assert "wide" in err and "'model.embed_tokens.weight' is [40, 48]" in err and "is [40, 32]" in err, err
    assert not (tmp_path / "o").exists()
