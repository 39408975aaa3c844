"""Permutations applied to state dicts: resolved axis indices, validation of perms, random perms.

``perm[new_position] = old_position`` on every spec'd axis (``w.index_select(axis, perm)``); nested
levels descend block by block (see :mod:`wweight.permute`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import torch

from .grammar import PermutationSpec

def _descend(start: torch.Tensor, levels, sizes: List[int], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Old flat indices of the new positions below ``start`` (old flat indices of a level's blocks).

    For each level: ``idx = idx * s + P[idx]`` (P[0] for a level-0 perm, arange for None).
    """
    idx = start
    for name_, s in zip(levels, sizes):
        if name_ is None:
            local = torch.arange(s, device=idx.device).expand(idx.numel(), s)
        else:
            P = perms[name_]
            local = P.view(1, s).expand(idx.numel(), s) if P.dim() == 1 else P.index_select(0, idx)
        idx = (idx.unsqueeze(1) * s + local).reshape(-1)
    return idx


class _Ctx:
    """Spec + resolved sizes for one params layout."""

    def __init__(self, spec: PermutationSpec, params: Mapping[str, torch.Tensor], name: str):
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"spec must be a wweight.permute.PermutationSpec (e.g. mlp_spec([...])), "
                            f"got {type(spec).__name__}")
        self.spec = spec
        self.shapes = spec.perm_shapes(params, name)
        for k in spec.axes_to_perm:
            if params[k].device.type == "meta":
                raise ValueError(f"{name}[{k!r}] is a meta tensor (no values): permutations need real weights")
        self.size = {p: s[-1] for p, s in self.shapes.items()}
        self.axis_len = {k: tuple(params[k].shape) for k in spec.axes_to_perm}

    def seg_sizes(self, key: str, ax: int, si: int) -> List[int]:
        segs = self.spec._parsed[key][ax]
        seg = segs[si]
        return self.spec._level_sizes(seg, self.size, key, ax, self.axis_len[key][ax] if len(segs) == 1 else None)

    def seg_offset(self, key: str, ax: int, si: int) -> int:
        return sum(math.prod(self.seg_sizes(key, ax, j)) for j in range(si))

    def axis_index(self, key: str, ax: int, perms, device) -> torch.Tensor:
        segs = self.spec._parsed[key][ax]
        parts, off = [], 0
        for si, seg in enumerate(segs):
            sz = self.seg_sizes(key, ax, si)
            root = torch.zeros(1, dtype=torch.long, device=device)
            parts.append(_descend(root, seg.levels, sz, perms) + off)
            off += math.prod(sz)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _check_perms(ctx: _Ctx, perms, name: str, device, *, require_all: bool = True) -> Dict[str, torch.Tensor]:
    if not isinstance(perms, Mapping):
        raise TypeError(f"{name} must be a mapping perm name -> LongTensor, got {type(perms).__name__}")
    out = {}
    for p, shp in ctx.shapes.items():
        if p not in perms:
            if require_all:
                raise ValueError(f"{name} has no permutation {p!r}")
            continue
        t = perms[p]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{p!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name}[{p!r}] must be an integer tensor, got {t.dtype}")
        if tuple(t.shape) != shp:
            raise ValueError(f"{name}[{p!r}] has shape {tuple(t.shape)}, expected {shp}")
        if t.device.type == "meta":
            raise ValueError(f"{name}[{p!r}] is a meta tensor (no values)")
        t = t.to(device=device, dtype=torch.long)
        s = shp[-1]
        srt = t.reshape(-1, s).sort(dim=1).values
        if not bool((srt == torch.arange(s, device=device)).all()):
            raise ValueError(f"{name}[{p!r}] is not a permutation of 0..{s - 1}" + (" in every row" if len(shp) == 2 else ""))
        out[p] = t
    extra = set(perms) - set(ctx.shapes)
    if extra:
        raise ValueError(f"{name} has permutations the spec does not use: {sorted(extra)}")
    return out


def _device_of(params: Mapping[str, torch.Tensor], spec: PermutationSpec) -> torch.device:
    for k in spec.axes_to_perm:
        return params[k].device
    return torch.device("cpu")


def _permute_param(ctx: _Ctx, key: str, w: torch.Tensor, perms, except_axis: Optional[int] = None,
                   cache: Optional[dict] = None) -> torch.Tensor:
    for ax, segs in enumerate(ctx.spec._parsed[key]):
        if segs is None or ax == except_axis:
            continue
        ck = (key, ax)
        idx = cache.get(ck) if cache is not None else None
        if idx is None:
            idx = ctx.axis_index(key, ax, perms, w.device)
            if cache is not None:
                cache[ck] = idx
        w = w.index_select(ax, idx)
    return w




def random_permutation(spec: PermutationSpec, params: Mapping[str, torch.Tensor], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Uniformly random perms of the right shapes (for tests and planted-permutation checks)."""
    ctx = _Ctx(spec, params, "params")
    dev = _device_of(params, spec)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p, shp in ctx.shapes.items():
        rows = shp[0] if len(shp) == 2 else 1
        out[p] = torch.stack([torch.randperm(shp[-1], generator=g) for _ in range(rows)]).reshape(shp).to(dev)
    return out


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                      params: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Return a new state dict with every spec'd axis permuted: ``w.index_select(axis, perm)``.

    Args:
        spec: the :class:`PermutationSpec`.
        perms: perm name -> LongTensor (shape (n,), or (parent blocks, block size) for nested levels),
            e.g. the output of :func:`weight_matching`.
        params: the state dict to permute (any dtypes; not modified). Keys outside the spec are
            passed through (same tensor objects).
    """
    ctx = _Ctx(spec, params, "params")
    dev = _device_of(params, spec)
    perms = _check_perms(ctx, perms, "perms", dev)
    cache: dict = {}
    out = {}
    for k, w in params.items():
        out[k] = _permute_param(ctx, k, w, perms, cache=cache) if k in spec.axes_to_perm else w
    return out
