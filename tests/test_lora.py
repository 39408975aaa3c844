"""``model+lora`` references (wweight/checkpoint/lora.py) against PEFT and mergekit.

Real PEFT LoRA adapters are made on a tiny HF-layout Llama zoo (and a tiny GPT-2 for Conv1D's
``fan_in_fan_out``) with random nonzero ``B``; :class:`LoraCheckpoint` must read PEFT's
``merge_and_unload`` weights bit for bit, and ``wweight merge`` of a YAML with ``model: base+adapter``
must write what mergekit's ``run_merge`` writes (it merges the adapter with PEFT into a cache dir).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from wweight.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from wweight.checkpoint.lora import LoraCheckpoint, open_model, pattern_key  # noqa: E402
from wweight.config import ConfigError, parse_config  # noqa: E402

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from wweight.examples.zoo import make_llama_zoo

    root = tmp_path_factory.mktemp("lora_zoo")
    out = {}
    for dt in (torch.bfloat16, torch.float32):
        d = root / str(dt).replace("torch.", "")
        make_llama_zoo(str(d), "tiny", 2, dtype=dt, seed=3)
        out[dt] = d
    return out


def make_adapter(base_dir, out_dir, *, seed=0, store_dtype=None, model=None, **lora_kw):
    """A PEFT LoRA adapter on ``base_dir`` with random nonzero A and B (and embedding A / B) and
    perturbed modules_to_save copies, saved with ``save_pretrained`` (safetensors); ``store_dtype``
    casts the LoRA weights before saving."""
    m = model if model is not None else transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    pm = peft.get_peft_model(m, peft.LoraConfig(**lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                if store_dtype is not None:
                    p.data = p.data.to(store_dtype)
            elif "modules_to_save" in n:   # a trained copy: differs from the base
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
    pm.save_pretrained(str(out_dir))
    return str(out_dir)


def peft_merged(base_dir, adapter):
    """PEFT's merge_and_unload of ``adapter`` on ``base_dir`` (what mergekit's ModelReference.merged does)."""
    m = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    return peft.PeftModel.from_pretrained(m, str(adapter)).merge_and_unload().state_dict()


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def check_read(base_dir, adapter, *, min_changed=1):
    want = peft_merged(base_dir, adapter)
    with open_model(str(base_dir), str(adapter), what="models[0]") as ck:
        assert isinstance(ck, LoraCheckpoint)
        plain = load_checkpoint(str(base_dir))
        bad = [k for k in ck.keys if not same(ck.read(k), want[k])]
        assert not bad, (bad[:3], [(ck.read(k).float() - want[k].float()).abs().max().item() for k in bad[:3]])
        changed = [k for k in ck.keys if not torch.equal(plain[k], want[k])]
        assert len(changed) >= min_changed   # the adapter did something: the check can fail
        return ck, changed


# ---------------------------------------------------------------- (a) reads == PEFT merge_and_unload


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_read_matches_peft_merge(tmp_path, zoo, dtype):
    """Every Llama projection, the embedding (lora_embedding_A/B, and its saved base_layer) and a
    modules_to_save lm_head."""
    ad = make_adapter(zoo[dtype] / "base", tmp_path / "ad", r=4, lora_alpha=8,
                      target_modules=LLAMA_ALL + ["embed_tokens"], modules_to_save=["lm_head"])
    ck, changed = check_read(zoo[dtype] / "base", ad, min_changed=2 * 7 + 2)
    assert "lm_head.weight" in ck.replaced and "model.embed_tokens.weight" in ck.modules


def test_read_on_a_mapped_base_matches_peft_merge(tmp_path, zoo, monkeypatch):
    """The base's tensors mapped copy-on-write (every size here): a tensor the adapter adds to is
    read into a buffer instead (written in place), the others stay mappings; same values."""
    from wweight import _pool
    from wweight.checkpoint import reader

    monkeypatch.setattr(reader, "MAP_MIN_BYTES", 1)
    ad = make_adapter(zoo[torch.bfloat16] / "base", tmp_path / "ad", r=4, lora_alpha=8, target_modules=LLAMA_ALL)
    check_read(zoo[torch.bfloat16] / "base", ad, min_changed=7)
    with open_model(str(zoo[torch.bfloat16] / "base"), str(ad), what="models[0]") as ck:
        mapped = {k: hasattr(ck.read(k), _pool._MARK) for k in ck.keys}
    assert not any(mapped[k] for k in ck.modules) and not any(mapped[k] for k in ck.bias_of)
    if reader._CAN_MAP:
        assert any(mapped[k] for k in ck.keys if k not in ck.modules)


def test_rslora_patterns_and_16bit_adapter(tmp_path, zoo):
    """use_rslora (alpha / sqrt(r)), per-module rank_pattern / alpha_pattern, bf16-stored adapter weights."""
    ad = make_adapter(zoo[torch.bfloat16] / "base", tmp_path / "ad", r=8, lora_alpha=16, use_rslora=True,
                      target_modules=["q_proj", "v_proj", "down_proj"], store_dtype=torch.bfloat16,
                      rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 3},
                      alpha_pattern={"model.layers.0.self_attn.q_proj": 5})
    ck, _ = check_read(zoo[torch.bfloat16] / "base", ad, min_changed=6)
    v = ck.modules["model.layers.0.self_attn.v_proj.weight"]
    q0 = ck.modules["model.layers.0.self_attn.q_proj.weight"]
    assert (v.rank, v.scaling) == (2, 16 / 2 ** 0.5) and q0.scaling == 5 / 8 ** 0.5
    assert ck.modules["model.layers.1.mlp.down_proj.weight"].rank == 3


def test_pattern_key_is_peft_get_pattern_key():
    from peft.utils.other import get_pattern_key

    pats = ["v_proj", r"layers\.1\.q_proj", "model.layers.0.k_proj", "proj"]
    for key in ["model.layers.0.self_attn.v_proj", "model.layers.1.q_proj", "model.layers.0.k_proj",
                "x.layers.1.q_proj", "a.b.c", "model.xv_proj"]:
        assert pattern_key(pats, key) == get_pattern_key(pats, key)


def test_gpt2_conv1d_fan_in_fan_out_and_lora_bias(tmp_path):
    """GPT-2's Conv1D weights are [in, out]: PEFT transposes B @ A (fan_in_fan_out); c_proj of the
    attention is square, so only the module type tells. lora_bias adds B's bias to the layer's bias."""
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "gpt2"))
    ad = make_adapter(tmp_path / "gpt2", tmp_path / "ad", r=4, lora_alpha=6, fan_in_fan_out=True,
                      lora_bias=True, target_modules=["c_attn", "c_proj", "c_fc"])
    ck, changed = check_read(tmp_path / "gpt2", ad, min_changed=2 * 4 * 2)
    assert ck.modules["transformer.h.0.attn.c_proj.weight"].transpose
    assert "transformer.h.0.attn.c_proj.bias" in ck.bias_of


# ---------------------------------------------------------------- (b) wweight merge == mergekit run_merge

def _merge_both(tmp_path, capsys, cfg, cache):
    """(wweight with base+lora refs, wweight on mergekit's PEFT-merged copies, mergekit run_merge)."""
    import yaml
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from test_checkpoint_helpers import run_main

    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, quiet=True, lora_merge_cache=str(cache)))

    def merged(ref):   # the directory mergekit merged the adapter into (cached by the run above)
        return ModelReference.parse(ref).merged(cache_dir=str(cache)).model.path if "+" in ref else ref

    plain = json.loads(json.dumps(cfg))
    if "base_model" in plain:
        plain["base_model"] = merged(plain["base_model"])
    for m in plain["models"]:
        m["model"] = merged(m["model"])
    outs = []
    for name, c in (("ww", cfg), ("ww_plain", plain)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(c))
        code, _, err = run_main(capsys, "merge", tmp_path / f"{name}.yaml", tmp_path / name, "-q")
        assert code == 0, err
        outs.append(load_checkpoint(str(tmp_path / name)))
    return outs[0], outs[1], load_checkpoint(str(tmp_path / "mk"))


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_merge_yaml_matches_mergekit(tmp_path, capsys, zoo, method):
    dt = torch.float32 if method == "ties" else torch.bfloat16   # fp32 ties: see tests/test_cli.py
    z = zoo[dt]
    a = make_adapter(z / "base", tmp_path / "adA", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    b = make_adapter(z / "base", tmp_path / "adB", seed=2, r=2, lora_alpha=2, target_modules=["up_proj", "v_proj"],
                     modules_to_save=["lm_head"])
    dname = "float32" if dt == torch.float32 else "bfloat16"
    if method == "linear":   # base_model is one more input of linear (top-level weight)
        cfg = {"merge_method": "linear", "base_model": f"{z}/base+{a}", "dtype": dname,
               "parameters": {"weight": 0.3},
               "models": [{"model": f"{z}/ft0", "parameters": {"weight": 0.5}},
                          {"model": f"{z}/ft1+{b}", "parameters": {"weight": 0.2}}]}
    else:
        extra = {"density": 0.5} if method == "ties" else {}
        cfg = {"merge_method": method, "base_model": f"{z}/base+{a}", "dtype": dname,
               "models": [{"model": f"{z}/ft0", "parameters": {"weight": 0.6, **extra}},
                          {"model": f"{z}/ft1+{b}", "parameters": {"weight": 0.7, **extra}},
                          {"model": f"{z}/base+{b}", "parameters": {"weight": 0.4, **extra}}]}
    ww, ww_plain, mk = _merge_both(tmp_path, capsys, cfg, tmp_path / "cache")
    assert set(ww) == set(mk) == set(ww_plain)
    # the LoRA path reads exactly PEFT's merged weights: same bits as merging mergekit's merged copies
    assert not [k for k in ww if not same(ww[k], ww_plain[k])]
    plain = load_checkpoint(str(z / "ft0"))
    assert any(not torch.equal(ww[k], plain[k]) for k in ww)
    # and mergekit's numbers: exact for bf16 task arithmetic; README's last-bit notes otherwise (float32 ties:
    # tests/test_cli.py's tolerance; linear: mergekit's fused addcmul_ vs wweight's separate roundings, at
    # most one bf16 ulp on a few elements)
    rtol, atol = {"task_arithmetic": (0, 0), "ties": (1e-5, 1e-6), "linear": (2 ** -7, 1e-6)}[method]
    differ = 0
    for k in mk:
        assert ww[k].dtype == mk[k].dtype, k
        torch.testing.assert_close(ww[k], mk[k], rtol=rtol, atol=atol, msg=k)
        differ += int((ww[k] != mk[k]).sum())
    assert differ <= 0.01 * sum(t.numel() for t in mk.values())


# ---------------------------------------------------------------- config parsing


def test_config_parses_model_plus_lora(tmp_path):
    (tmp_path / "a+b").mkdir()
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": "base+lora0",
                        "models": [{"model": "ft+lora1", "parameters": {"weight": 1}},
                                   {"model": "a+b", "parameters": {"weight": 1}},
                                   {"model": "base", "parameters": {"weight": 1}}]}, "c.yaml", cwd=str(tmp_path))
    assert (cfg.base_model.path, cfg.base_model.lora) == (str(tmp_path / "base"), str(tmp_path / "lora0"))
    assert cfg.base_model.name == "base+lora0"
    assert [(e.path, e.lora) for e in cfg.models] == [
        (str(tmp_path / "ft"), str(tmp_path / "lora1")),
        (str(tmp_path / "a+b"), None),            # an existing path with '+' is a plain path
        (str(tmp_path / "base"), None)]           # base without the adapter is not base_model
    with pytest.raises(ConfigError, match=r"models\[0\]\.model 'x\+y\+z'.*one '\+'"):
        parse_config({"merge_method": "linear", "models": [{"model": "x+y+z", "parameters": {"weight": 1}}]},
                     "c.yaml", cwd=str(tmp_path))
    with pytest.raises(ConfigError, match=r"base_model 'x\+'"):
        parse_config({"merge_method": "ties", "base_model": "x+", "models": ["y"]}, "c.yaml", cwd=str(tmp_path))
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1}}
                                                           for m in ("x+l", "x+l")]}, "c.yaml", cwd=str(tmp_path))


# ---------------------------------------------------------------- (c) bad adapters: clear errors


@pytest.fixture(scope="module")
def adapter(zoo, tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "ad"
    return make_adapter(zoo[torch.bfloat16] / "base", d, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _copy(adapter, tmp_path, edit_config=None, edit_tensors=None):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bad"
    shutil.copytree(adapter, d)
    if edit_config:
        p = d / "adapter_config.json"
        c = json.loads(p.read_text())
        edit_config(c)
        p.write_text(json.dumps(c))
    if edit_tensors:
        p = str(d / "adapter_model.safetensors")
        sd = load_file(p)
        edit_tensors(sd)
        save_file(sd, p)
    return d


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _rename(sd):
    sd[Q0.replace("layers.0", "layers.7") + ".lora_A.weight"] = sd.pop(Q0 + ".lora_A.weight")
    sd[Q0.replace("layers.0", "layers.7") + ".lora_B.weight"] = sd.pop(Q0 + ".lora_B.weight")


@pytest.mark.parametrize("case,pattern", [
    ("no_dir", r"LoRA adapter .*nope: directory not found"),
    ("no_config", r"adapter_config\.json is missing"),
    ("no_weights", r"adapter_model\.safetensors is missing"),
    ("bin_only", r"only adapter_model\.bin \(pickle"),
    ("no_match", r"adapter_model\.safetensors: key '.*layers\.7\.self_attn\.q_proj\.lora_A\.weight': matches no "
                 r"tensor of the model \(looked for 'model\.layers\.7\.self_attn\.q_proj\.weight'\)"),
    ("shape", r"adapter_model\.safetensors: key '.*q_proj\.lora_A\.weight': B @ A has shape \[64, 65\], the "
              r"model's 'model\.layers\.0\.self_attn\.q_proj\.weight' has \[64, 64\]"),
    ("rank", r"key '.*lora_A\.weight': rank mismatch: .*adapter_config r = 5"),
    ("only_a", r"key '.*q_proj\.lora_B\.weight': is missing"),
    ("dora", r"adapter_config\.json: DoRA \(use_dora: true\) is not supported"),
    ("dora_key", r"key '.*lora_magnitude_vector.*': DoRA magnitude vector"),
    ("not_lora", r"peft_type 'IA3' is not supported"),
    ("prefix", r"key 'model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight': does not start with 'base_model\.model\.'"),
])
def test_bad_adapters_are_clear_errors(tmp_path, zoo, adapter, case, pattern):
    def cfg(k, v):
        return lambda c: c.__setitem__(k, v)

    edits = {
        "no_match": dict(edit_tensors=_rename),
        "shape": dict(edit_tensors=lambda sd: sd.__setitem__(Q0 + ".lora_A.weight", torch.zeros(4, 65))),
        "rank": dict(edit_config=cfg("r", 5)),
        "only_a": dict(edit_tensors=lambda sd: sd.pop(Q0 + ".lora_B.weight")),
        "dora": dict(edit_config=cfg("use_dora", True)),
        "dora_key": dict(edit_tensors=lambda sd: sd.__setitem__(Q0 + ".lora_magnitude_vector", torch.ones(64))),
        "not_lora": dict(edit_config=cfg("peft_type", "IA3")),
        "prefix": dict(edit_tensors=lambda sd: sd.__setitem__(
            Q0[len("base_model.model."):] + ".lora_A.weight", sd.pop(Q0 + ".lora_A.weight"))),
    }
    if case == "no_dir":
        d = tmp_path / "nope"
    else:
        d = _copy(adapter, tmp_path, **edits.get(case, {}))
        if case == "no_config":
            os.remove(d / "adapter_config.json")
        if case in ("no_weights", "bin_only"):
            os.remove(d / "adapter_model.safetensors")
        if case == "bin_only":
            (d / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=pattern):
        open_model(str(zoo[torch.bfloat16] / "base"), str(d), what="models[0]")


def test_real_dora_adapter_is_refused(tmp_path, zoo):
    ad = make_adapter(zoo[torch.bfloat16] / "base", tmp_path / "dora", r=2, lora_alpha=2, use_dora=True,
                      target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match=r"DoRA"):
        open_model(str(zoo[torch.bfloat16] / "base"), ad)


def test_cli_errors_and_plan(tmp_path, capsys, zoo, adapter):
    """The CLI names the adapter file and key; the output may not overlap the adapter; the plan's item
    cost counts the float32 B @ A temporaries."""
    import yaml
    from test_checkpoint_helpers import run_main
    from wweight.checkpoint import plan_merge

    z = zoo[torch.bfloat16]
    bad = _copy(adapter, tmp_path, edit_tensors=_rename)
    p = tmp_path / "c.yaml"
    def linear(*refs):
        return {"merge_method": "linear", "models": [{"model": r, "parameters": {"weight": 1}} for r in refs]}

    p.write_text(yaml.safe_dump(linear(f"{z}/base+{bad}", f"{z}/ft0")))
    code, _, err = run_main(capsys, "merge", p, tmp_path / "out", "-q")
    assert code != 0 and "adapter_model.safetensors: key" in err and "layers.7" in err, err
    assert not (tmp_path / "out").exists()
    cfg = parse_config(linear(f"{z}/base+{adapter}", f"{z}/ft0"))
    with pytest.raises(CheckpointError, match="overlaps the input model"):
        plan_merge(cfg, os.path.join(adapter, "out"))
    plan = plan_merge(cfg, str(tmp_path / "o2"))
    assert f"model[0]      {z}/base + LoRA {adapter}" in plan.describe()
    plain = plan_merge(parse_config(linear(f"{z}/base", f"{z}/ft0")), str(tmp_path / "o3"))
    cost = {it.keys[0]: it.cost for it in plan.items}
    base_cost = {it.keys[0]: it.cost for it in plain.items}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert cost[q] - base_cost[q] >= 4 * 64 * 64          # the float32 product
    assert cost["model.norm.weight"] == base_cost["model.norm.weight"]
    for ck in plan.inputs + plain.inputs:
        ck.close()


# ---------------------------------------------------------------- memory: the plan's bound holds with LoRA reads


def _hand_adapter(d, model_dir, r, seed):
    """A LoRA adapter in PEFT's file layout for every matrix of ``model_dir`` (no model class needed)."""
    from safetensors.torch import save_file

    from wweight.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(seed)
    sd = {}
    with Checkpoint(model_dir) as ck:
        for k in ck.keys:
            shp = ck.tensors[k].shape
            if len(shp) == 2:
                m = "base_model.model." + k[: -len(".weight")]
                sd[m + ".lora_A.weight"] = torch.randn(r, shp[1], generator=g)
                sd[m + ".lora_B.weight"] = torch.randn(shp[0], r, generator=g) * 0.01
    os.makedirs(d, exist_ok=True)
    save_file(sd, os.path.join(d, "adapter_model.safetensors"))
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r}, f)
    return d


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_within_bound_with_lora(tmp_path, capsys):
    """tests/test_memory_budget.py's measurement (fresh child, peak RSS above the baseline) on a linear
    merge whose first two inputs are base+adapter: the float32 B @ A of each read is in the item costs."""
    import subprocess
    import sys

    import test_memory_budget as tm
    from test_checkpoint_helpers import write_yaml
    from wweight.checkpoint.plan import plan_merge
    from wweight.config import load_config

    paths = tm._zoo(str(tmp_path / "big"), tm.SHAPES, 0)
    tiny = tm._zoo(str(tmp_path / "tiny"), [(64, 32), (32,), (32, 64)], 1)
    ad, ad_t = _hand_adapter(str(tmp_path / "ad"), paths[0], 16, 0), _hand_adapter(str(tmp_path / "adt"), tiny[0], 2, 1)
    w = [{"weight": x} for x in (0.5, 0.3, 0.2)]
    cfg = write_yaml(tmp_path / "c.yaml", "linear", None, [f"{paths[0]}+{ad}", f"{paths[1]}+{ad}", paths[2]], w)
    warm = write_yaml(tmp_path / "w.yaml", "linear", None, [f"{tiny[0]}+{ad_t}", tiny[1], tiny[2]], w)
    budgets = ("16MB", "96MB")   # below the largest item (one at a time), and above it
    proc = subprocess.run([sys.executable, "-c", tm._CHILD, warm, cfg, str(tmp_path / "out"), *budgets],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    plain = plan_merge(load_config(str(write_yaml(tmp_path / "p.yaml", "linear", None, paths, w))),
                       str(tmp_path / "dry-p"), memory_budget="16MB", check_space=False)
    for r, b in zip(res, budgets):
        plan = plan_merge(load_config(str(cfg)), str(tmp_path / f"dry-{b}"), memory_budget=b, check_space=False)
        assert r["bound"] == plan.bound
        with capsys.disabled():
            print(f"\nlinear + 2 LoRA inputs --memory-budget {b}: peak {r['delta'] / 2**20:.1f} MiB above the "
                  f"baseline, bound {plan.bound / 2**20:.1f} MiB (largest item {plan.largest / 2**20:.1f} MiB, "
                  f"without the adapters {plain.largest / 2**20:.1f} MiB)")
        assert (plan.largest > plan.memory_budget) == (b == "16MB")
        # before the merged add ran in row blocks, the 16MB case peaked at 120.8 MiB for a 65.6 MiB bound
        assert r["delta"] <= plan.bound + tm.SLACK
    assert plan.largest > plain.largest
