"""Task-arithmetic merges of one tensor and of whole models: the sparse family's merge op.

``linear``, ``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*``, ``della*``: mergekit 0.1.5's
``linear_merge`` and ``GeneralizedTaskArithmeticMerge`` (the method table is
:mod:`wweight.methods`). The public entry points are :func:`wweight.merge_tensors` /
:func:`wweight.merge_state_dicts` (``wweight/merge.py`` routes here); this module validates,
registers the ``torch.library`` op and runs :mod:`wweight.sparse.fused` on the resolved backend:
deltas, masks (thresholds found beforehand by radix select), rescale, weights, TIES sign election,
normalisation and lambda per element in one pass that writes only the output, never K full-size
delta temporaries (mergekit stacks them). DELLA ranks every row of every task vector: on the ``cpu``
backend a fused C++ path does it (per-row radix sort, keep bits, then one merge pass:
``csrc/cpu/della_cpu.cpp``); the other backends run the reference with thread-count independent
norms, whose numbers the fused path reproduces bit for bit.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from .. import _dispatch, _validate
from .. import methods as M
from ..reference import sparse as ref
from . import fused
from .ops import check_finite, check_sparsify_args, key_seed, primitives, resolve_backend, resolve_seed

#: sparsification methods that draw masks from the Philox stream
RANDOM_SPARSIFICATION = ("random", "della_magprune")

Num = Union[float, Sequence[float]]


def per_model(name: str, v, K: int, default=None) -> List[float]:
    """A scalar or one value per model -> K validated floats."""
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


def _merge_impl(method: str, base: Optional[torch.Tensor], tensors: List[torch.Tensor], weights: List[float],
                density: List[float], gamma: List[float], epsilon: List[float], lambda_: float, normalize: bool,
                rescale: bool, seed: int, name: str) -> torch.Tensor:
    m = M.get(method)
    K = len(tensors)
    if not m.needs_base:  # linear
        if name in ("reference", "torch"):
            out = ref.linear_ref(tensors, weights, normalize)
            finite = [torch.isfinite(t).all() for t in tensors if t.numel()]
            if finite and not bool(torch.stack(finite).all()):   # one read for all inputs
                raise ValueError("tensors contain NaN or Inf; wweight refuses non-finite weights")
            return out
        return fused.linear(primitives(name), tensors, weights, normalize)
    if m.sparsification == "della_magprune" and name == "cpu" and base.numel() and primitives(name).della_available():
        # fused C++ DELLA (csrc/cpu/della_cpu.cpp): the reference's numbers (fixed_order=True) bit for bit
        out = primitives(name).della_merge(tensors, base, weights, density, epsilon, lambda_, normalize, rescale,
                                           seed, m.consensus is not None)
        if out is not None:
            return out
    if name == "reference" or m.sparsification == "della_magprune":
        check_finite([*tensors, base], fused.input_names(K))
        # DELLA off the cpu backend (no fused path there yet) runs the reference with thread-count
        # independent norms
        return ref.task_arithmetic_family_ref(method, base, tensors, weights, density, gamma, epsilon, lambda_,
                                              normalize, rescale, seed, fixed_order=name != "reference")
    return fused.task_arithmetic(primitives(name), m.consensus, m.sparsification, base, tensors, weights, density,
                                 gamma, lambda_, normalize, rescale, seed)


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


def merge_tensors(method: M.MergeMethod, base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor],
                  weights: Optional[Num], density: Num, gamma: Num, epsilon: Num, lambda_: float,
                  normalize: Optional[bool], rescale: Optional[bool], seed: Optional[int],
                  backend: Optional[str]) -> torch.Tensor:
    """One tensor; the contract is :func:`wweight.merge_tensors`'s."""
    _check_inputs(base, tensors, need_base=method.needs_base)
    K = len(tensors)
    weights = per_model("weights", weights, K, method.default("weight"))
    lambda_ = _validate.number("lambda_", lambda_)
    normalize = method.normalize if normalize is None else bool(normalize)
    if not method.needs_base:  # linear: a weighted average of the models themselves
        if normalize and abs(sum(weights)) < 1e-12:
            raise ValueError("weights sum to 0: a normalized linear merge would divide by zero")
        dens = gam = eps = [1.0] * K
        rescale = False
    else:
        rescale = method.rescale if rescale is None else bool(rescale)
        dens = per_model("density", density, K)
        gam = per_model("gamma", gamma, K)
        eps = per_model("epsilon", epsilon, K)
        for i in range(K):
            if method.sparsification:
                check_sparsify_args(dens[i], method.sparsification, gam[i], eps[i], None, argprefix="")
            else:
                _validate.number(f"density[{i}]", dens[i], lo=M.DENSITY.range.lo, hi=M.DENSITY.range.hi)
    seed = _seed_for(method, seed)
    ts = [t.contiguous() for t in tensors]
    b = base.contiguous() if base is not None else None
    return _dispatch.run_op(_merge_op, method.name, b, ts, weights, dens, gam, eps, lambda_, normalize, rescale, seed,
                            _dispatch.requested(backend))


def _seed_for(method: M.MergeMethod, seed: Optional[int]) -> int:
    """The Philox key of a random method; deterministic methods draw nothing from torch's global
    generator (a merge must not change the caller's RNG stream when it uses no randomness)."""
    if method.sparsification in RANDOM_SPARSIFICATION:
        return resolve_seed(seed)
    return 0 if seed is None else resolve_seed(seed)


#: keyword arguments of merge_state_dicts forwarded to every key's merge_tensors
_KEY_KWARGS = ("density", "gamma", "epsilon", "lambda_", "normalize", "rescale")


def merge_state_dicts(method: M.MergeMethod, base: Optional[Dict[str, torch.Tensor]],
                      finetuned: Sequence[Dict[str, torch.Tensor]], weights: Optional[Num], alpha: float,
                      backend: Optional[str], progress: bool, **kwargs) -> Dict[str, torch.Tensor]:
    """Whole models, key by key; the contract is :func:`wweight.merge_state_dicts`'s."""
    ref_sd = base if base is not None else finetuned[0]
    if method.needs_base and base is None:
        raise ValueError(f"base is required for method {method.name!r}")
    keys = list(ref_sd.keys())
    _validate.same_keys(finetuned, ref_sd, "base")
    seed = _seed_for(method, kwargs.pop("seed", None))
    alpha = _validate.number("alpha", alpha)
    unknown = sorted(set(kwargs) - set(_KEY_KWARGS))
    kw = {"density": M.DENSITY.default, "gamma": M.GAMMA.default, "epsilon": M.EPSILON.default,
          "lambda_": M.LAMBDA.default, "normalize": None, "rescale": None}
    twice = None
    if "lambda" in method.names():  # alpha is mergekit's lambda
        if "lambda_" in kwargs:
            twice = "wweight.merge.merge_tensors() got multiple values for keyword argument 'lambda_'"
        kw["lambda_"] = alpha
    kw.update({k: v for k, v in kwargs.items() if k in _KEY_KWARGS})
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc=f"merge {method.name}")
    out = {}
    for k in it:
        b = base[k] if base is not None else None
        if not ref_sd[k].is_floating_point():
            out[k] = ref_sd[k].clone()
            continue
        try:
            if unknown or twice:
                raise TypeError(twice or f"unexpected keyword arguments for method {method.name!r}: {unknown}")
            out[k] = merge_tensors(method, b, [sd[k] for sd in finetuned], weights, kw["density"], kw["gamma"],
                                   kw["epsilon"], kw["lambda_"], kw["normalize"], kw["rescale"],
                                   key_seed(seed, k), backend)
        except (ValueError, TypeError) as e:
            raise type(e)(f"key {k!r}: {e}") from None
    return out
