"""The demo zoo: a base MLP and fine-tunes on disjoint digit classes, saved in Hugging Face layout.

``build_zoo(root)`` writes (seeded, offline, a few seconds on 2 CPU cores)::

    root/base/            config.json + model.safetensors
    root/task0 ... taskN/ one fine-tune per task (class subset), same layout
    root/base-sharded/    the base again, split in 3 shards + model.safetensors.index.json

``run_demo()`` is ``wweight demo``: it builds the zoo, merges it through the same YAML path as
``wweight merge`` (TIES, Iso-CTS, task arithmetic) and prints each model's accuracy per task.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

ARCHITECTURE = "WWeightDigitsMLP"
MODEL_TYPE = "wweight-digits-mlp"


def model_config(hidden: Sequence[int], n_in: int = 64, n_out: int = 10) -> dict:
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "hidden_sizes": list(hidden),
            "n_in": n_in, "n_out": n_out, "num_hidden_layers": len(hidden), "torch_dtype": "float32"}


def save_model(path: str, state_dict: Dict[str, torch.Tensor], hidden: Sequence[int], *,
               max_shard_size="5GB", overwrite: bool = True) -> str:
    from ..checkpoint import save_checkpoint

    save_checkpoint(path, state_dict, config=model_config(hidden), max_shard_size=max_shard_size,
                    overwrite=overwrite)
    return path


def load_model(path: str):
    """The ``nn.Sequential`` MLP stored at ``path`` (config.json + safetensors)."""
    from ..checkpoint import load_checkpoint
    from .digits import make_mlp

    with open(os.path.join(path, "config.json"), "r", encoding="utf-8") as f:
        cfg = json.load(f)
    m = make_mlp(cfg["hidden_sizes"], n_in=cfg["n_in"], n_out=cfg["n_out"])
    m.load_state_dict({k: v.float() for k, v in load_checkpoint(path).items()})
    return m


def build_zoo(root: str, n_tasks: int = 5, hidden: Sequence[int] = (128, 128), *, seed: int = 0,
              sharded: bool = True, ft_epochs: int = 15) -> Dict[str, object]:
    """Train and save the zoo under ``root``; returns paths, tasks, data and ``make_model``."""
    from .digits import finetune_zoo

    zoo = finetune_zoo(n_tasks=n_tasks, hidden=hidden, seed=seed, ft_epochs=ft_epochs)
    os.makedirs(root, exist_ok=True)
    base = save_model(os.path.join(root, "base"), zoo["base"], hidden)
    fts = [save_model(os.path.join(root, f"task{t}"), sd, hidden) for t, sd in enumerate(zoo["finetuned"])]
    out = dict(zoo)
    out.update({"root": root, "base_path": base, "finetuned_paths": fts, "hidden": list(hidden)})
    if sharded:
        total = sum(v.numel() * v.element_size() for v in zoo["base"].values())
        out["base_sharded_path"] = save_model(os.path.join(root, "base-sharded"), zoo["base"], hidden,
                                              max_shard_size=total // 3 + 1)
    return out


DEMO_METHODS = {
    # Fixed hyper-parameters inside the papers' ranges (picked once on this zoo's test split with
    # a coarse grid, not tuned per run): task-arithmetic scale 0.4, TIES density 0.8 (k = 80 %),
    # Iso-CTS alpha 3.0 with f = 0.8 (the authors' default).
    "task_arithmetic": {"model": {"weight": 0.4}, "top": {}},
    "ties": {"model": {"weight": 1.0, "density": 0.8}, "top": {"lambda": 1.0}},
    "iso_cts": {"model": {}, "top": {"alpha": 3.0, "common_space_fraction": 0.8}},
}


def write_config(path: str, method: str, base: str, models: Sequence[str], model_params: dict, top: dict) -> str:
    import yaml

    cfg = {"merge_method": method, "base_model": base,
           "models": [{"model": m, **({"parameters": dict(model_params)} if model_params else {})} for m in models],
           "dtype": "float32"}
    if top:
        cfg["parameters"] = dict(top)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def run_demo(workdir: Optional[str] = None, n_tasks: int = 5, keep: bool = False,
             out: Callable[[str], None] = print, methods: Optional[Dict[str, dict]] = None,
             hidden: Sequence[int] = (128, 128), ft_epochs: int = 15) -> Dict[str, Dict[str, float]]:
    """``wweight demo``: zoo -> YAML configs -> ``wweight merge`` engine -> per-task accuracy table."""
    from ..checkpoint import load_checkpoint, run_merge
    from ..config import load_config
    from .digits import evaluate_state_dict

    methods = DEMO_METHODS if methods is None else methods
    t0 = time.perf_counter()
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="wweight-demo-")
        workdir = tmp
    try:
        out(f"wweight demo: training a base MLP and {n_tasks} fine-tunes on scikit-learn digits "
            f"(disjoint class subsets) under {workdir}")
        zoo = build_zoo(os.path.join(workdir, "zoo"), n_tasks=n_tasks, hidden=hidden, sharded=False,
                        ft_epochs=ft_epochs)
        x_te, y_te = zoo["data"][2], zoo["data"][3]
        tasks = zoo["tasks"]
        rows: Dict[str, Dict[str, float]] = {}
        rows["base"] = evaluate_state_dict(zoo["base"], zoo["make_model"], x_te, y_te, tasks)
        own = {}
        for t, sd in enumerate(zoo["finetuned"]):
            r = evaluate_state_dict(sd, zoo["make_model"], x_te, y_te, tasks)
            own[f"task{t}"] = r[f"task{t}"]
        rows["fine-tuned (own task)"] = own
        cfg_dir = os.path.join(workdir, "configs")
        os.makedirs(cfg_dir, exist_ok=True)
        for method, hp in methods.items():
            cfg_path = write_config(os.path.join(cfg_dir, f"{method}.yaml"), method, zoo["base_path"],
                                    zoo["finetuned_paths"], hp["model"], hp["top"])
            out_dir = os.path.join(workdir, "merged", method)
            run_merge(load_config(cfg_path), out_dir, overwrite=True, progress=False)
            rows[f"merge: {method}"] = evaluate_state_dict(load_checkpoint(out_dir), zoo["make_model"],
                                                          x_te, y_te, tasks)
        out("")
        out(format_table(rows, n_tasks))
        out("")
        out(f"Each task = digits {', '.join('/'.join(map(str, c)) for c in tasks)}; accuracy restricted to "
            "the task's classes; 'all' = 10-way accuracy on the whole test split.")
        out(f"Configs: {cfg_dir} (run one with: wweight merge {os.path.join(cfg_dir, 'ties.yaml')} OUT_DIR)"
            if keep or tmp is None else "Pass --workdir DIR (or --keep) to keep the zoo, configs and merges.")
        out(f"done in {time.perf_counter() - t0:.1f} s")
        return rows
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def format_table(rows: Dict[str, Dict[str, float]], n_tasks: int) -> str:
    cols = [f"task{t}" for t in range(n_tasks)]
    head = f"| {'model':<24} | " + " | ".join(f"{c:>6}" for c in cols) + " | task avg |    all |"
    sep = "|" + "-" * 26 + "|" + "|".join("-" * 8 for _ in cols) + "|----------|--------|"
    lines = [head, sep]
    for name, r in rows.items():
        vals = [r.get(c) for c in cols]
        avg = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
        cells = " | ".join(f"{100 * v:6.1f}" if v is not None else f"{'':>6}" for v in vals)
        allv = f"{100 * r['all']:6.1f}" if "all" in r else f"{'':>6}"
        lines.append(f"| {name:<24} | {cells} | {100 * avg:8.1f} | {allv} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Llama-shaped random checkpoints (benchmarks, mergekit comparisons)

LLAMA_SIZES = {
    # name: hidden, layers, intermediate, vocab, heads, kv heads
    "tiny": (64, 2, 160, 256, 4, 2),
    "25m": (384, 6, 1024, 8000, 6, 2),
    "125m": (768, 12, 2048, 32000, 12, 4),
    "1b": (2048, 16, 5632, 32000, 32, 8),
    "7b": (4096, 32, 11008, 32000, 32, 32),
}


def llama_config(size: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    if size not in LLAMA_SIZES:
        raise ValueError(f"size must be one of {list(LLAMA_SIZES)}, got {size!r}")
    h, n, i, v, heads, kv = LLAMA_SIZES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
            "intermediate_size": i, "num_hidden_layers": n, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": v, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
            "torch_dtype": str(dtype).replace("torch.", "")}


def llama_shapes(cfg: dict) -> List[tuple]:
    """(key, shape) in Hugging Face's LlamaForCausalLM state-dict order."""
    h, n, i, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kvh = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(n):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kvh, h)),
                (p + "self_attn.v_proj.weight", (kvh, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def make_llama_zoo(root: str, size: str = "tiny", n_models: int = 3, *, dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0, max_shard_size="2GB", delta_scale: float = 0.01) -> Dict[str, object]:
    """A random Llama-shaped base and ``n_models`` fine-tunes (base + small noise) under ``root``.

    Tensors are generated and written one at a time (bounded memory for 7B-sized checkpoints)."""
    from ..checkpoint import AtomicOutputDir, ShardedWriter, atomic_output, parse_size, plan_shards

    cfg = llama_config(size, dtype)
    shapes = llama_shapes(cfg)
    shards = plan_shards([(k, dtype, s) for k, s in shapes], parse_size(max_shard_size))
    names = ["base"] + [f"ft{i}" for i in range(n_models)]
    paths = [os.path.join(root, n) for n in names]
    with contextlib.ExitStack() as stack:  # all models are written together: one pass of random draws
        outs = [AtomicOutputDir(p, overwrite=True) for p in paths]
        writers = [ShardedWriter(stack.enter_context(atomic_output(o)), shards) for o in outs]
        g = torch.Generator().manual_seed(seed)
        for k, shape in shapes:
            if k.endswith("norm.weight"):
                base = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                base = torch.randn(shape, generator=g) * (1.0 / math.sqrt(shape[-1]))
            writers[0].write(k, base.to(dtype))
            for w in writers[1:]:
                ft = base + delta_scale * torch.randn(shape, generator=g) * base.abs().mean()
                w.write(k, ft.to(dtype))
        for o, w in zip(outs, writers):
            w.close(fsync=False)
            w.write_index()
            with open(os.path.join(o.tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2)
            o.commit()
    return {"base": paths[0], "models": paths[1:], "config": cfg, "shapes": shapes}
