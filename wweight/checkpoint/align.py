"""``wweight align``: Git Re-Basin weight matching of MODEL_B onto MODEL_A, written as a checkpoint.

:func:`build_spec` picks the :class:`wweight.PermutationSpec` of a checkpoint (from its
``config.json`` or by name); :func:`run_align` loads both models, matches, permutes MODEL_B and
writes it (same layout, config and tokenizer) plus ``permutations.safetensors``.
"""
from __future__ import annotations

import importlib
import os
import time
from typing import Any, Dict

import torch

from .. import permute as P  # looked up at call time (as wweight.merge is by the pipeline)
from ..permute.specs import ARCHITECTURES
from .atomic import AtomicOutputDir
from .format import DRY_RUN_NOTE, CheckpointError, human
from .reader import Checkpoint, check_compatible
from .writer import save_checkpoint


def build_spec(name: str, ck: "Checkpoint"):
    """A :class:`wweight.PermutationSpec` for the checkpoint: ``auto`` (from config.json's
    ``architectures``), ``mlp`` / ``gpt2`` / ``llama`` (or a Hugging Face class name), or
    ``package.module:function`` called as ``function(config_dict, {key: shape})``.

    ``auto`` maps the architecture through :data:`wweight.permute.specs.ARCHITECTURES` and refuses
    anything else: config.json comes with a downloaded model, and a ``module:function`` there
    would make ``align auto`` import and run code the model's author chose. Only ``name`` itself
    (typed by the user) may be a ``module:function`` spec."""
    cfg = ck.config or {}
    shapes = {k: ck.tensors[k].shape for k in ck.keys}
    arch = name
    if name == "auto":
        arch = ck.architecture
        if arch is None:
            raise CheckpointError(f"{ck.path}: config.json has no 'architectures'; name the spec "
                                  "(mlp, gpt2, llama or module:function)")
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{ck.path}: config.json architecture {arch[:200]!r} has no built-in "
                                  f"permutation spec (auto knows: {', '.join(ARCHITECTURES)}); name the spec "
                                  "on the command line (mlp, gpt2, llama or module:function); "
                                  "auto never imports code named by a model file")
        arch = ARCHITECTURES[arch]
    elif ":" in arch:
        mod, _, fn = arch.partition(":")
        try:
            spec = getattr(importlib.import_module(mod), fn)(cfg, shapes)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"spec {arch!r}: cannot load ({e})") from None
        return spec
    low = arch.lower()
    family = ARCHITECTURES.get(arch, low)
    if family == "mlp":
        layers = [k[: -len(".weight")] for k in ck.keys if k.endswith(".weight") and len(shapes[k]) == 2]
        if not layers:
            raise CheckpointError(f"{ck.path}: no 2-D '*.weight' tensors for an MLP spec")
        return P.mlp_spec(layers, bias=all(f"{l}.bias" in shapes for l in layers))
    if family == "gpt2":
        try:
            n_layer, n_head, d = int(cfg["n_layer"]), int(cfg["n_head"]), int(cfg["n_embd"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{ck.path}: config.json lacks n_layer / n_head / n_embd for a GPT-2 spec") from None
        prefix = "transformer." if any(k.startswith("transformer.") for k in shapes) else ""
        return P.gpt2_spec(n_layer, n_head, d // n_head, prefix=prefix,
                           lm_head="lm_head.weight" if "lm_head.weight" in shapes else None)
    if family in ("llama", "mistral", "qwen2"):
        try:
            n_layer, n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
            n_kv = int(cfg.get("num_key_value_heads") or n_head)
            hd = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // n_head)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{ck.path}: config.json lacks num_hidden_layers / num_attention_heads / "
                                  "hidden_size for a Llama spec") from None
        return P.llama_spec(n_layer, n_head, n_kv, hd,
                            lm_head="lm_head.weight" if "lm_head.weight" in shapes else None,
                            attention_bias="model.layers.0.self_attn.q_proj.bias" in shapes,
                            mlp_bias="model.layers.0.mlp.gate_proj.bias" in shapes)
    raise CheckpointError(f"no permutation spec for architecture {arch!r} (known: mlp, gpt2, llama, "
                          f"{', '.join(ARCHITECTURES)}; or pass module:function)")


def run_align(spec: str, model_a: str, model_b: str, out_dir: str, *, max_iter: int = 100, seed: int = 0,
              device="cpu", overwrite: bool = False, dry_run: bool = False, max_shard_size="5GB",
              allow_symlinks: bool = False, fsync: bool = True) -> Dict[str, Any]:
    """Weight matching of ``model_b`` onto ``model_a`` (``wweight.weight_matching``); writes the permuted
    ``model_b`` (same layout, config and tokenizer as ``model_b``) and ``permutations.safetensors``.

    Weight matching needs every weight of both models at once, so both are loaded whole (on
    ``device``): memory is two models, not a bounded stream."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    a = Checkpoint(model_a, what="MODEL_A", allow_symlinks=allow_symlinks)
    b = Checkpoint(model_b, what="MODEL_B", allow_symlinks=allow_symlinks)
    check_compatible(a, [b], dtypes=False)
    out = AtomicOutputDir(out_dir, overwrite=overwrite, inputs=[a.path, b.path])
    sp = build_spec(spec, a)
    missing = [k for k in sp.axes_to_perm if k not in a.tensors]
    if missing:
        raise CheckpointError(f"spec {spec!r} names tensor {missing[0]!r}, which MODEL_A does not have")
    out.check_space(b.nbytes)
    dev = torch.device(device)
    msg = (f"align plan: {len(sp.perm_names)} permutations over {len(sp.axes_to_perm)} tensors "
           f"({spec} spec), MODEL_B {b.path} onto MODEL_A {a.path}, {human(a.nbytes + b.nbytes)} in memory on {dev}")
    if dry_run:
        return {"message": f"{msg}\n{DRY_RUN_NOTE}"}
    t0 = time.perf_counter()
    pa = {k: a.read(k).to(dev) for k in a.keys}
    pb = {k: b.read(k).to(dev) for k in b.keys}
    perms = P.weight_matching(sp, pa, pb, max_iter=max_iter, seed=seed)
    pb2 = P.apply_permutation(sp, perms, pb)
    del pa
    sd = {k: pb2[k] for k in b.keys}
    save_checkpoint(out_dir, sd, side_files_from=b.path, max_shard_size=max_shard_size, overwrite=overwrite,
                    inputs=[a.path, b.path], fsync=fsync, allow_symlinks=allow_symlinks,
                    extra_files={"permutations.safetensors": {k: v.cpu().contiguous() for k, v in perms.items()}})
    return {"message": f"wweight: aligned MODEL_B onto MODEL_A ({len(perms)} permutations) in "
                       f"{time.perf_counter() - t0:.2f} s -> {os.path.abspath(out_dir)}",
            "perms": perms}
