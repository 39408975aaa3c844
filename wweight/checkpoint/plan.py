"""The merge plan: everything a merge needs, validated before any compute.

:func:`plan_merge` checks a :class:`wweight.config.MergeConfig` against the models (present, same
keys / shapes / dtypes / architecture, disk space), fixes every output tensor's dtype and place in
the output shards, and cuts the work into items bounded by the memory budget: one key for the
per-tensor methods, groups of same-shape keys for the iso methods (batched SVDs). :mod:`.pipeline` runs it.

Every item carries ``cost``, an upper bound of the host bytes it allocates from the moment its reads
start until its output is written (:func:`wweight.checkpoint.costs.item_cost`: the read buffers, the
compute-dtype copies, the merge's temporaries, the output and its dtype cast). The pipeline keeps the
sum of the costs of the items in flight (prefetched, computing, queued for writing) within the
budget, one item at least, so the bound on host memory above the start of the merge is
``max(budget, largest cost)`` (:attr:`MergePlan.bound`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import methods as M
from ..config import MergeConfig
from .atomic import AtomicOutputDir
from .costs import item_cost
from .format import FLOATS, CheckpointError, human, itemsize, parse_size
from .lora import open_model
from .reader import Checkpoint, check_compatible
from .slices import LAYER_COUNT_KEYS, KeySource, layer_positions, plan_slices
from .writer import Shard, plan_shards



@dataclass
class WorkItem:
    keys: List[str]
    kind: str            # "merge" (one key, per-tensor method) | "group" (iso keys) | "copy" (non-float)
    in_bytes: int        # bytes read from all models
    out_bytes: int
    cost: int = 0        # upper bound of the host bytes the item holds at its peak (item_cost)


@dataclass
class MergePlan:
    config: MergeConfig
    out_dir: str
    device: torch.device
    base: Optional[Checkpoint]
    models: List[Checkpoint]
    keys: List[str]
    compute_dtype: Dict[str, torch.dtype]
    out_dtype: Dict[str, torch.dtype]
    shards: List[Shard]
    items: List[WorkItem]
    memory_budget: int
    seed: int
    bytes_in: int
    bytes_out: int
    output: AtomicOutputDir           # validated at plan time (not empty, not an input); created at run time
    notes: List[str] = field(default_factory=list)
    #: output key -> KeySource (its layer position t; for slices its inputs); keys outside the layers of a
    #: ``models:`` merge are absent (t = 0, every input, same key)
    sources: Dict[str, KeySource] = field(default_factory=dict)
    extra_config: Dict[str, Any] = field(default_factory=dict)   # config.json updates (slices: layer count)

    def source(self, key: str) -> KeySource:
        return self.sources.get(key) or _MODELS_FORM

    def key_inputs(self, key: str) -> List[Tuple[Checkpoint, str]]:
        """(checkpoint, tensor name) of each input of output tensor ``key``, the base first."""
        src = self.source(key)
        if src.inputs is None:
            return [(ck, key) for ck in self.inputs]
        return [(self.inputs[i], k) for i, k in src.inputs]

    def has_base(self, key: str) -> bool:
        src = self.source(key)
        return src.has_base if src.inputs is not None else self.base is not None

    @property
    def largest(self) -> int:
        """The largest work item's cost (bytes)."""
        return max((i.cost for i in self.items), default=0)

    @property
    def bound(self) -> int:
        """Host bytes above the start of the merge that the pipeline holds the tensors in flight to:
        the budget, or the largest item when that alone exceeds it (it then runs alone)."""
        return max(self.memory_budget, self.largest)

    def memory_line(self) -> str:
        """What --dry-run and the summary say about the memory bound."""
        b, big = self.memory_budget, self.largest
        if big > b:
            return (f"budget {human(b)} is below the largest work item ({human(big)}); running one item at a "
                    f"time, bound {human(big)}")
        return f"budget {human(b)}, largest work item {human(big)}; bound {human(b)}"

    @property
    def inputs(self) -> List[Checkpoint]:
        return ([self.base] if self.base is not None else []) + self.models

    def describe(self) -> str:
        c = self.config
        base = self.base.path if self.base else c.base_model.path if c.slices and c.base_model else "-"
        lines = [f"wweight merge plan ({c.source})",
                 f"  method        {c.method}",
                 f"  base_model    {base}"]
        for i, m in enumerate(self.models):
            params = ", ".join(f"{k}={v}" for k, v in c.models[i].parameters.items())
            lines.append(f"  model[{i}]      {_label(m)}" + (f"  ({params})" if params else ""))
        for i, sl in enumerate(c.slices or []):
            srcs = " + ".join(f"{x.model.name} {list(x.layer_range)}" for x in sl.sources)
            via = f"  (base {sl.base_model.name})" if sl.has_base(c.method) else ""
            lines.append(f"  slices[{i}]     {srcs}{via}")
        if c.parameters:
            lines.append("  parameters    " + ", ".join(f"{k}={v}" for k, v in c.parameters.items()))
        dts = sorted({str(d).replace('torch.', '') for d in self.compute_dtype.values()})
        odts = sorted({str(d).replace('torch.', '') for d in self.out_dtype.values()})
        lines += [
            f"  tensors       {len(self.keys)} ({sum(1 for i in self.items if i.kind == 'copy')} copied unmerged)",
            f"  compute dtype {', '.join(dts)}; output dtype {', '.join(odts)}",
            f"  read          {human(self.bytes_in)} from {len(self.inputs)} models",
            f"  write         {human(self.bytes_out)} in {len(self.shards)} shard(s) to {self.out_dir}",
            f"  device        {self.device}",
            f"  memory        {self.memory_line()}",
            "                (host memory above the start: reads, compute copies, temporaries and outputs of the "
            "work items in flight)",
            f"  seed          {self.seed}",
        ]
        if c.is_iso:
            lines.append(f"  iso groups    {len(self.items)} (keys batched per merge_state_dicts call)")
        lines += [f"  note          {n}" for n in self.notes]
        return "\n".join(lines)


def plan_merge(config: MergeConfig, out_dir: str, *, device="cpu", memory_budget="4GB",
               max_shard_size="5GB", overwrite: bool = False, seed: int = 0,
               allow_symlinks: bool = False, check_space: bool = True, backend: Optional[str] = None) -> MergePlan:
    """Validate everything a merge needs, before any compute, and lay out the work and the output."""
    dev = torch.device(device)
    budget = parse_size(memory_budget, "memory_budget")
    shard_max = parse_size(max_shard_size, "max_shard_size")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # linear: the base (when given) is one of config.models, an ordinary input
    base = (open_model(config.base_model, what="base_model", allow_symlinks=allow_symlinks)
            if config.base_model and M.get(config.method).needs_base else None)
    models = [open_model(m, what=f"models[{i}] ({m.name})", allow_symlinks=allow_symlinks)
              for i, m in enumerate(config.models)]
    if config.slices and base is not None:   # slices: the base is one of config.models, a source
        base.close()
        base = None
    ref = base or models[0]
    ck_all = ([base] if base else []) + models
    extra_config: Dict[str, Any] = {}
    if config.slices:
        keys, sources, infos, n_layers = plan_slices(config, models)
        for ck in models:   # per output tensor, its inputs' shapes and dtypes were checked by plan_slices
            if ref.architecture and ck.architecture and ref.architecture != ck.architecture:
                raise CheckpointError(f"mismatched architectures: {ref.what} is {ref.architecture}, "
                                      f"{ck.what} is {ck.architecture}")
        cfg_json = ref.config or {}
        extra_config[next((k for k in LAYER_COUNT_KEYS if k in cfg_json), LAYER_COUNT_KEYS[0])] = n_layers
    else:
        # Same architecture, keys, shapes, dtypes everywhere; the first mismatch is the error.
        check_compatible(ref, ck_all)
        keys, infos = list(ref.keys), ref.tensors
        sources = {k: KeySource(t) for k, t in layer_positions(keys).items()}
    out = AtomicOutputDir(out_dir, overwrite=overwrite,   # a LoRA adapter's directory is an input too
                          inputs=[p for ck in ck_all for p in getattr(ck, "input_paths", [ck.path])])

    required = [p for p in M.get(config.method).params if p.required and p.scope == M.PER_MODEL]
    compute: Dict[str, torch.dtype] = {}
    outdt: Dict[str, torch.dtype] = {}
    items: List[WorkItem] = []
    iso_keys: List[str] = []
    be = None if backend in (None, "auto") else backend

    def n_in(k):
        src = sources.get(k)
        return len(src.inputs) if src is not None and src.inputs is not None else len(ck_all)

    def lora_bytes(k):
        """A LoRA input's temporaries for output key ``k`` (its B @ A; wweight/checkpoint/lora.py)."""
        src = sources.get(k)
        pairs = ([(ck_all[i], ik) for i, ik in src.inputs] if src is not None and src.inputs is not None
                 else [(ck, k) for ck in ck_all])
        return sum(ck.delta_bytes(ik) for ck, ik in pairs if hasattr(ck, "delta_bytes"))

    def cost(kind, ks):
        t = infos[ks[0]]
        lora = sum(lora_bytes(k) for k in ks)
        return lora + item_cost(config.method, kind, [tuple(infos[k].shape) for k in ks], t.dtype,
                                compute[ks[0]], outdt[ks[0]], n_in(ks[0]), backend=be, device=dev.type)

    for k in keys:
        info = infos[k]
        if info.dtype not in FLOATS:
            compute[k] = outdt[k] = info.dtype
            items.append(WorkItem([k], "copy", info.nbytes * n_in(k), info.nbytes, cost("copy", [k])))
            continue
        cd = config.dtype or info.dtype
        od = config.out_dtype or cd
        compute[k], outdt[k] = cd, od
        ob = info.numel * itemsize(od)
        if config.is_iso:
            iso_keys.append(k)
        else:
            src = sources.get(k) or _MODELS_FORM
            for p in required:  # before any compute: every tensor gets its required parameters
                for e, in_key in merged_inputs(config, src, k):
                    per_model_value(config, p, in_key, e, src)
            items.append(WorkItem([k], "merge", info.nbytes * n_in(k), ob, cost("merge", [k])))
    if iso_keys:
        # Groups of same-shape 2-D keys (one batched merge_state_dicts call each; non-2-D keys form
        # groups of their own) at the same layer position and of the same slice, as many keys as
        # keep the group's cost within the budget, one at least.
        by_shape: Dict[Any, List[str]] = {}
        graded = any(_is_gradient(v) for ps in [config.parameters] + [sl.parameters for sl in config.slices or []]
                     for v in ps.values())
        for k in iso_keys:
            shp = tuple(infos[k].shape)
            src = sources.get(k) or _MODELS_FORM
            # t only matters where a setting is a gradient: otherwise keys of every layer batch together
            where = (src.t if graded else None, id(src.slice), n_in(k))
            by_shape.setdefault((shp if len(shp) == 2 else "other", compute[k], outdt[k]) + where, []).append(k)
        for ks in by_shape.values():
            cur: List[str] = []
            for k in ks:
                if cur and cost("group", cur + [k]) > budget:
                    items.append(_group_item(cur, infos, n_in(cur[0]), outdt, cost("group", cur)))
                    cur = []
                cur.append(k)
            if cur:
                items.append(_group_item(cur, infos, n_in(cur[0]), outdt, cost("group", cur)))
        # Keep key order: copies / groups interleave in the reference's file order.
        pos = {k: i for i, k in enumerate(keys)}
        items.sort(key=lambda it: pos[it.keys[0]])
    shards = plan_shards([(k, outdt[k], infos[k].shape) for k in keys], shard_max)
    bytes_out = sum(s.size for s in shards)
    if check_space:
        out.check_space(bytes_out)
    notes: List[str] = []   # the memory bound is in describe()'s memory line
    return MergePlan(config=config, out_dir=os.path.abspath(out_dir), device=dev, base=base, models=models,
                     keys=keys, compute_dtype=compute, out_dtype=outdt, shards=shards, items=items,
                     memory_budget=budget, seed=seed,
                     bytes_in=sum(ck.nbytes for ck in ck_all), bytes_out=bytes_out, output=out, notes=notes,
                     sources=sources, extra_config=extra_config)


_MODELS_FORM = KeySource()


def _is_gradient(setting) -> bool:
    """A validated setting that varies with the layer position: a list of 2+ scalars, or filters
    with one as a value."""
    if isinstance(setting, list):
        if setting and all(isinstance(c, dict) for c in setting):
            return any(_is_gradient(c["value"]) for c in setting)
        return len(setting) > 1
    return False


def merged_inputs(cfg: MergeConfig, src: KeySource, key: str):
    """(ModelEntry, its tensor's name) of each merged (non-base) input of output tensor ``key``:
    the entries whose per-model parameters apply, and the names their filters are matched against
    (mergekit matches a per-model parameter's filter against that model's input tensor name)."""
    if src.inputs is None:
        return [(e, key) for e in cfg.models]
    names = [k for _, k in src.inputs[1 if src.has_base else 0:]]
    return list(zip(src.entries, names))


def per_model_value(cfg: MergeConfig, p: M.Param, key: str, model, src: KeySource = _MODELS_FORM) -> Any:
    """Parameter ``p`` of ``model`` for tensor ``key`` at ``src``'s layer position (and slice); a
    required one (mergekit's ``weight``) has no default: a ``{filter, value}`` list that gives no
    value for this tensor is an error, as in mergekit."""
    v = cfg.resolve(p.name, key, model, None if p.required else p.default, t=src.t, slice=src.slice)
    if v is None:
        raise CheckpointError(f"{cfg.source}: {model.name}: parameters.{p.name} gives no value for tensor {key!r} "
                              f"(no filter matches it; merge_method {cfg.method!r} has no default {p.name})")
    return v


def _label(ck) -> str:
    """A model's directory in the plan, with its LoRA adapter (wweight/checkpoint/lora.py) if any."""
    return ck.path + (f" + LoRA {ck.adapter}" if getattr(ck, "adapter", None) else "")


def _group_item(keys, infos, n_in, outdt, cost) -> WorkItem:
    inb = sum(infos[k].nbytes for k in keys) * n_in
    ob = sum(infos[k].numel * itemsize(outdt[k]) for k in keys)
    return WorkItem(list(keys), "group", inb, ob, cost)
