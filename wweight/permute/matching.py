"""Git Re-Basin weight matching: coordinate descent over permutations with exact assignments.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin" (ICLR 2023; ``weight_matching.py`` of
github.com/samuela/git-re-basin): for each permutation in turn (random order every round) the
summed cross-correlation of every weight that touches it is maximised by
:func:`wweight.linear_sum_assignment`; it stops when a round improves no permutation. Nested
block perms (attention heads) are solved jointly with the perms inside their blocks.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from .. import _dispatch, _validate
from .apply import _check_perms, _Ctx, _descend, _device_of, _permute_param
from .lap import linear_sum_assignment
from .grammar import PermutationSpec

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
        lap_method: LAP ``method`` of :func:`linear_sum_assignment` (``"auto"``: the C++ LAPJV solver
            for CPU params, the batched CUDA shortest-augmenting-path kernel / large-n auction for CUDA
            params, every result certified; ``"scipy"``, ``"sap"`` or ``"auction"`` force one).
        cost_dtype: dtype of the cost matmuls (default float32, or float64 for float64 params);
            a floating dtype, since integer costs would truncate the products.
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
    from .lap import _METHODS as _LAP_METHODS

    if not isinstance(lap_method, str) or lap_method not in _LAP_METHODS:
        raise ValueError(f"lap_method must be one of {list(_LAP_METHODS)}, got {lap_method!r}")
    dev = _device_of(params_a, spec)
    if init_perm is None:
        perms = {p: torch.arange(shp[-1], device=dev).repeat(*(shp[:-1] + (1,))).reshape(shp)
                 for p, shp in ctx.shapes.items()}
    else:
        perms = dict(_check_perms(ctx, init_perm, "init_perm", dev))
    tol = _validate.number("tol", tol, lo=0.0)  # TypeError for None/'x', ValueError for < 0 / NaN / Inf
    if cost_dtype is not None and (not isinstance(cost_dtype, torch.dtype) or not cost_dtype.is_floating_point):
        # integer costs would truncate every A_w @ B_w^T product and change the matching silently
        raise TypeError(f"cost_dtype must be a floating torch.dtype (float32, float64, ...), got {cost_dtype!r}")
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
