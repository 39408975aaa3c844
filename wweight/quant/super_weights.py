"""Super weights (Yu et al. 2024, "The Super Weight in Large Language Models", arXiv:2411.07191).

:func:`find_super_weights` detects them from one forward pass (the paper's activation-spike rule);
:func:`known_super_weights` returns the published coordinates shipped in
``wweight/data/super_weights.json``, ready for ``quantize_state_dict(super_weights=...)``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .. import _validate

def _layer_index(name: str, fallback: int) -> int:
    m = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m[0]) if m else fallback


@torch.no_grad()
def find_super_weights(model: torch.nn.Module, input_ids: torch.Tensor, threshold: float = 50.0, *,
                       module_pattern: str = r"mlp\.down_proj$", max_iters: int = 1,
                       forward_kwargs: Optional[dict] = None) -> List[dict]:
    """Super-weight detection of Yu et al. 2024 (Sec. 3.1): one forward pass, record every MLP
    down-projection's input and output activations; in a layer where the largest-|.| input
    channel and the largest-|.| output channel both exceed ``threshold``, the super weight is
    ``W[row = output channel, col = input channel]``.

    Args:
        model: any ``nn.Module``; the down-projections are the ``nn.Linear`` (or any module with
            a 2-D ``weight`` of shape (out, in)) whose qualified name matches ``module_pattern``
            (``re.search``; the default fits Llama / Mistral / OLMo / Phi-3 / Qwen MLPs;
            use e.g. ``r"ff_out$"`` for original OLMo, ``r"mlp\\.c_proj$"`` for GPT-2).
        input_ids: token ids passed as ``model(input_ids, **forward_kwargs)`` (one prompt).
        threshold: activation magnitude both spikes must exceed (the paper reads ~50 off its plots).
        max_iters: > 1 repeats the detection with the weights found so far zeroed (the paper's
            iterative search for further super weights); the model is restored afterwards.

    Returns:
        list of dicts ``{"layer", "module", "row", "col", "input_act", "output_act", "weight"}``
        ordered by layer (``layer`` is the first integer in the module name).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    threshold = _validate.number("threshold", threshold, lo=0.0, lo_open=True)
    pat = re.compile(module_pattern)
    mods = [(n, m) for n, m in model.named_modules()
            if pat.search(n) and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
    if not mods:
        raise ValueError(f"module_pattern {module_pattern!r} matches no module with a 2-D weight")
    found: List[dict] = []
    zeroed: List[Tuple[torch.Tensor, int, int, torch.Tensor]] = []
    try:
        for _ in range(max(1, int(max_iters))):
            rec: Dict[str, Tuple[float, int, float, int]] = {}

            def hook(name):
                def fn(mod, inp, out):
                    xi = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs()
                    yo = out.detach().reshape(-1, out.shape[-1]).abs()
                    ii = int(xi.argmax())
                    oi = int(yo.argmax())
                    rec[name] = (float(xi.reshape(-1)[ii]), ii % xi.shape[-1], float(yo.reshape(-1)[oi]), oi % yo.shape[-1])
                return fn

            handles = [m.register_forward_hook(hook(n)) for n, m in mods]
            try:
                model(input_ids, **(forward_kwargs or {}))
            finally:
                for h in handles:
                    h.remove()
            new = []
            for i, (n, m) in enumerate(mods):
                if n not in rec:
                    continue
                in_v, col, out_v, row = rec[n]
                if in_v > threshold and out_v > threshold:
                    key = (n, row, col)
                    if any((f["module"], f["row"], f["col"]) == key for f in found):
                        continue
                    new.append({"layer": _layer_index(n, i), "module": n, "row": row, "col": col,
                                "input_act": in_v, "output_act": out_v, "weight": float(m.weight[row, col])})
                    zeroed.append((m.weight, row, col, m.weight[row, col].clone()))
            if not new:
                break
            found.extend(new)
            if max_iters > 1:
                for wt, r, c, _ in zeroed:
                    wt[r, c] = 0
    finally:
        for wt, r, c, v in reversed(zeroed):
            wt[r, c] = v
    return sorted(found, key=lambda f: (f["layer"], f["row"], f["col"]))


def check_super_weights(super_weights: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> None:
    """Every named tensor exists in ``sd`` and every coordinate lies inside its shape.

    Published coordinates belong to one architecture (layer count, hidden and MLP sizes); on a
    model of another shape they would point at the wrong weights or out of bounds, so a mismatch
    is reported as such instead of as a bare index error deep in the quantizer."""
    hint = ("the super-weight coordinates are for another architecture (known_super_weights gives those "
            "of one published model; use find_super_weights on this one)")
    missing = [k for k in super_weights if k not in sd]
    if missing:
        raise ValueError(f"super_weights names not in the state dict: {missing[:5]}: {hint}")
    for k, c in super_weights.items():
        t = sd[k]
        c = torch.as_tensor(c)
        if c.dim() != 2 or c.shape[1] != t.dim():
            raise ValueError(f"super_weights[{k!r}] has shape {tuple(c.shape)}, expected (N, {t.dim()}) "
                             f"for a tensor of shape {tuple(t.shape)}: {hint}")
        lim = torch.tensor(tuple(t.shape), dtype=torch.int64)
        bad = ((c < 0) | (c >= lim)).any(dim=1)
        if bool(bad.any()):
            first = tuple(int(x) for x in c[bad][0])
            raise ValueError(f"super_weights[{k!r}]: coordinate {first} is out of range for the tensor's shape "
                             f"{tuple(t.shape)}: {hint}")


def known_super_weights(model_name: Optional[str] = None, *, verified_only: bool = False,
                        state_dict: Optional[Mapping[str, torch.Tensor]] = None):
    """Published super-weight coordinates shipped in ``wweight/data/super_weights.json``.

    With ``model_name`` (e.g. ``"huggyllama/llama-7b"``; case-insensitive, the part after the
    last '/' also matches) returns ``{state_dict_name: (N, 2) int64 tensor}`` ready for
    ``quantize_state_dict(super_weights=...)``; without it, the whole table as a dict.
    With ``state_dict``, the coordinates are checked against its tensors' shapes
    (:func:`check_super_weights`; ``quantize_state_dict`` does the same check), so coordinates
    of another architecture are refused saying so.
    """
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "super_weights.json")
    with open(path) as f:
        table = json.load(f)
    models = table["models"]
    if model_name is None:
        return models
    key = None
    for k in models:
        if k.lower() == model_name.lower() or k.split("/")[-1].lower() == model_name.split("/")[-1].lower():
            key = k
            break
    if key is None:
        raise ValueError(f"model_name {model_name!r} has no published super weights here; known: {sorted(models)}")
    entry = models[key]
    if verified_only and not entry.get("verified"):
        raise ValueError(f"{key}: its coordinates are not verified against the paper's table")
    out: Dict[str, List[List[int]]] = {}
    for layer, row, col in entry["coords"]:
        out.setdefault(table["_weight_name"].format(layer=layer), []).append([row, col])
    res = {k: torch.tensor(v, dtype=torch.int64) for k, v in out.items()}
    if state_dict is not None:
        try:
            check_super_weights(res, state_dict)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return res


