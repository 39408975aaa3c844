"""Which input tensors make each output tensor, and at which layer position ``t``.

mergekit 0.1.5 (``mergekit/plan.py``) plans a merge per layer: the ``i``-th layer of a slice of
``n`` layers is merged at ``t = i / (n - 1)`` (``t = 1`` when ``n == 1``), and the tensors outside
the layers - embeddings ("pre" weights), final norm and lm_head ("post") - at ``t = 0``. A
``models:`` config is one slice over every layer of the models. With ``slices:`` the output's
layers are the slices' layers in order, renumbered from 0; the pre weights come from the first
slice's sources (its parameters), the post weights from the last slice's.

The layer index is read from the Hugging Face key names: the first ``<stack>.<N>.`` component,
``<stack>`` one of ``layers`` (Llama, Mistral, Qwen, GPT-NeoX), ``h`` (GPT-2, Falcon, BLOOM),
``blocks`` / ``block`` / ``layer``; a layer count is the largest index + 1 in a model's keys.
Which non-layer keys are "pre": the embeddings (a name containing ``embed``, or a ``wte`` / ``wpe``
component), as in mergekit's architecture files; every other non-layer key is "post".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import ConfigError, MergeConfig
from ..config_slices import merged_sources
from .format import CheckpointError

_LAYER = re.compile(r"^((?:[^.]+\.)*?(?:layers|h|blocks|block|layer)\.)(\d+)\.(.+)$")
#: config.json keys holding the layer count, the first present is updated in a slices output
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class KeySource:
    """Where one output tensor comes from. ``inputs``: (index into ``MergePlan.inputs``, key in that
    model), the base first when ``has_base``; None: every input, same key (a ``models:`` merge).
    ``entries``: the ModelEntry of each merged (non-base) input, whose ``parameters`` apply
    (None: ``config.models``). ``slice``: the SliceDef whose parameters apply."""
    t: float = 0.0
    inputs: Optional[List[Tuple[int, str]]] = None
    entries: Optional[List[Any]] = None
    has_base: bool = False
    slice: Any = None


def split_layer_key(key: str) -> Optional[Tuple[str, int, str]]:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``("model.layers.", 3, "mlp.up_proj.weight")``;
    None for a key outside the layers."""
    m = _LAYER.match(key)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def layer_t(index: int, num_layers: int) -> float:
    """mergekit's gradient position of layer ``index`` of a slice of ``num_layers`` layers."""
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def is_pre(key: str) -> bool:
    parts = key.split(".")
    return "embed" in key or "wte" in parts or "wpe" in parts


def layer_positions(keys: Sequence[str]) -> Dict[str, float]:
    """``t`` of every layer key of a ``models:`` merge (keys outside the layers: 0, not listed)."""
    split = {k: split_layer_key(k) for k in keys}
    count: Dict[str, int] = {}
    for s in split.values():
        if s is not None:
            count[s[0]] = max(count.get(s[0], 0), s[1] + 1)
    return {k: layer_t(s[1], count[s[0]]) for k, s in split.items() if s is not None}


def _stack(ck) -> Tuple[str, Dict[int, List[str]], List[str]]:
    """(layer prefix, {layer index: the rest of its keys, in file order}, non-layer keys) of a model."""
    layers: Dict[int, List[str]] = {}
    prefixes, other = [], []
    for k in ck.keys:
        s = split_layer_key(k)
        if s is None:
            other.append(k)
            continue
        if s[0] not in prefixes:
            prefixes.append(s[0])
        layers.setdefault(s[1], []).append(s[2])
    if len(prefixes) != 1:
        what = "no layer keys" if not prefixes else f"{len(prefixes)} layer stacks ({', '.join(prefixes)})"
        raise CheckpointError(f"{ck.what}: slices need a model with one stack of layers (keys "
                              f"'model.layers.N.' or similar); it has {what}")
    return prefixes[0], layers, other


def plan_slices(cfg: MergeConfig, cks: List[Any]):
    """Output keys (pre, layers, post), each one's :class:`KeySource`, its tensor info (of its first
    input) and the output's layer count, for a ``slices:`` config; ``cks[i]`` is ``cfg.models[i]``'s
    checkpoint. Ranges beyond a model's layers are a ConfigError naming the field; a tensor missing
    from a source or of another shape / dtype a CheckpointError naming both models."""
    index = {e.ref: i for i, e in enumerate(cfg.models)}
    stacks = {}
    for e, ck in zip(cfg.models, cks):
        if any(x.model.ref == e.ref for s in cfg.slices for x in s.sources):
            stacks[e.ref] = _stack(ck)
    prefix = {p for p, _, _ in stacks.values()}
    if len(prefix) != 1:
        raise CheckpointError(f"slices: the models' layers have different key names ({', '.join(sorted(prefix))})")
    prefix = prefix.pop()
    for i, s in enumerate(cfg.slices):
        for j, x in enumerate(s.sources):
            n = max(stacks[x.model.ref][1]) + 1
            if x.layer_range[1] > n:
                raise ConfigError(f"{cfg.source}: slices[{i}].sources[{j}].layer_range {list(x.layer_range)} is "
                                  f"out of range: {x.model.name} has {n} layers (0 .. {n - 1})")
    keys: List[str] = []
    sources: Dict[str, KeySource] = {}
    infos: Dict[str, Any] = {}

    def add(out_key, sl, srcs, in_keys, t):
        base, merged = merged_sources(sl, cfg.method)
        order = ([base] if base is not None else []) + merged
        pos = {id(x): k for k, x in enumerate(srcs)}
        order = [x for x in order if id(x) in pos]
        ins = []
        for x in order:
            ck = cks[index[x.model.ref]]
            k = in_keys[pos[id(x)]]
            if k not in ck.tensors:
                raise CheckpointError(f"{ck.what}: missing tensor {k!r} (needed for output tensor {out_key!r})")
            ins.append((index[x.model.ref], k))
        first = cks[ins[0][0]].tensors[ins[0][1]]
        for i, k in ins[1:]:
            o = cks[i].tensors[k]
            if tuple(o.shape) != tuple(first.shape) or o.dtype != first.dtype:
                raise CheckpointError(f"{cks[i].what}: tensor {k!r} is {list(o.shape)} {o.dtype}, "
                                      f"{cks[ins[0][0]].what}'s {ins[0][1]!r} is {list(first.shape)} {first.dtype}")
        has_base = base is not None and bool(order) and order[0] is base
        keys.append(out_key)
        sources[out_key] = KeySource(t, ins, [x.model for x in order[1 if has_base else 0:]], has_base, sl)
        infos[out_key] = first

    first, last = cfg.slices[0], cfg.slices[-1]
    for k in stacks[first.sources[0].model.ref][2]:
        if is_pre(k):
            add(k, first, first.sources, [k] * len(first.sources), 0.0)
    n_out = 0
    for sl in cfg.slices:
        x0 = sl.sources[0]
        for off in range(sl.num_layers):
            t = layer_t(off, sl.num_layers)
            for rest in stacks[x0.model.ref][1].get(x0.layer_range[0] + off, []):
                add(f"{prefix}{n_out}.{rest}", sl, sl.sources,
                    [f"{prefix}{x.layer_range[0] + off}.{rest}" for x in sl.sources], t)
            n_out += 1
    for k in stacks[last.sources[0].model.ref][2]:
        if not is_pre(k):
            # mergekit zips the last slice's sources with len(first slice's sources) weights: truncated
            srcs = last.sources[:len(first.sources)]
            add(k, last, srcs, [k] * len(srcs), 0.0)
    return keys, sources, infos, n_out
