"""Plain-PyTorch references for the sparse op family (mergekit 0.1.5 semantics).

These are deliberately small and literal: they follow ``mergekit/sparsify.py`` and
``mergekit/merge_methods/generalized_task_arithmetic.py`` line by line, computing in the
tensor's own dtype exactly where mergekit does (so bf16/fp16 round at the same points).
Every kernel and the fast CPU path in ``wweight/backends/torch/sparse.py`` is tested against them.

Deliberate, documented differences from mergekit:

* **Ties at a magnitude threshold.** mergekit keeps ``argsort(|x|, descending=True)[:k]``
  with torch's *unstable* sort, whose choice among equal magnitudes depends on the torch
  version, the device and the data. wweight keeps, among elements tied at the threshold,
  those with the lowest flat index first, i.e. exactly what mergekit returns with
  ``stable=True`` (which torch also uses for small tensors). The number kept and every element
  strictly above the threshold are identical to mergekit in all cases; on data without ties
  the kept sets are identical. Breadcrumbs (``magnitude_outliers``) uses the same stable
  ascending order: at the lower cut the lowest indices are dropped first, at the upper cut
  the highest indices are dropped first.
* **Randomness.** DARE / DELLA draw from a counter-based Philox4x32-10 stream keyed by
  ``seed`` and indexed by the element's flat index (``wweight/reference/philox.py``) instead
  of ``torch.bernoulli``; the same seed gives the same mask on every backend and device.
  Element ``i`` is kept with probability ``p`` iff ``u_i < p`` with ``u_i`` uniform on
  [0, 1) in steps of 2^-24.
* **DELLA on rows of length 1.** mergekit divides 0 by 0 there (NaN probability); wweight
  uses rank 0, i.e. probability ``density - epsilon``.
* ``density >= 1`` returns a copy instead of the input object (outputs never alias inputs).
* ``rescale_norm="density"`` (not in mergekit): the DARE paper's ``1 / density`` rescaling.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._ext import device_tensor
from ..methods import EPSILON, GAMMA, TA_METHODS  # TA_METHODS: name -> (consensus, sparsification, normalize, rescale)
from .philox import philox_uniform

EPS = 1e-7


def kth_largest_abs_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest ``|x|`` (1-based) as a 0-d tensor of ``x.dtype``; NaN counts as largest."""
    a = x.detach().abs().reshape(-1)
    return torch.kthvalue(a, a.numel() - k + 1).values.to(x.dtype)


def _stable_desc(w: torch.Tensor) -> torch.Tensor:
    return torch.argsort(w, descending=True, stable=True)


_NORM_BLOCK = 4096


def fixed_order_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum()`` (a 0-d tensor of ``x.dtype``) whose value does not depend on the thread count.

    torch splits a full reduction of a large tensor over its threads, so ``x.abs().sum()`` (what
    mergekit computes for the l1/l2 rescale norms) can change in its last bits with
    ``OMP_NUM_THREADS``; a last-bit change of the rescale factor moves many elements by one ulp.
    Here rows of ``_NORM_BLOCK`` elements are summed in float64 (a reduction over dim 1 with >= 2
    rows is parallelised over rows, each row summed in a fixed order) and the row sums are added
    with ``math.fsum`` (correctly rounded, so their order does not matter), then rounded once to
    ``x.dtype`` -- the same rounding point as mergekit's in-dtype sum.
    """
    import math

    flat = x.reshape(-1).double()
    n = flat.numel()
    pad = (-n) % _NORM_BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    parts = flat.view(-1, _NORM_BLOCK).sum(dim=1)  # one row (4096 < torch's parallel grain): one thread
    return torch.tensor(math.fsum(parts.tolist()), dtype=torch.float64).to(x.dtype)


def rescaled_masked_tensor(tensor: torch.Tensor, mask: torch.Tensor, norm: Optional[str],
                           density: Optional[float] = None, fixed_order: bool = False) -> torch.Tensor:
    """mergekit's ``rescaled_masked_tensor`` (computed in ``tensor.dtype``).

    ``fixed_order``: the l1 / l2 norms by :func:`fixed_order_sum` (independent of the thread count;
    the non-reference DELLA path) instead of torch's full reduction (mergekit's literal code)."""
    masked = tensor * mask
    if norm is None:
        return masked
    if norm == "density":
        return masked * torch.tensor(1.0 / density, dtype=tensor.dtype)
    if norm in ("l1", "l2") and fixed_order:
        if norm == "l1":
            before, after = fixed_order_sum(tensor.abs()), fixed_order_sum(masked.abs())
        else:  # the sum of squares in float64, its square root rounded once to the dtype
            before = fixed_order_sum(tensor.double().square()).sqrt().to(tensor.dtype)
            after = fixed_order_sum(masked.double().square()).sqrt().to(tensor.dtype)
    elif norm == "l1":
        before, after = tensor.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = tensor.norm(), masked.norm()
    elif norm == "linf":
        before, after = tensor.abs().max(), masked.abs().max()
    else:
        raise NotImplementedError(norm)
    if before < EPS or after < EPS:
        return masked
    return masked * (before / after)


def magnitude_ref(tensor, density, rescale_norm=None):
    if density >= 1:
        return tensor.clone()
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    w = tensor.abs().reshape(-1).float()
    mask[_stable_desc(w)[:k]] = 1
    return rescaled_masked_tensor(tensor, mask.reshape_as(tensor), rescale_norm, density)


def magnitude_outliers_ref(tensor, density, rescale_norm=None, gamma=GAMMA.default):
    if density >= 1:
        return tensor.clone()
    n = tensor.numel()
    target_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    w = tensor.abs().reshape(-1).float()
    idx = torch.sort(w, descending=False, stable=True).indices
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[idx[n_bot:n_bot + target_n]] = 1
    return rescaled_masked_tensor(tensor, mask.reshape_as(tensor), rescale_norm, density)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # mergekit upcasts fp16 to fp32 on CPU (torch.bernoulli has no fp16 CPU kernel); wweight
    # uses that rule on every device so results do not depend on where they were computed.
    return torch.float32 if t.dtype == torch.float16 else t.dtype


def bernoulli_ref(tensor, density, rescale_norm=None, seed=0, stream=0):
    if density >= 1:
        return tensor.clone()
    wd = _work_dtype(tensor)
    u = philox_uniform(tensor.numel(), seed, stream, device=tensor.device).reshape(tensor.shape)
    # mergekit draws with probability density rounded to the work dtype (torch.full_like(..., dtype=wd))
    p = torch.tensor(density, dtype=wd).float()
    mask = (u < p).to(wd)
    return rescaled_masked_tensor(tensor.to(wd), mask, rescale_norm, density).to(tensor.dtype)


def della_probabilities_ref(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities (work dtype, shape of ``tensor``): ranks along dim 1, computed in
    mergekit's work dtype (so bf16 tensors get bf16-rounded ranks, exactly as mergekit).

    0-d and 1-D tensors are ranked as one row (``reshape(1, -1)``): mergekit's ``unsqueeze(0)``
    leaves a 0-d tensor 1-D and fails with an IndexError, and a row of one element gives it 0/0 =
    NaN probabilities (``torch.bernoulli`` then raises). Here a row whose ranks are all equal gets
    rank_norm 0, i.e. keep probability ``density - epsilon``, so every shape merges."""
    wd = _work_dtype(tensor)
    if tensor.numel() == 0:          # an empty tensor has no ranks (min/max over an empty row fail)
        return torch.zeros(tensor.shape, dtype=wd, device=tensor.device)
    t = tensor if tensor.dim() >= 2 else tensor.reshape(1, -1)
    mags = t.abs()
    ranks = torch.argsort(torch.argsort(mags, dim=1, stable=True), dim=1).to(wd) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    span = hi - lo
    rank_norm = torch.where(span > 0, (ranks - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                            torch.zeros_like(ranks)).clamp(0, 1)
    p = (density - epsilon) + rank_norm * 2 * epsilon
    return p.reshape(tensor.shape)


def della_magprune_ref(tensor, density, epsilon, rescale_norm=None, seed=0, stream=0, fixed_order=False):
    if density >= 1:
        return tensor.clone()
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    wd = _work_dtype(tensor)
    p = della_probabilities_ref(tensor, density, epsilon)
    u = philox_uniform(tensor.numel(), seed, stream, device=tensor.device).reshape(tensor.shape)
    mask = (u < p.float()).to(wd)
    return rescaled_masked_tensor(tensor.to(wd), mask, rescale_norm, density, fixed_order).to(tensor.dtype)


def sparsify_ref(tensor, density, method="magnitude", gamma=GAMMA.default, epsilon=EPSILON.default, rescale_norm=None,
                 seed=0, stream=0, fixed_order=False):
    if tensor.numel() == 0:   # nothing to keep or rescale (norms of an empty tensor would fail)
        return tensor.clone()
    if method == "magnitude":
        return magnitude_ref(tensor, density, rescale_norm)
    if method == "random":
        return bernoulli_ref(tensor, density, rescale_norm, seed, stream)
    if method == "magnitude_outliers":
        return magnitude_outliers_ref(tensor, density, rescale_norm, gamma)
    if method == "della_magprune":
        return della_magprune_ref(tensor, density, epsilon, rescale_norm, seed, stream, fixed_order)
    raise NotImplementedError(method)


def get_mask_ref(delta: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """mergekit's ``get_mask(method="sum")``: TIES sign election on stacked weighted deltas."""
    sign = delta.sign().to(mask_dtype)
    sign_weight = delta.sum(dim=0)
    majority_sign = (sign_weight >= 0).to(mask_dtype) * 2 - 1
    return sign == majority_sign


def task_arithmetic_family_ref(method: str, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                               weights: Sequence[float], density: Sequence[float], gamma: Sequence[float],
                               epsilon: Sequence[float], lambda_: float = 1.0, normalize: Optional[bool] = None,
                               rescale: Optional[bool] = None, seed: int = 0,
                               fixed_order: bool = False) -> torch.Tensor:
    """mergekit's ``GeneralizedTaskArithmeticMerge.merge_group`` for one tensor.

    Per-model lists ``weights``, ``density``, ``gamma``, ``epsilon``; model ``t``'s random mask
    uses Philox stream ``t`` of ``seed``.
    """
    consensus, sparsification, d_norm, d_rescale = TA_METHODS[method]
    normalize = d_norm if normalize is None else normalize
    rescale = d_rescale if rescale is None else rescale
    if not tensors:
        return base.clone()
    deltas = base.new_empty((len(tensors), *base.shape))
    for i, t in enumerate(tensors):
        delta = t - base
        if sparsification:
            delta = sparsify_ref(delta, density[i], sparsification, gamma=gamma[i], epsilon=epsilon[i],
                                 rescale_norm="l1" if rescale else None, seed=seed, stream=i,
                                 fixed_order=fixed_order)
        deltas[i] = delta
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        mask = get_mask_ref(deltas, base.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def linear_ref(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """mergekit's ``linear_merge``: weighted sum in fp32 (fp64 for fp64 inputs), / sum(weights)."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weights), dtype=dtype)
    wd = device_tensor(torch.cat([w, w.sum().reshape(1)]), dtype, first.device)  # weights, then their host sum
    result = torch.zeros_like(first, dtype=dtype)
    for i, t in enumerate(tensors):
        result.addcmul_(t.to(dtype), wd[i])
    if normalize:
        result.div_(wd[-1])
    return result.to(first.dtype)
