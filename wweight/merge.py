"""Model merging entry points: ``merge_tensors`` (one tensor) and ``merge_state_dicts`` (a model).

Methods and parameters follow mergekit 0.1.5 (names, defaults and numbers):

============================  =========  ===============  =========  =======
method                        consensus  sparsification   normalize  rescale
============================  =========  ===============  =========  =======
``linear``                    --         --               True       --
``task_arithmetic``           --         --               False      False
``ties``                      sum        magnitude        True       False
``dare_ties``                 sum        random           False      True
``dare_linear``               --         random           False      True
``breadcrumbs``               --         magnitude_outl.  False      False
``breadcrumbs_ties``          sum        magnitude_outl.  False      False
``della``                     sum        della_magprune   True       True
``della_linear``              --         della_magprune   False      True
============================  =========  ===============  =========  =======

plus the isotropic methods ``iso_c``, ``iso_cts`` and ``tsv_m`` (``wweight/iso.py``).

For the task-arithmetic family the whole merge is one fused pass (``kernels/sparse.py``,
``csrc/sparse.cu``): deltas, masks (thresholds found beforehand by radix select), rescale,
weights, TIES sign election, normalisation and lambda are computed per element, writing only
the output; K full-size delta temporaries are never materialised (mergekit stacks them).
"""
from __future__ import annotations

import zlib
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import _dispatch, _validate
from .reference import sparse as ref
from .sparse import (
    check_sparsify_args,
    primitives,
    raise_on_flags,
    resolve_backend,
    resolve_seed,
)
from .sparse_plan import build_plan, rescale_factors, work_dtype

TA_METHODS = tuple(ref.TA_METHODS)
ISO_METHODS = ("iso_c", "iso_cts", "tsv_m")
MERGE_METHODS = ("linear",) + TA_METHODS + ISO_METHODS

Num = Union[float, Sequence[float]]


def _splitmix64(x: int) -> int:
    """Derive independent per-key seeds from one user seed (SplitMix64 finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def key_seed(seed: int, key: str) -> int:
    """Per-tensor Philox key from a run seed and the tensor's name.

    Depends on the name only (not on the order, grouping or rank that processes the key), so
    ``merge_state_dicts`` and ``wweight merge`` (any number of processes) draw the same masks.
    """
    return _splitmix64((int(seed) & 0xFFFFFFFF) << 32 | zlib.crc32(key.encode("utf-8")))


def _per_model(name: str, v, K: int, default=None) -> List[float]:
    if v is None:
        v = default
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        if len(v) != K:
            raise ValueError(f"{name} has {len(v)} entries, expected one per model ({K})")
        return [_validate.number(f"{name}[{i}]", x) for i, x in enumerate(v)]
    return [_validate.number(name, v)] * K


def _check_inputs(base, tensors, need_base: bool):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError("tensors must be a list of tensors (one per fine-tuned model)")
    if len(tensors) == 0:
        raise ValueError("tensors is empty: give at least one model's tensor")
    if need_base:
        if base is None:
            raise ValueError("base is required for this method (task vectors are tensors[i] - base)")
        _validate.tensor("base", base)
        ref_t, ref_name = base, "base"
    else:
        ref_t, ref_name = tensors[0], "tensors[0]"
    for i, t in enumerate(tensors):
        _validate.tensor(f"tensors[{i}]", t)
        _validate.same_as(f"tensors[{i}]", t, ref_name, ref_t)
    if need_base is False and base is not None:
        _validate.tensor("base", base)


# ------------------------------------------------------------------------------ custom op


def _merge_impl(method: str, base: Optional[torch.Tensor], tensors: List[torch.Tensor], weights: List[float],
                density: List[float], gamma: List[float], epsilon: List[float], lambda_: float, normalize: bool,
                rescale: bool, seed: int, name: str) -> torch.Tensor:
    K = len(tensors)
    if method == "linear":
        if name == "reference" or name == "torch":
            out = ref.linear_ref(tensors, weights, normalize)
            if not all(bool(torch.isfinite(t).all()) for t in tensors if t.numel()):
                raise ValueError("tensors contain NaN or Inf; wweight refuses non-finite weights")
            return out
        prims = primitives(name)
        plan = build_plan(prims, tensors, None, None, [1.0] * K, [0.0] * K, 0)
        w = torch.tensor(weights, dtype=torch.float32, device=tensors[0].device)
        # mergekit divides by the float32 sum of the float32 weights
        div = float(torch.tensor(weights, dtype=torch.float32).sum()) if normalize else 1.0
        out = torch.empty_like(tensors[0])
        flags = prims.merge(tensors, None, out, plan, w, torch.ones_like(w), 1.0, div, False, normalize,
                            round16=False)
        raise_on_flags(flags, [f"tensors[{i}]" for i in range(K)] + ["base"])
        return out
    consensus, sparsification, _, _ = ref.TA_METHODS[method]
    if name == "reference" or sparsification == "della_magprune":
        for i, t in enumerate([*tensors, base]):
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{'base' if i == K else f'tensors[{i}]'} contains NaN or Inf; "
                                 "wweight refuses non-finite weights")
        return ref.task_arithmetic_family_ref(method, base, tensors, weights, density, gamma, epsilon, lambda_,
                                              normalize, rescale, seed)
    prims = primitives(name)
    dtype = base.dtype
    plan = build_plan(prims, tensors, base, sparsification, density, gamma, seed)
    if sparsification:
        scales = rescale_factors(prims, tensors, base, plan, "l1" if rescale else None, density, dtype,
                                 work_dtype(dtype, sparsification))
    else:
        scales = torch.ones(K, dtype=torch.float32, device=base.device)
    w_dt = torch.tensor(weights, dtype=dtype)
    div = w_dt.sum()
    div_nc = 1.0 if float(div.abs()) < 1e-8 else float(div)
    out = torch.empty_like(base)
    flags = prims.merge(tensors, base, out, plan, w_dt.float().to(base.device), scales, lambda_, div_nc,
                        consensus is not None, normalize)
    raise_on_flags(flags, [f"tensors[{i}]" for i in range(K)] + ["base"])
    return out


@torch.library.custom_op("wweight::merge_tensors", mutates_args=())
def _merge_op(method: str, base: Optional[torch.Tensor], tensors: List[torch.Tensor], weights: List[float],
              density: List[float], gamma: List[float], epsilon: List[float], lambda_: float, normalize: bool,
              rescale: bool, seed: int, backend: str) -> torch.Tensor:
    first = base if base is not None else tensors[0]
    name = resolve_backend(first.device, backend, first.dtype, "merge_tensors")
    return _merge_impl(method, base, list(tensors), list(weights), list(density), list(gamma), list(epsilon),
                       lambda_, normalize, rescale, seed, name)


@_merge_op.register_fake
def _(method, base, tensors, weights, density, gamma, epsilon, lambda_, normalize, rescale, seed, backend):
    return torch.empty_like(base if base is not None else tensors[0])


# ------------------------------------------------------------------------------ public API


def merge_tensors(method: str, base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor],
                  weights: Optional[Num] = None, density: Num = 1.0, gamma: Num = 0.01, epsilon: Num = 0.15,
                  lambda_: float = 1.0, normalize: Optional[bool] = None, rescale: Optional[bool] = None,
                  seed: Optional[int] = None, *, backend: Optional[str] = None, **iso_kwargs) -> torch.Tensor:
    """Merge one tensor of K fine-tuned models (mergekit semantics; see the module table).

    Args:
        method: one of :data:`MERGE_METHODS`.
        base: the base model's tensor (float32/float16/bfloat16/float64, any shape); optional for
            ``linear`` (mergekit's linear merge ignores it).
        tensors: K tensors of the fine-tuned models, same shape, dtype and device as ``base``.
        weights: per-model weight (scalar or K values; default 1.0 each). For TIES the sign
            election uses the weighted deltas and ``normalize`` divides by the summed weights of
            the agreeing models (0 replaced by 1), as mergekit.
        density, gamma, epsilon: sparsification parameters (scalar or one per model), see
            :func:`wweight.sparsify`.
        lambda_: mergekit's ``lambda`` (scales the merged delta).
        normalize, rescale: ``None`` = the method's mergekit default; rescale is mergekit's
            L1-norm rescale of each sparsified delta.
        seed: Philox key of DARE/DELLA masks (model i uses stream i); ``None`` draws one from
            torch's generator.
        iso_kwargs: for ``iso_c``/``iso_cts``/``tsv_m`` (``alpha``, ``common_space_fraction``,
            ``compute_dtype``), forwarded to :func:`wweight.iso.iso_merge_tensors`.

    Returns:
        A new tensor with ``base``'s shape, dtype and device (for ``linear``: ``tensors[0]``'s).
        Inputs are never modified. NaN/Inf in any input raise ``ValueError`` naming it.
    """
    _validate.choice("method", method, MERGE_METHODS)
    if method in ISO_METHODS:
        from .iso import iso_merge_tensors

        return iso_merge_tensors(method, base, list(tensors), backend=backend, **iso_kwargs)
    if iso_kwargs:
        raise TypeError(f"unexpected keyword arguments for method {method!r}: {sorted(iso_kwargs)}")
    _check_inputs(base, tensors, need_base=method != "linear")
    K = len(tensors)
    weights = _per_model("weights", weights, K, 1.0)
    lambda_ = _validate.number("lambda_", lambda_)
    if method == "linear":
        normalize = True if normalize is None else bool(normalize)
        if normalize and abs(sum(weights)) < 1e-12:
            raise ValueError("weights sum to 0: a normalized linear merge would divide by zero")
        dens = gam = eps = [1.0] * K
        rescale = False
    else:
        _, sparsification, d_norm, d_rescale = ref.TA_METHODS[method]
        normalize = d_norm if normalize is None else bool(normalize)
        rescale = d_rescale if rescale is None else bool(rescale)
        dens = _per_model("density", density, K)
        gam = _per_model("gamma", gamma, K)
        eps = _per_model("epsilon", epsilon, K)
        for i in range(K):
            if sparsification:
                check_sparsify_args(dens[i], sparsification, gam[i], eps[i], None, argprefix="")
            else:
                _validate.number(f"density[{i}]", dens[i], lo=0.0, hi=1.0)
    seed = resolve_seed(seed)
    ts = [t.contiguous() for t in tensors]
    b = base.contiguous() if base is not None else None
    return _merge_op(method, b, ts, weights, dens, gam, eps, lambda_, normalize, rescale, seed,
                     _dispatch.requested(backend))


def merge_state_dicts(method: str, base: Optional[Dict[str, torch.Tensor]], finetuned: Sequence[Dict[str, torch.Tensor]],
                      weights: Optional[Num] = None, alpha: float = 1.0, *, backend: Optional[str] = None,
                      progress: bool = False, **kwargs) -> Dict[str, torch.Tensor]:
    """Merge whole models: ``base`` and each of ``finetuned`` map names to tensors (same keys/shapes).

    Task-arithmetic methods run :func:`merge_tensors` key by key (``alpha`` is mergekit's
    ``lambda``; other keyword arguments: ``density``, ``gamma``, ``epsilon``, ``normalize``,
    ``rescale``, ``seed``). With one ``seed``, each key gets its own Philox key derived from the
    seed and the key's name (:func:`key_seed`), so a model merge is reproducible and equals
    ``wweight merge`` with the same seed. Isotropic methods
    (``iso_c``, ``iso_cts``, ``tsv_m``) batch SVDs across all keys of the same shape
    (:func:`wweight.iso.iso_merge_state_dicts`). Non-float tensors (e.g. integer buffers) are
    copied from ``base``. Returns a new dict with ``base``'s keys, dtypes and devices.
    """
    _validate.choice("method", method, MERGE_METHODS)
    if isinstance(finetuned, dict) or not isinstance(finetuned, (list, tuple)):
        raise TypeError("finetuned must be a list of state dicts")
    if len(finetuned) == 0:
        raise ValueError("finetuned is empty: give at least one fine-tuned model")
    if method in ISO_METHODS:
        from .iso import iso_merge_state_dicts

        if weights is not None:
            raise ValueError(f"weights are not used by {method}; scale with alpha")
        return iso_merge_state_dicts(method, base, list(finetuned), alpha=alpha, backend=backend, **kwargs)
    ref_sd = base if base is not None else finetuned[0]
    if method != "linear" and base is None:
        raise ValueError(f"base is required for method {method!r}")
    keys = list(ref_sd.keys())
    for i, sd in enumerate(finetuned):
        missing = [k for k in keys if k not in sd]
        extra = [k for k in sd if k not in ref_sd]
        if missing or extra:
            raise ValueError(f"finetuned[{i}] keys differ from the base: missing {missing[:3]}, extra {extra[:3]}")
    seed = kwargs.pop("seed", None)
    seed = resolve_seed(seed)
    alpha = _validate.number("alpha", alpha)
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc=f"merge {method}")
    out = {}
    for k in it:
        b = base[k] if base is not None else None
        ts = [sd[k] for sd in finetuned]
        if not (ref_sd[k].is_floating_point()):
            out[k] = ref_sd[k].clone()
            continue
        try:
            if method == "linear":
                out[k] = merge_tensors(method, b, ts, weights, seed=key_seed(seed, k), backend=backend, **kwargs)
            else:
                out[k] = merge_tensors(method, b, ts, weights, lambda_=alpha, seed=key_seed(seed, k),
                                       backend=backend, **kwargs)
        except (ValueError, TypeError) as e:
            raise type(e)(f"key {k!r}: {e}") from None
    return out
