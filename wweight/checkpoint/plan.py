"""The merge plan: everything a merge needs, validated before any compute.

:func:`plan_merge` checks a :class:`wweight.config.MergeConfig` against the models (present, same
keys / shapes / dtypes / architecture, disk space), fixes every output tensor's dtype and place in
the output shards, and cuts the work into items bounded by the memory budget: one key for the
per-tensor methods, groups of keys for the iso methods (batched SVDs). :mod:`.pipeline` runs it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .. import methods as M
from ..config import MergeConfig
from .atomic import AtomicOutputDir
from .format import FLOATS, CheckpointError, human, itemsize, parse_size
from .reader import Checkpoint, check_compatible
from .writer import Shard, plan_shards

@dataclass
class WorkItem:
    keys: List[str]
    kind: str            # "merge" (one key, per-tensor method) | "group" (iso keys) | "copy" (non-float)
    in_bytes: int        # bytes read from all models
    out_bytes: int


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
    depth: int
    seed: int
    bytes_in: int
    bytes_out: int
    output: AtomicOutputDir           # validated at plan time (not empty, not an input); created at run time
    notes: List[str] = field(default_factory=list)

    @property
    def inputs(self) -> List[Checkpoint]:
        return ([self.base] if self.base is not None else []) + self.models

    def describe(self) -> str:
        c = self.config
        lines = [f"wweight merge plan ({c.source})",
                 f"  method        {c.method}",
                 f"  base_model    {self.base.path if self.base else '-'}"]
        for i, m in enumerate(self.models):
            params = ", ".join(f"{k}={v}" for k, v in c.models[i].parameters.items())
            lines.append(f"  model[{i}]      {m.path}" + (f"  ({params})" if params else ""))
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
            f"  memory        budget {human(self.memory_budget)}, prefetch depth {self.depth} "
            f"work item(s), largest item {human(max((i.in_bytes for i in self.items), default=0))} of inputs",
            f"  seed          {self.seed}",
        ]
        if c.is_iso:
            lines.append(f"  iso groups    {len(self.items)} (keys batched per merge_state_dicts call)")
        lines += [f"  note          {n}" for n in self.notes]
        return "\n".join(lines)


def plan_merge(config: MergeConfig, out_dir: str, *, device="cpu", memory_budget="4GB",
               max_shard_size="5GB", overwrite: bool = False, seed: int = 0,
               allow_symlinks: bool = False, check_space: bool = True) -> MergePlan:
    """Validate everything a merge needs, before any compute, and lay out the work and the output."""
    dev = torch.device(device)
    budget = parse_size(memory_budget, "memory_budget")
    shard_max = parse_size(max_shard_size, "max_shard_size")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # linear: the base (when given) is one of config.models, an ordinary input
    base = (Checkpoint(config.base_model.path, what="base_model", allow_symlinks=allow_symlinks)
            if config.base_model and M.get(config.method).needs_base else None)
    models = [Checkpoint(m.path, what=f"models[{i}] ({m.name})", allow_symlinks=allow_symlinks)
              for i, m in enumerate(config.models)]
    ref = base or models[0]
    ck_all = ([base] if base else []) + models
    # Same architecture, keys, shapes, dtypes everywhere; the first mismatch is the error.
    check_compatible(ref, ck_all)
    out = AtomicOutputDir(out_dir, overwrite=overwrite, inputs=[ck.path for ck in ck_all])

    keys = list(ref.keys)
    required = [p for p in M.get(config.method).params if p.required and p.scope == M.PER_MODEL]
    compute: Dict[str, torch.dtype] = {}
    outdt: Dict[str, torch.dtype] = {}
    items: List[WorkItem] = []
    n_in = len(ck_all)
    iso_keys: List[str] = []
    for k in keys:
        info = ref.tensors[k]
        if info.dtype not in FLOATS:
            compute[k] = outdt[k] = info.dtype
            items.append(WorkItem([k], "copy", info.nbytes * n_in, info.nbytes))
            continue
        cd = config.dtype or info.dtype
        od = config.out_dtype or cd
        compute[k], outdt[k] = cd, od
        ob = info.numel * itemsize(od)
        if config.is_iso:
            iso_keys.append(k)
        else:
            for p in required:  # before any compute: every tensor gets its required parameters
                for e in config.models:
                    per_model_value(config, p, k, e)
            items.append(WorkItem([k], "merge", info.nbytes * n_in, ob))
    if iso_keys:
        # Groups of keys for one merge_state_dicts call (batched SVDs), bounded by the budget:
        # inputs in compute dtype plus the SVD workspace (about 3x one model's group in fp32).
        budget_group = max(1, budget // 2)
        cur: List[str] = []
        cur_b = 0
        for k in iso_keys:
            info = ref.tensors[k]
            kb = info.numel * (itemsize(compute[k]) * n_in + 12)
            if cur and cur_b + kb > budget_group:
                items.append(_group_item(cur, ref, n_in, outdt))
                cur, cur_b = [], 0
            cur.append(k)
            cur_b += kb
        if cur:
            items.append(_group_item(cur, ref, n_in, outdt))
        # Keep key order: copies / groups interleave in the reference's file order.
        pos = {k: i for i, k in enumerate(keys)}
        items.sort(key=lambda it: pos[it.keys[0]])
    shards = plan_shards([(k, outdt[k], ref.tensors[k].shape) for k in keys], shard_max)
    bytes_out = sum(s.size for s in shards)
    if check_space:
        out.check_space(bytes_out)
    largest = max((i.in_bytes for i in items), default=1) or 1
    depth = max(1, min(8, budget // (2 * largest)))
    notes = []
    if largest > budget:
        notes.append(f"the largest work item ({human(largest)} of inputs) exceeds the memory budget; "
                     "it is processed alone")
    return MergePlan(config=config, out_dir=os.path.abspath(out_dir), device=dev, base=base, models=models,
                     keys=keys, compute_dtype=compute, out_dtype=outdt, shards=shards, items=items,
                     memory_budget=budget, depth=depth, seed=seed,
                     bytes_in=sum(ck.nbytes for ck in ck_all), bytes_out=bytes_out, output=out, notes=notes)


def per_model_value(cfg: MergeConfig, p: M.Param, key: str, model) -> Any:
    """Parameter ``p`` of ``model`` for tensor ``key``; a required one (mergekit's ``weight``) has no
    default: a ``{filter, value}`` list that gives no value for this tensor is an error, as in mergekit."""
    v = cfg.resolve(p.name, key, model, None if p.required else p.default)
    if v is None:
        raise CheckpointError(f"{cfg.source}: {model.name}: parameters.{p.name} gives no value for tensor {key!r} "
                              f"(no filter matches it; merge_method {cfg.method!r} has no default {p.name})")
    return v


def _group_item(keys, ref, n_in, outdt) -> WorkItem:
    inb = sum(ref.tensors[k].nbytes for k in keys) * n_in
    ob = sum(ref.tensors[k].numel * itemsize(outdt[k]) for k in keys)
    return WorkItem(list(keys), "group", inb, ob)
