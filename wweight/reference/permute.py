"""Plain reference of permutation weight matching (Git Re-Basin), for tests and benchmarks.

A line-by-line port of ``weight_matching.py`` of github.com/samuela/git-re-basin to PyTorch layout
and ``scipy.optimize.linear_sum_assignment``: one (n, n) float64 cost per permutation, summed over
``w_a.moveaxis(axis, 0).reshape(n, -1) @ w_b(...).T`` of every parameter axis it touches, random
order of perms every round (``torch.randperm`` seeded like :func:`wweight.weight_matching`, so both
visit perms in the same order), stop after a round without an improvement.

Only plain (non-nested, single-segment) axis entries are supported here; the nested per-head form
of :class:`wweight.PermutationSpec` is covered by :func:`apply_permutation_reference`, whose index
arithmetic is written out element by element.
"""
from __future__ import annotations

import itertools
from typing import Dict, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as _scipy_lsa


def lap_reference(cost: torch.Tensor, maximize: bool = False):
    """scipy, one problem at a time; (n, m) -> (row, col), (B, n, m) -> stacked (B, k)."""
    c = cost.detach().to("cpu", torch.float64).numpy()
    if c.ndim == 2:
        r, cc = _scipy_lsa(c, maximize=maximize)
        return torch.from_numpy(r), torch.from_numpy(cc)
    rs, cs = zip(*(_scipy_lsa(x, maximize=maximize) for x in c))
    return torch.from_numpy(np.stack(rs)), torch.from_numpy(np.stack(cs))


def _axis_index_slow(entry, perms: Mapping[str, torch.Tensor], sizes: Mapping[str, int], axis_len: int) -> torch.Tensor:
    """Old index of every new position of one axis, element by element."""
    if isinstance(entry, str):
        return perms[entry].clone()
    segs = entry if isinstance(entry, list) else [entry]
    out = []
    offset = 0
    for seg in segs:
        seg = (seg,) if isinstance(seg, str) else seg
        ss = [sizes[n] if n is not None else None for n in seg]
        if ss[-1] is None:
            ss[-1] = axis_len // int(np.prod(ss[:-1]))
        for path in itertools.product(*[range(s) for s in ss]):
            old = 0
            for lvl, (name, s, h) in enumerate(zip(seg, ss, path)):
                if name is None:
                    local = h
                elif lvl == 0:
                    local = int(perms[name][h])
                else:
                    local = int(perms[name][old, h])  # row = old flat index of the parent block
                old = old * s + local
            out.append(offset + old)
        offset += int(np.prod(ss))
    return torch.tensor(out, dtype=torch.long)


def apply_permutation_reference(spec, perms: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]):
    sizes = {p: int(t.shape[-1]) for p, t in perms.items()}
    out = {}
    for k, w in params.items():
        if k in spec.axes_to_perm:
            for ax, entry in enumerate(spec.axes_to_perm[k]):
                if entry is not None:
                    w = w.index_select(ax, _axis_index_slow(entry, perms, sizes, w.shape[ax]).to(w.device))
        out[k] = w
    return out


def _get_permuted_param(spec, perm, k, params, except_axis=None):
    """Git Re-Basin's ``get_permuted_param`` (jnp.take -> index_select)."""
    w = params[k]
    for axis, p in enumerate(spec.axes_to_perm[k]):
        if axis == except_axis:
            continue
        if p is not None:
            w = w.index_select(axis, perm[p])
    return w


def _dev_of(params, spec, p):
    return params[spec.perm_to_axes[p][0][0]].device


def weight_matching_reference(spec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                              max_iter: int = 100, seed: int = 0, init_perm=None,
                              cost_dtype: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    for k, axes in spec.axes_to_perm.items():
        for e in axes:
            if e is not None and not isinstance(e, str):
                raise NotImplementedError("weight_matching_reference handles plain (non-nested) specs only")
    perm_sizes = {p: params_a[axes[0][0]].shape[axes[0][1]] for p, axes in spec.perm_to_axes.items()}
    perm = ({p: torch.arange(n, device=_dev_of(params_a, spec, p)) for p, n in perm_sizes.items()}
            if init_perm is None else dict(init_perm))
    perm_names = list(perm.keys())
    g = torch.Generator().manual_seed(seed)
    for iteration in range(max_iter):
        progress = False
        for p_ix in torch.randperm(len(perm_names), generator=g).tolist():
            p = perm_names[p_ix]
            n = perm_sizes[p]
            A = torch.zeros((n, n), dtype=torch.float64, device=params_a[spec.perm_to_axes[p][0][0]].device)
            for wk, axis in spec.perm_to_axes[p]:
                w_a = params_a[wk]
                w_b = _get_permuted_param(spec, perm, wk, params_b, except_axis=axis)
                w_a = torch.movedim(w_a, axis, 0).reshape((n, -1)).to(cost_dtype)
                w_b = torch.movedim(w_b, axis, 0).reshape((n, -1)).to(cost_dtype)
                A += (w_a @ w_b.T).double()
            A = A.cpu()
            ri, ci = _scipy_lsa(A.numpy(), maximize=True)
            assert (ri == np.arange(len(ri))).all()
            oldL = float(A[torch.arange(n), perm[p].cpu()].sum())
            newL = float(A[torch.arange(n), torch.from_numpy(ci)].sum())
            progress = progress or newL > oldL + 1e-12
            perm[p] = torch.from_numpy(ci).long().to(_dev_of(params_a, spec, p))
        if not progress:
            break
    return perm
