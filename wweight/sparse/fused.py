"""The sparse family's ops written once on the four primitives of any backend.

``prims`` is a backend module (``wweight/backends/<backend>/sparse.py``: ``digit_hist``,
``tie_counts``, ``rescale_stats``, ``merge``). These functions hold no validation and no
dispatch: the op layer (:mod:`wweight.sparse.ops`, :mod:`wweight.sparse.merge`) checks the
arguments and picks ``prims``; the CUDA self-test runs the same functions on the CUDA primitives
against the reference. Every element is touched only inside the primitives: radix-select
passes for the thresholds, one optional statistics pass for the rescale, one fused merge pass.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .._ext import device_tensor, empty_like
from .plan import build_plan, key_to_value, radix_select, rescale_factors, work_dtype


def raise_on_flags(flags: torch.Tensor, names: Sequence[str]) -> None:
    """The fused pass flags inputs holding NaN/Inf; raise naming them (one read of the flags)."""
    bad = [name for name, f in zip(names, flags.tolist()) if f] if flags.numel() else []
    if bad:
        raise ValueError(f"{', '.join(bad)} contain(s) NaN or Inf; wweight refuses non-finite weights")


def input_names(K: int) -> List[str]:
    return [f"tensors[{i}]" for i in range(K)] + ["base"]


def kth_largest_abs(prims, x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest ``|x|`` (0-d, ``x.dtype``) by radix select on the magnitude bits."""
    dev = x.device
    if hasattr(prims, "select"):       # the CPU's one-pass select (see plan._select), radix passes if it misses
        res, _ = prims.select([x], None, [0], [k])
        if int(res[0, 3]):
            return key_to_value(res[:1, 0], x.dtype)[0].clone()
    keys, _, _ = radix_select(prims, [x], None, torch.zeros(1, dtype=torch.int64, device=dev),
                              torch.full((1,), k, dtype=torch.int64, device=dev), x.dtype)
    return key_to_value(keys, x.dtype)[0].clone()


def sparsify(prims, x: torch.Tensor, density: float, method: str, gamma: float,
             rescale_norm: Optional[str], seed: int, stream: int) -> torch.Tensor:
    """mergekit's ``sparsify`` for the fused methods (magnitude, random, magnitude_outliers)."""
    plan = build_plan(prims, [x], None, method, [density], [gamma], seed, stream)
    wdt = work_dtype(x.dtype, method)
    scales = rescale_factors(prims, [x], None, plan, rescale_norm, [density], x.dtype, wdt)
    out = empty_like(x)
    ones = torch.ones(1, dtype=torch.float32, device=x.device)
    flags = prims.merge([x], None, out, plan, ones, scales, 1.0, 1.0, False, False, sparsify_only=True)
    raise_on_flags(flags, ["tensor"])
    return out


def linear(prims, tensors: List[torch.Tensor], weights: List[float], normalize: bool) -> torch.Tensor:
    """mergekit's ``linear`` merge: fp32 weighted sum (/ the fp32 sum of the weights)."""
    K = len(tensors)
    plan = build_plan(prims, tensors, None, None, [1.0] * K, [0.0] * K, 0)
    w = device_tensor(weights, torch.float32, tensors[0].device)
    # mergekit divides by the float32 sum of the float32 weights
    div = float(torch.tensor(weights, dtype=torch.float32).sum()) if normalize else 1.0
    out = empty_like(tensors[0])
    flags = prims.merge(tensors, None, out, plan, w, torch.ones_like(w), 1.0, div, False, normalize,
                        round16=False)
    raise_on_flags(flags, input_names(K))
    return out


def task_arithmetic(prims, consensus: Optional[str], sparsification: Optional[str], base: torch.Tensor,
                    tensors: List[torch.Tensor], weights: List[float], density: List[float], gamma: List[float],
                    lambda_: float, normalize: bool, rescale: bool, seed: int) -> torch.Tensor:
    """mergekit's ``GeneralizedTaskArithmeticMerge.merge_group`` in one fused pass (after the plan)."""
    K = len(tensors)
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
    out = empty_like(base)
    w = device_tensor(w_dt.float(), torch.float32, base.device)
    flags = prims.merge(tensors, base, out, plan, w, scales, lambda_, div_nc, consensus is not None, normalize)
    raise_on_flags(flags, input_names(K))
    return out
