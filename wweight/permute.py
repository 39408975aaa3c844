"""Permutation weight matching (Git Re-Basin).

Papers: Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries"
(ICLR 2023; code github.com/samuela/git-re-basin, ``weight_matching.py``), and Ito, Yamada & Kumagai,
"Analysis of Linear Mode Connectivity via Permutation-Based Weight Matching" (2024).

Model B's hidden units are permuted to line up with model A's so the two can be interpolated or
merged with a low loss barrier. Weight matching is coordinate descent: for each permutation in turn
(random order every round) the cost ``sum_w  W_a(axis -> rows) @ W_b(other axes permuted).T`` over
every parameter that touches it is maximised by an exact linear assignment; it stops when a whole
round improves no permutation.

Spec format (PyTorch layout)
----------------------------
``PermutationSpec({param_name: axes})`` with one entry per axis of the parameter:

* ``None``: the axis is not permuted;
* ``"P"``: the axis is permuted by the permutation ``P`` (a LongTensor ``perm`` of its size:
  ``new = old.index_select(axis, perm)``, i.e. ``perm[new_position] = old_position``);
* a tuple ``("Ph", "Pd")`` (any depth): the axis is a nested block structure, e.g. attention heads
  of ``head_dim`` each. Level 0 permutes whole blocks (``Ph``, shape (H,)); a deeper level permutes
  inside every block separately and is a 2-D LongTensor of shape (number of parent blocks, block
  size) whose row ``b`` is the permutation inside the block that was at position ``b`` in the
  *original* (un-permuted) order. The last level may be ``None`` (not permuted; its size is
  inferred), e.g. ``("Pkv", None)`` moves GQA key/value heads as whole heads. The sizes of perms
  that only appear inside tuples are given with ``sizes={"Ph": 12, "Pd": 64}``.
* a list of the above (no ``None``): the axis is a concatenation of segments, e.g. GPT-2's fused
  ``c_attn`` output ``[("Ph", "Pqk"), ("Ph", "Pqk"), ("Ph", "Pv")]`` for Q | K | V.

Parameters not named in the spec are left unpermuted (e.g. ``num_batches_tracked``).

Nested perms (e.g. heads x head dims) are matched jointly by default (``joint_blocks=True``): each
(head of A, head of B) pair gets its optimal inner assignment (a batch of H*H assignments), then the
heads are assigned on those scores. Git Re-Basin has no nested perms; on plain specs the algorithm
is exactly its coordinate descent (tested equal to the reference port, same seed -> same perms).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _dispatch
from .lap import linear_sum_assignment

__all__ = ["PermutationSpec", "weight_matching", "apply_permutation", "linear_sum_assignment",
           "random_permutation", "permutation_objective"]

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


# ---------------------------------------------------------------------------------- helpers


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
        self.spec = spec
        self.shapes = spec.perm_shapes(params, name)
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


# ---------------------------------------------------------------------------------- public API


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


def _occurrence_cost(ctx: _Ctx, key: str, ax: int, si: int, lv: int, wa: torch.Tensor, wb: torch.Tensor,
                     perms, cost: torch.Tensor, cdtype: torch.dtype) -> None:
    """Add one parameter's contribution to the (parents, s, s) cost of the perm at (ax, si, lv).

    ``cost[b, i, j]``: similarity of A's unit i with B's unit j inside the block that sits at old
    position b. ``wb`` already has every other axis permuted.
    """
    seg = ctx.spec._parsed[key][ax][si]
    sz = ctx.seg_sizes(key, ax, si)
    off = ctx.seg_offset(key, ax, si)
    n_seg = math.prod(sz)
    a = wa.narrow(ax, off, n_seg).movedim(ax, 0).reshape(n_seg, -1).to(cdtype)
    b = wb.narrow(ax, off, n_seg).movedim(ax, 0).reshape(n_seg, -1).to(cdtype)
    s = sz[lv]
    n_parent = math.prod(sz[:lv])
    inner = math.prod(sz[lv + 1:])
    dev = wa.device
    # ancestors move whole blocks (known); deeper levels permute inside B's blocks in place
    parent_old = _descend(torch.zeros(1, dtype=torch.long, device=dev), seg.levels[:lv], sz[:lv], perms)
    if lv + 1 < len(sz) or n_parent > 1:
        deeper = _descend(torch.arange(n_parent * s, device=dev), seg.levels[lv + 1:], sz[lv + 1:], perms)
        idx = deeper.view(n_parent, s * inner).index_select(0, parent_old).reshape(-1)
        b = b.index_select(0, idx)
    a = a.reshape(n_parent, s, -1)
    b = b.reshape(n_parent, s, -1)
    if n_parent == 1:
        cost[0] += (a[0] @ b[0].T).to(cost.dtype)
    else:  # parent_old is a permutation of the blocks: plain indexed add
        cost[parent_old] += torch.bmm(a, b.transpose(1, 2)).to(cost.dtype)


def _joint_children(spec: PermutationSpec, p: str) -> Optional[List[Optional[str]]]:
    """Child perms of a block perm ``p`` when every use of ``p`` is level 0 of a nested entry and
    every named child sits only directly under ``p``; else None (plain coordinate step)."""
    occ = spec._occ[p]
    children = []
    for key, ax, si, lv in occ:
        levels = spec._parsed[key][ax][si].levels
        if lv != 0 or len(levels) < 2:
            return None
        if levels[1] not in children:
            children.append(levels[1])
    named = [q for q in children if q is not None]
    if not named:
        return None
    for q in named:
        for key, ax, si, lv in spec._occ[q]:
            if lv != 1 or spec._parsed[key][ax][si].levels[0] != p:
                return None
    return children


def _joint_step(ctx: _Ctx, p: str, children, params_a, params_b, perms, cdtype, backend, lap_method):
    """Block perm ``p`` solved jointly with the perms inside its blocks.

    For every (A block h, B block g) pair the best inner assignment of each child perm is found
    (a batch of s0*s0 assignments of size s1), then ``p`` maximises the sum of those optimal pair
    scores. Given the other perms this is the exact optimum over ``p`` and its children together,
    so head matching does not depend on the inner perms being aligned first.
    Returns (old objective, new objective, {perm: new tensor}).
    """
    spec = ctx.spec
    dev = perms[p].device
    s0 = ctx.size[p]
    mats: Dict[Optional[str], torch.Tensor] = {}
    by_key: Dict[Tuple[str, int], List[int]] = {}
    for key, ax, si, lv in spec._occ[p]:
        by_key.setdefault((key, ax), []).append(si)
    for (key, ax), segs in by_key.items():
        wb_full = _permute_param(ctx, key, params_b[key], perms, except_axis=ax)
        for si in segs:
            seg = spec._parsed[key][ax][si]
            sz = ctx.seg_sizes(key, ax, si)
            off = ctx.seg_offset(key, ax, si)
            n_seg = math.prod(sz)
            s1 = sz[1]
            a = params_a[key].narrow(ax, off, n_seg).movedim(ax, 0).reshape(n_seg, -1).to(cdtype)
            b = wb_full.narrow(ax, off, n_seg).movedim(ax, 0).reshape(n_seg, -1).to(cdtype)
            if len(sz) > 2:  # deeper levels permute inside B's blocks in place
                deeper = _descend(torch.arange(s0 * s1, device=dev), seg.levels[2:], sz[2:], perms)
                b = b.index_select(0, deeper)
            a = a.reshape(s0 * s1, -1)
            b = b.reshape(s0 * s1, -1)
            m = (a @ b.T).view(s0, s1, s0, s1).permute(0, 2, 1, 3).to(torch.float64)  # [h, g, k, l]
            q = seg.levels[1]
            mats[q] = mats[q] + m if q in mats else m
    pair = torch.zeros(s0, s0, dtype=torch.float64, device=dev)
    cur = perms[p]
    old = 0.0
    h_idx = torch.arange(s0, device=dev)
    inner_cols = {}
    for q, m in mats.items():
        s1 = m.shape[-1]
        if q is None:
            d = m.diagonal(dim1=2, dim2=3).sum(-1)
            pair += d
            old += float(d[h_idx, cur].sum())
            continue
        qc = perms[q]  # (s0, s1), row = old block
        old += float(m[h_idx, cur].gather(2, qc[cur].unsqueeze(2)).sum())
        flat = m.reshape(s0 * s0, s1, s1)
        _, col = linear_sum_assignment(flat, maximize=True, backend=backend, method=lap_method)
        pair += flat.gather(2, col.unsqueeze(2)).sum((1, 2)).view(s0, s0)
        inner_cols[q] = col.view(s0, s0, s1)
    _, newp = linear_sum_assignment(pair, maximize=True, backend=backend, method=lap_method)
    new = float(pair[h_idx, newp].sum())
    updates = {p: newp}
    for q, col in inner_cols.items():
        qn = torch.empty_like(perms[q])
        qn[newp] = col[h_idx, newp]
        updates[q] = qn
    return old, new, updates


def permutation_objective(cost: torch.Tensor, perm: torch.Tensor) -> float:
    """sum_b sum_i cost[b, i, perm[b, i]] (float64)."""
    p = perm.reshape(cost.shape[0], cost.shape[1])
    return float(cost.to(torch.float64).gather(2, p.unsqueeze(2)).sum())


def weight_matching(spec: PermutationSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                    max_iter: int = 100, seed: int = 0, init_perm: Optional[Mapping[str, torch.Tensor]] = None, *,
                    tol: float = 1e-12, callback: Optional[Callable[[dict], None]] = None,
                    backend: Optional[str] = None, cost_dtype: Optional[torch.dtype] = None,
                    joint_blocks: bool = True, lap_method: str = "auto") -> Dict[str, torch.Tensor]:
    """Git Re-Basin weight matching: perms that align ``params_b`` to ``params_a``.

    Coordinate descent as in ``samuela/git-re-basin`` (``weight_matching.py``): every round visits
    the perms in a random order (``torch.randperm`` seeded by ``seed``), builds for perm P the cost
    ``sum_w A_w (axis->rows) @ B_w(other axes permuted, axis->rows).T`` over every parameter axis P
    touches (one batched matmul per parameter, on the params' device; nested perms such as
    per-head ones give a (blocks, s, s) cost and a batched assignment), solves it exactly with
    :func:`linear_sum_assignment` (maximize) and stops after a round in which no perm improved the
    objective by more than ``tol * max(1, |objective|)``.

    Args:
        spec: :class:`PermutationSpec` (validated against both state dicts).
        params_a, params_b: state dicts with the same keys/shapes for every spec'd parameter.
        max_iter: maximum number of rounds.
        seed: seed of the random perm order.
        init_perm: optional starting perms (default identity).
        tol: relative improvement threshold (Git Re-Basin uses an absolute 1e-12 on float32 costs;
            a relative one keeps the test meaningful for large models).
        callback: called after every perm update with a dict ``{"iteration", "perm", "old", "new",
            "improved"}`` (objective values), e.g. ``history.append``.
        backend: LAP backend (see :func:`linear_sum_assignment`).
        lap_method: LAP ``method`` (``"auto"``: scipy for CPU params, the certified batched auction
            for CUDA params; ``"scipy"`` / ``"auction"`` force one).
        cost_dtype: dtype of the cost matmuls (default float32, or float64 for float64 params).
        joint_blocks: solve a block perm (e.g. attention heads) jointly with the perms inside its
            blocks: every (head of A, head of B) pair gets its optimal inner assignment (a batch of
            H*H assignments of size head_dim), then the heads are assigned on those scores. Without
            it, head and inner perms are alternated like any other perms, which from the identity
            easily stalls in a poor local optimum (heads compared in unaligned coordinates). Not in
            Git Re-Basin (which has no nested perms); it reduces to it on plain specs.

    Returns:
        ``{perm name: LongTensor}`` on the params' device: ``apply_permutation(spec, perms,
        params_b)`` is B aligned to A.
    """
    ctx = _Ctx(spec, params_a, "params_a")
    if not isinstance(params_b, Mapping):
        raise TypeError(f"params_b must be a mapping param name -> tensor, got {type(params_b).__name__}")
    for k in spec.axes_to_perm:
        a, b = params_a[k], params_b.get(k)
        if b is None:
            raise ValueError(f"params_b has no parameter {k!r}, which the PermutationSpec names")
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"params_b[{k!r}] must be a torch.Tensor, got {type(b).__name__}")
        if a.shape != b.shape:
            raise ValueError(f"params_b[{k!r}] has shape {tuple(b.shape)} but params_a[{k!r}] has {tuple(a.shape)}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise TypeError(f"params_a[{k!r}] and params_b[{k!r}] must be floating-point tensors, got {a.dtype}, {b.dtype}")
        if a.device != b.device:
            raise ValueError(f"params_a[{k!r}] is on {a.device} but params_b[{k!r}] is on {b.device}")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"params_a[{k!r}] or params_b[{k!r}] contains NaN or Inf")
    _Ctx(spec, params_b, "params_b")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    _dispatch.requested(backend)
    if lap_method not in ("auto", "scipy", "auction"):
        raise ValueError(f"lap_method must be one of ['auto', 'scipy', 'auction'], got {lap_method!r}")
    dev = _device_of(params_a, spec)
    if init_perm is None:
        perms = {p: torch.arange(shp[-1], device=dev).repeat(*(shp[:-1] + (1,))).reshape(shp)
                 for p, shp in ctx.shapes.items()}
    else:
        perms = dict(_check_perms(ctx, init_perm, "init_perm", dev))
    if cost_dtype is None:
        cost_dtype = torch.float64 if any(params_a[k].dtype == torch.float64 for k in spec.axes_to_perm) else torch.float32
    names = list(ctx.shapes)
    joint = {p: _joint_children(spec, p) for p in names}
    g = torch.Generator().manual_seed(seed)
    for it in range(max_iter):
        progress = False
        for pi in torch.randperm(len(names), generator=g).tolist():
            p = names[pi]
            shp = ctx.shapes[p]
            if joint_blocks and joint.get(p) is not None:
                old, new, upd = _joint_step(ctx, p, joint[p], params_a, params_b, perms, cost_dtype, backend, lap_method)
                improved = new - old > tol * max(1.0, abs(old))
                progress = progress or improved
                perms.update(upd)
                if callback is not None:
                    callback({"iteration": it, "perm": p, "old": old, "new": new, "improved": improved})
                continue
            nb = shp[0] if len(shp) == 2 else 1
            s = shp[-1]
            cost = torch.zeros(nb, s, s, dtype=torch.float64, device=dev)
            by_key: Dict[Tuple[str, int], List[Tuple[int, int]]] = {}
            for key, ax, si, lv in spec._occ[p]:
                by_key.setdefault((key, ax), []).append((si, lv))
            for (key, ax), occs in by_key.items():
                wb = _permute_param(ctx, key, params_b[key], perms, except_axis=ax)
                for si, lv in occs:
                    _occurrence_cost(ctx, key, ax, si, lv, params_a[key], wb, perms, cost, cost_dtype)
            old = permutation_objective(cost, perms[p])
            _, col = linear_sum_assignment(cost, maximize=True, backend=backend, method=lap_method)
            new = permutation_objective(cost, col)
            improved = new - old > tol * max(1.0, abs(old))
            progress = progress or improved
            perms[p] = col.reshape(shp)
            if callback is not None:
                callback({"iteration": it, "perm": p, "old": old, "new": new, "improved": improved})
        if not progress:
            break
    return perms
