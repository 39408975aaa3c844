"""The permutation-spec grammar: which permutation acts on which axis of which parameter.

The format (PyTorch layout, nested block perms, concatenated segments) is described in
:mod:`wweight.permute`; builders for common architectures are :mod:`wweight.permute.specs`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

AxisEntry = Union[None, str, tuple, list]


class _Seg:
    """One segment of an axis: nested levels (names, the last may be None)."""

    __slots__ = ("levels",)

    def __init__(self, levels: Tuple[Optional[str], ...]):
        self.levels = levels


def _parse_axis(key: str, ax: int, entry) -> Optional[List[_Seg]]:
    where = f"spec entry {key!r} axis {ax}"
    if entry is None:
        return None
    if isinstance(entry, str):
        return [_Seg((entry,))]
    if isinstance(entry, tuple):
        return [_parse_levels(where, entry)]
    if isinstance(entry, list):
        if not entry:
            raise ValueError(f"{where}: an empty list is not a valid axis entry")
        segs = []
        for e in entry:
            if isinstance(e, str):
                segs.append(_Seg((e,)))
            elif isinstance(e, tuple):
                s = _parse_levels(where, e)
                if s.levels[-1] is None:
                    raise ValueError(f"{where}: segments of a concatenated axis cannot end in None")
                segs.append(s)
            else:
                raise TypeError(f"{where}: list items must be a perm name or a tuple of perm names, got {e!r}")
        return segs
    raise TypeError(f"{where} must be None, a perm name (str), a tuple of names or a list of those, got {entry!r}")


def _parse_levels(where: str, t: tuple) -> _Seg:
    if len(t) == 0:
        raise ValueError(f"{where}: an empty tuple is not a valid axis entry")
    for i, x in enumerate(t):
        if x is None:
            if i != len(t) - 1 or i == 0:
                raise ValueError(f"{where}: None may only be the last level of a nested entry {t!r}")
        elif not isinstance(x, str):
            raise TypeError(f"{where}: nested levels must be perm names (str) or a final None, got {x!r}")
    names = [x for x in t if x is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a perm appears twice in the nested entry {t!r}")
    return _Seg(tuple(t))


class PermutationSpec:
    """Which permutation acts on which axis of which parameter (see the module docstring).

    Args:
        axes_to_perm: ``{param_name: (entry per axis)}``; an entry is ``None``, a perm name, a
            nested tuple of perm names (blocks, e.g. attention heads) or a list of those
            (concatenated segments).
        sizes: ``{perm_name: size}`` for perms whose size cannot be read off a plain axis
            (those that only appear in nested entries). Optional for the others.

    Attributes:
        axes_to_perm: the normalised mapping (tuples).
        perm_to_axes: ``{perm_name: [(param_name, axis), ...]}`` (as in Git Re-Basin).
    """

    def __init__(self, axes_to_perm: Mapping[str, Sequence[AxisEntry]], sizes: Optional[Mapping[str, int]] = None):
        if not isinstance(axes_to_perm, Mapping):
            raise TypeError(f"axes_to_perm must be a mapping param name -> tuple of axis entries, got {type(axes_to_perm).__name__}")
        self.axes_to_perm: Dict[str, tuple] = {}
        self._parsed: Dict[str, List[Optional[List[_Seg]]]] = {}
        perm_to_axes: Dict[str, List[Tuple[str, int]]] = {}
        self._occ: Dict[str, List[Tuple[str, int, int, int]]] = {}  # perm -> (key, axis, seg, level)
        for key, axes in axes_to_perm.items():
            if not isinstance(key, str):
                raise TypeError(f"axes_to_perm keys must be parameter names (str), got {key!r}")
            if isinstance(axes, (str, list)) or axes is None or not isinstance(axes, Sequence):
                raise TypeError(f"axes_to_perm[{key!r}] must be a tuple with one entry per axis, got {axes!r}")
            axes = tuple(axes)
            self.axes_to_perm[key] = axes
            parsed = [_parse_axis(key, i, e) for i, e in enumerate(axes)]
            self._parsed[key] = parsed
            for ax, segs in enumerate(parsed):
                if segs is None:
                    continue
                for si, seg in enumerate(segs):
                    for lv, name in enumerate(seg.levels):
                        if name is None:
                            continue
                        self._occ.setdefault(name, []).append((key, ax, si, lv))
                        lst = perm_to_axes.setdefault(name, [])
                        if (key, ax) not in lst:
                            lst.append((key, ax))
        self.perm_to_axes = perm_to_axes
        self.sizes: Dict[str, int] = {}
        for k, v in (sizes or {}).items():
            if k not in perm_to_axes:
                raise ValueError(f"sizes names perm {k!r}, which no parameter axis uses")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"sizes[{k!r}] must be a positive int, got {v!r}")
            self.sizes[k] = v

    def __repr__(self) -> str:
        return f"PermutationSpec({len(self.axes_to_perm)} params, perms={sorted(self.perm_to_axes)})"

    @property
    def perm_names(self) -> List[str]:
        return list(self.perm_to_axes)

    # ------------------------------------------------------------------ shapes
    def perm_shapes(self, params: Mapping[str, torch.Tensor], name: str = "params") -> Dict[str, Tuple[int, ...]]:
        """Validate the spec against ``params`` and return each perm's tensor shape.

        A plain / level-0 perm has shape (n,); a level-l perm inside nested blocks has shape
        (number of parent blocks, block size). Raises ValueError naming the key / perm on missing
        keys, a wrong number of axes, or one perm used on axes of different sizes.
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"{name} must be a mapping param name -> tensor, got {type(params).__name__}")
        size: Dict[str, int] = dict(self.sizes)
        # pass 1: plain axes fix sizes
        for key, parsed in self._parsed.items():
            if key not in params:
                raise ValueError(f"{name} has no parameter {key!r}, which the PermutationSpec names")
            t = params[key]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != len(parsed):
                raise ValueError(f"{name}[{key!r}] has {t.dim()} axes (shape {tuple(t.shape)}) but the "
                                 f"PermutationSpec gives {len(parsed)} axis entries")
            for ax, segs in enumerate(parsed):
                if segs is not None and len(segs) == 1 and len(segs[0].levels) == 1:
                    p = segs[0].levels[0]
                    n = t.shape[ax]
                    if p in size and size[p] != n:
                        raise ValueError(f"{name}: permutation {p!r} is used on axes of different sizes: {key!r} axis "
                                         f"{ax} has size {n}, elsewhere it has size {size[p]}")
                    size[p] = n
        # pass 2: nested / concatenated axes
        shapes: Dict[str, Tuple[int, ...]] = {}
        for key, parsed in self._parsed.items():
            t = params[key]
            for ax, segs in enumerate(parsed):
                if segs is None:
                    continue
                total = 0
                for seg in segs:
                    sz = self._level_sizes(seg, size, key, ax, t.shape[ax] if len(segs) == 1 else None)
                    parent = 1
                    for name_, s in zip(seg.levels, sz):
                        if name_ is not None:
                            shp = (s,) if parent == 1 and seg.levels.index(name_) == 0 else (parent, s)
                            if name_ in shapes and shapes[name_] != shp:
                                raise ValueError(f"{name}: permutation {name_!r} is used with shape {shp} at {key!r} axis "
                                                 f"{ax} but with shape {shapes[name_]} elsewhere")
                            shapes[name_] = shp
                        parent *= s
                    total += parent
                if total != t.shape[ax]:
                    raise ValueError(f"{name}[{key!r}] axis {ax} has size {t.shape[ax]} but its permutation "
                                     f"entry {self.axes_to_perm[key][ax]!r} covers {total} elements")
        return shapes

    def _level_sizes(self, seg: _Seg, size: Mapping[str, int], key: str, ax: int, axis_len: Optional[int]) -> List[int]:
        out = []
        for name_ in seg.levels:
            if name_ is None:
                known = math.prod(out)
                if axis_len is None or axis_len % known:
                    raise ValueError(f"{key!r} axis {ax}: cannot infer the size of the trailing None level "
                                     f"(axis size {axis_len} is not a multiple of {known})")
                out.append(axis_len // known)
            elif name_ in size:
                out.append(size[name_])
            else:
                raise ValueError(f"the size of permutation {name_!r} (used nested at {key!r} axis {ax}) is "
                                 "unknown: pass it in PermutationSpec(..., sizes={...})")
        return out

    def validate(self, params: Mapping[str, torch.Tensor], name: str = "params") -> None:
        """Raise ValueError/TypeError if the spec does not fit ``params``."""
        self.perm_shapes(params, name)
