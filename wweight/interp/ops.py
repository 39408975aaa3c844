"""Op layer of the ``interp`` family: argument checks (errors name the argument), parameter
defaults from the registry (:mod:`wweight.methods`), and the route to a path.

``backend="reference"`` runs :mod:`wweight.reference.interp` (mergekit 0.1.5 line by line); slerp,
nearswap, ram and ramplus_tl run ``wweight/backends/triton/interp.py`` (Triton kernels) on CUDA
tensors or with ``backend="triton"``; everything else runs :mod:`wweight.interp.fast` (the same
numbers with fewer passes over memory; torch ops, CPU and GPU tensors alike).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import _dispatch, _validate
from .. import methods as M
from ..reference import interp as ref
from . import fast


def _number(p: M.Param, name: str, v) -> Any:
    r = p.range
    lo = r.lo if math.isfinite(r.lo) else None
    hi = r.hi if math.isfinite(r.hi) else None
    if p.kind is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
            raise TypeError(f"{name} must be an integer, got {v!r}")
        _validate.number(name, v, lo=lo, hi=hi, lo_open=r.lo_open, hi_open=r.hi_open)
        return int(v)
    return _validate.number(name, v, lo=lo, hi=hi, lo_open=r.lo_open, hi_open=r.hi_open)


def resolve_params(m: M.MergeMethod, K: int, weights, params: Dict[str, Any]) -> Dict[str, Any]:
    """The method's parameters by their mergekit names: given values checked, the others defaulted.
    ``params`` holds the shared ones (``None`` = the default); ``weights`` (or per-model ``scale``)
    are K values or one broadcast."""
    given = dict(params)
    if weights is not None:
        given["weights"] = weights
    api = {p.api_name: p for p in m.params}
    if "weights" in given and "weights" not in api:
        raise ValueError(f"weights are not used by {m.name}")
    unknown = sorted(k for k in given if k not in api)
    if unknown:
        names = [p.api_name for p in m.params if not p.inert]
        raise TypeError(f"unexpected keyword arguments for method {m.name!r}: {unknown} "
                        f"(its parameters: {', '.join(names) or 'none'})")
    out: Dict[str, Any] = {}
    for p in m.params:
        if p.inert:
            continue
        v = given.get(p.api_name)
        if p.scope == M.PER_MODEL:
            v = p.default if v is None else v
            vals = list(v) if isinstance(v, (list, tuple)) else [v] * K
            if len(vals) != K:
                raise ValueError(f"{p.api_name} must be one number or {K} (one per tensor), got {len(vals)}")
            out[p.name] = [_number(p, f"{p.api_name}[{i}]", x) for i, x in enumerate(vals)]
        elif v is None:
            if p.required:
                raise TypeError(f"merge method {m.name!r} needs {p.name} (mergekit has no default for it)")
            out[p.name] = p.default
        elif p.kind is bool:
            out[p.name] = _validate.boolean(p.name, v)
        else:
            out[p.name] = _number(p, p.name, v)
    if m.name == "multislerp" and out["normalize_weights"] and abs(sum(out["weight"])) < 1e-12:
        raise ValueError("weights sum to 0: multislerp with normalize_weights divides by their sum")
    return out


def _check_inputs(m: M.MergeMethod, base, tensors) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError("tensors must be a list of tensors")
    if not tensors:
        raise ValueError("tensors is empty: give at least one model's tensor")
    K = len(tensors)
    if K < m.min_models or (m.max_models is not None and K > m.max_models):
        want = (f"exactly {m.min_models}" if m.min_models == m.max_models else
                f"at least {m.min_models}" if m.max_models is None else f"{m.min_models} to {m.max_models}")
        besides = " besides base" if m.needs_base else ""
        raise ValueError(f"merge method {m.name!r} takes {want} tensor(s){besides} in tensors, got {K}")
    if m.needs_base and not m.base_optional and base is None:
        raise ValueError(f"merge method {m.name!r} needs base (the base model's tensor)")
    ref_name, ref_t = ("base", base) if base is not None else ("tensors[0]", tensors[0])
    _validate.tensor(ref_name, ref_t)
    for i, t in enumerate(tensors):
        _validate.tensor(f"tensors[{i}]", t)
        _validate.same_as(f"tensors[{i}]", t, ref_name, ref_t)
    return list(tensors)


def _check_finite(named: Sequence) -> None:
    """NaN/Inf in an input: ``ValueError`` naming it. One read per input and no temporary:
    ``torch.aminmax`` propagates NaN, and an Inf is the min or the max (``isfinite(x).all()``
    writes a bool tensor first: 20-40x slower on CPU, which would cost more than the merge)."""
    for n, t in named:
        if t.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(t)):
            raise ValueError(f"{n} contains NaN or Inf; wweight refuses non-finite weights")


def run(name: str, impl, base: Optional[torch.Tensor], ts: List[torch.Tensor], p: Dict[str, Any]) -> torch.Tensor:
    """Call ``impl`` (the reference module or :mod:`.fast`: same function names and arguments)."""
    if name == "slerp":
        return impl.slerp(p["t"], base, ts[0])
    if name == "nuslerp":
        return impl.nuslerp(base, ts, p["weight"], p["nuslerp_row_wise"], p["nuslerp_flatten"])
    if name == "multislerp":
        return impl.multislerp(base, ts, p["weight"], p["normalize_weights"], p["eps"])
    if name == "karcher":
        return impl.karcher(ts, p["max_iter"], p["tol"])
    if name == "model_stock":
        return impl.model_stock(base, ts, p["filter_wise"])
    if name == "sce":
        return impl.sce(base, ts, p["select_topk"])
    if name == "ram":
        return impl.ram(base, ts, p["epsilon"])
    if name == "ramplus_tl":
        return impl.ramplus_tl(base, ts, p["r"], p["alpha"], p["epsilon"])
    if name == "nearswap":
        return impl.nearswap(base, ts[0], p["t"])
    if name == "arcee_fusion":
        return impl.arcee_fusion(base, ts[0])
    if name == "passthrough":
        return impl.passthrough(ts[0], p["scale"][0])
    raise AssertionError(name)


#: methods with Triton kernels (wweight/backends/triton/interp.py); the others run fast.py everywhere
TRITON_METHODS = ("slerp", "nearswap", "ram", "ramplus_tl")


def _path(name: str, backend: Optional[str], device: torch.device):
    """The module that runs ``name``: the reference, the Triton glue (CUDA tensors by default, or
    ``backend="triton"``, which on CPU tensors needs ``TRITON_INTERPRET=1``), else :mod:`.fast`.
    Other backend names (cuda, cpu, torch) run :mod:`.fast`: these methods have no such kernels."""
    want = _dispatch.requested(backend)
    if want == "reference":
        return ref
    if name in TRITON_METHODS and want in ("auto", "triton") and _dispatch.resolve(
            f"interp_{name}", device, backend, family="interp", has_cuda=False) == "triton":
        return _dispatch.backend_module("interp", "triton")
    return fast


def interp_merge_tensors(method: str, base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor],
                         weights=None, *, backend: Optional[str] = None, seed: Optional[int] = None,
                         **params) -> torch.Tensor:
    """One tensor of an ``interp`` method; the contract is :func:`wweight.merge_tensors`'s.

    ``base`` is mergekit's base model (required by slerp, nearswap, arcee_fusion, model_stock, sce,
    ram, ramplus_tl; optional for nuslerp and multislerp; not an input of karcher and passthrough,
    which mergekit runs over all their inputs: put it in ``tensors`` to include it). ``seed`` is
    accepted for the checkpoint pipeline's sake and unused (every method here is deterministic).
    Returns a new tensor of the inputs' shape, dtype and device.
    """
    m = M.get(method)
    ts = _check_inputs(m, base, tensors)
    if not m.needs_base:
        base = None  # validated above when given, but not an input (mergekit's BasePolicy.IGNORED)
    p = resolve_params(m, len(ts), weights, params)
    named = ([("base", base)] if base is not None else []) + [(f"tensors[{i}]", t) for i, t in enumerate(ts)]
    _check_finite(named)
    impl = _path(m.name, backend, ts[0].device)
    dtype = ts[0].dtype
    out = run(m.name, impl, base, ts, p)
    return out if out.dtype == dtype else out.to(dtype)


def interp_merge_state_dicts(method: str, base: Optional[Dict[str, torch.Tensor]],
                             finetuned: Sequence[Dict[str, torch.Tensor]], weights=None, *,
                             backend: Optional[str] = None, progress: bool = False,
                             **params) -> Dict[str, torch.Tensor]:
    """Whole models key by key (:func:`interp_merge_tensors` per float key; other keys copied from
    the first model). Keys and shapes must agree."""
    m = M.get(method)
    if m.needs_base and not m.base_optional and base is None:
        raise ValueError(f"base is required for method {m.name!r}")
    ref_sd = base if base is not None else finetuned[0]
    keys = list(ref_sd.keys())
    _validate.same_keys(finetuned, ref_sd, "reference")
    out: Dict[str, torch.Tensor] = {}
    for n, k in enumerate(keys):
        t0 = ref_sd[k]
        if not t0.is_floating_point():
            out[k] = t0.clone()
            continue
        b = base[k] if (base is not None and m.needs_base) else None
        try:
            out[k] = interp_merge_tensors(method, b, [sd[k] for sd in finetuned], weights, backend=backend, **params)
        except ValueError as e:
            raise ValueError(f"{k!r}: {e}") from None
        if progress:
            print(f"\r{method}: {n + 1}/{len(keys)} tensors", end="", flush=True)
    if progress:
        print()
    return out
