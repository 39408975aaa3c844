"""PEFT's merge utilities on wweight's ops: ``install()`` / ``uninstall()``.

``install()`` replaces ``task_arithmetic``, ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties``,
``prune`` and ``magnitude_based_pruning`` of ``peft.utils.merge_utils`` (PEFT 0.21; papers: TIES-Merging,
Yadav et al. 2023; DARE, Yu et al. 2023) with wrappers of the same signatures, in that module *and* in
every loaded ``peft.*`` module that imported them by name (``peft.tuners.lora.model`` does, at its top), so
``LoraModel.add_weighted_adapter(combination_type="ties" | "dare_ties" | "dare_linear" |
"magnitude_prune" | "linear" | the ``*_svd`` variants)`` runs them. ``uninstall()`` puts the originals back.
Both are idempotent. Importing wweight never imports peft; importing this module does.

**The numbers are PEFT's, bit for bit** (tests/test_integration_peft.py compares against the originals on
hundreds of random stacks). The wrappers use wweight only where wweight's result is provably PEFT's, and
otherwise run PEFT's own code (never a different number):

* **magnitude pruning** (``prune(method="magnitude")``, inside ``magnitude_prune`` and ``ties``): PEFT keeps
  the ``k = int(density * numel)`` largest ``|x|`` by ``torch.topk``. The wrapper finds the exact k-th
  largest magnitude ``t`` with :func:`wweight.kth_largest_abs` (radix select, no sort) and keeps
  ``|x| >= t``, multiplying by the 0/1 mask in the tensor's dtype as PEFT does (so even signed zeros
  match). Exactly equal to PEFT's when ``|x| >= t`` holds exactly k elements, or when ``t == 0`` (the
  choice among zeros changes no bit). When several elements tie at a nonzero ``t`` the kept subset is
  ``torch.topk``'s unspecified choice (libstdc++'s nth_element / partial_sort order): PEFT's original
  runs. That is the rule, not the exception, for bfloat16/float16 tensors of more than 2**15 elements
  (more elements than distinct magnitudes), so those go to ``torch.topk`` without the check; on float32
  it happens at the cut of large tensors too (measured: 3 of 30 random normal 4096x1024 tensors at
  density 0.2). Also the original for ``k == 0``, NaN/Inf, non-float dtypes, empty tensors, autograd
  inputs, ``density >= 1`` / ``< 0`` (its warning / error).
* **the weighted sums** (``task_arithmetic``; the sum after pruning in ``magnitude_prune`` /
  ``dare_linear``; the masked sum in ``ties`` / ``dare_ties``): PEFT computes ``(stack * w).sum(0)``, with
  the product and the sum rounded separately and torch's type promotion (``bf16`` tensors times the
  ``float32`` weights ``add_weighted_adapter`` builds give a ``float32`` result). wweight's C++ ``linear``
  kernel (``merge_tensors("linear", normalize=False)`` on float32 copies) computes the same sum in the
  same order -- **but only on CPU tensors, for K <= 4 tensors, with a float32 result and the ``cpu``
  backend**: for K >= 5 torch's CPU reduction order depends on the column (a vectorised body and a
  multi-accumulator tail), and torch's CUDA reduction order is not documented (nothing here has run on
  a GPU). Every other case runs PEFT's expression in torch.
* **sign election** (``majority_sign_method="total" | "frequency"``) and the disjoint merge's division
  by ``max(count, 1)``: PEFT's own ``calculate_majority_sign_mask`` and torch's division. wweight's fused
  TIES path is not used: it elects signs on the *weighted* deltas and divides by the summed weights of
  the agreeing models (mergekit's semantics), PEFT elects on the unweighted pruned tensors and divides by
  their count, so its numbers differ whenever the weights are not all 1.
* **random pruning** (DARE): PEFT's own ``random_pruning`` (``torch.bernoulli`` on the global generator),
  so a seeded run draws the same masks and consumes the generator exactly as without ``install()``.
  wweight's DARE masks come from a counter-based Philox stream keyed by a seed, a different mask;
  substituting it would silently change both the numbers and the user's RNG state.

In short, wweight runs: the top-k selection of every magnitude prune (any device, any K), and the
weighted sums on CPU for up to 4 tensors -- for tensors of at least ``min_numel`` elements (default
65536; smaller ones, e.g. most LoRA factors, run PEFT's code, which is faster there). ``backend``
(``install(backend="cpu")`` etc.) is passed to those ops; a backend other than ``cpu`` (or ``auto``
resolving to it) leaves the sums in torch.
"""
from __future__ import annotations

import importlib
import math
import sys
import threading
from typing import Dict, List, Literal, Optional, Tuple

import torch

from .. import _dispatch

#: the PEFT functions replaced, by name (all live in ``peft.utils.merge_utils``)
PATCHED = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "prune",
           "magnitude_based_pruning")

#: the fast weighted sum matches torch's ``sum(dim=0)`` on CPU only up to this many tensors
MAX_K_CPU_SUM = 4
#: products below this magnitude cannot round to float32 infinity (max float32 is ~3.4028e38)
_F32_SAFE = 3.0e38

_lock = threading.Lock()
_orig: Dict[str, object] = {}                  # name -> PEFT's original function
_patched: List[Tuple[object, str, object]] = []  # (module, attribute, original) to restore
#: ~number of distinct finite positive bf16 / fp16 magnitudes (2**15 - 2**7 / 2**15 - 2**10)
_DISTINCT_16BIT = 1 << 15
#: default ``min_numel``: below it PEFT's own code is faster than any kernel launch / thread start-up
MIN_NUMEL = 1 << 16
_state = {"backend": None, "min_numel": MIN_NUMEL}
#: how often each path ran (for tests and curiosity; never reset here): "<what>_wweight" / "<what>_peft"
stats: Dict[str, int] = {}


def _count(key: str) -> None:
    stats[key] = stats.get(key, 0) + 1


def _grad_needed(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


# ------------------------------------------------------------------------------ magnitude pruning


def _magnitude_keep(tensor: torch.Tensor, density: float) -> Optional[torch.Tensor]:
    """PEFT's ``magnitude_based_pruning`` on wweight's exact threshold, or None where it may differ."""
    import wweight

    if (not isinstance(tensor, torch.Tensor) or tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or tensor.numel() == 0 or tensor.numel() < _state["min_numel"] or _grad_needed(tensor)):
        return None
    if tensor.dtype != torch.float32 and tensor.numel() > _DISTINCT_16BIT:
        return None   # more elements than 16-bit magnitudes: ties at the cut are near certain (measured)
    k = int(density * tensor.numel())
    if not 1 <= k <= tensor.numel():   # topk(k=0) keeps nothing (PEFT's code is as fast); k > numel: its error
        return None
    x = tensor.detach()
    t = wweight.kth_largest_abs(x, k, backend=_state["backend"])
    keep = x.abs() >= t
    # one host read for three facts: how many pass the cut, whether t == 0, whether x is finite
    n_keep, t_zero, finite = torch.stack([keep.sum(), (t == 0).long(), torch.isfinite(x).all().long()]).tolist()
    if not finite:
        return None
    if n_keep != k and not t_zero:   # ties at a nonzero cut: topk's choice among them is unspecified
        return None
    # PEFT multiplies by a 0/1 mask of the tensor's dtype: the same product gives the same signed zeros
    return tensor * keep.to(tensor.dtype)


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    out = _magnitude_keep(tensor, density)
    if out is None:
        _count("magnitude_peft")
        return _orig["magnitude_based_pruning"](tensor, density)
    _count("magnitude_wweight")
    return out


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    if method == "magnitude" and isinstance(density, (int, float)) and 0 <= density < 1:
        return magnitude_based_pruning(tensor, density)
    # density >= 1 (PEFT warns and returns the input), < 0 (its error), random (its RNG), unknown method
    return _orig["prune"](tensor, density, method=method, rescale=rescale)


# ------------------------------------------------------------------------------ weighted sums


def _sum_on_wweight(tensors: List[torch.Tensor], weights) -> Optional[List[float]]:
    """The weights as floats when wweight's linear kernel gives torch's ``(stack * w).sum(0)``, else None."""
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or weights.dim() != 1:
        return None
    K = len(tensors)
    if not 1 <= K <= MAX_K_CPU_SUM or weights.numel() != K or weights.device.type != "cpu":
        return None
    first = tensors[0]
    if (not isinstance(first, torch.Tensor) or first.device.type != "cpu" or first.numel() == 0
            or first.numel() < _state["min_numel"]):
        return None
    if first.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    for t in tensors:
        if (not isinstance(t, torch.Tensor) or t.shape != first.shape or t.dtype != first.dtype
                or t.device != first.device):
            return None   # torch.stack's error (or promotion) is PEFT's business
    # the stack has >= 1 dims and so has weights: plain dtype promotion decides the result dtype
    if torch.promote_types(first.dtype, weights.dtype) != torch.float32:
        return None
    if _grad_needed(weights, *tensors):
        return None
    try:
        if _dispatch.resolve("sparse_merge", first.device, _state["backend"], family="sparse",
                             has_cpu=True) != "cpu":
            return None   # the torch / reference linear merges use a fused multiply-add (mergekit's addcmul)
    except RuntimeError:
        return None
    w = [float(v) for v in weights.tolist()]
    if not all(math.isfinite(v) for v in w):
        return None
    return w


def _weighted_sum(tensors: List[torch.Tensor], weights: torch.Tensor, what: str) -> torch.Tensor:
    """PEFT's ``(stack(tensors) * reshape(weights)).sum(dim=0)``."""
    import wweight

    w = _sum_on_wweight(tensors, weights)
    if w is not None:
        try:
            # seed=0: merge_tensors draws a seed from torch's global generator when given None, which
            # would change the user's RNG stream (linear uses no randomness)
            out = wweight.merge_tensors("linear", None, [t.detach().float() for t in tensors], weights=w,
                                        normalize=False, seed=0, backend=_state["backend"])
            _count(what + "_wweight")
            return out
        except ValueError as e:
            if "NaN or Inf" not in str(e):
                raise
            # PEFT propagates NaN/Inf (e.g. DARE at density 0 divides 0 by 0); wweight refuses them
    _count(what + "_peft")
    stack = torch.stack(tensors, dim=0)
    return (stack * _orig_reshape()(stack, weights)).sum(dim=0)


def _orig_reshape():
    import peft.utils.merge_utils as mu

    return mu.reshape_weight_task_tensors


def _disjoint(pruned: List[torch.Tensor], weights: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """PEFT's sign election and ``disjoint_merge`` of the weighted, pruned tensors."""
    import peft.utils.merge_utils as mu

    stack = torch.stack(pruned, dim=0)
    mask = mu.calculate_majority_sign_mask(stack, method=majority_sign_method)
    w = _sum_on_wweight(pruned, weights)
    # (p*w)*m == (p*m)*w for m in {0, 1}, signed zeros included -- unless p*w overflows to inf, which
    # PEFT then multiplies by 0 into NaN: bound the products (float64, exact enough) before reordering
    if w is None or float(stack.abs().max()) * max(abs(v) for v in w) >= _F32_SAFE:
        _count("disjoint_peft")
        return mu.disjoint_merge(stack * mu.reshape_weight_task_tensors(stack, weights), mask)
    # mask first, then wweight's weighted sum
    masked = [p * m for p, m in zip(pruned, mask.unbind(0))]
    mixed = _weighted_sum(masked, weights, "disjoint")
    return mixed / torch.clamp(mask.sum(dim=0), min=1.0)


# ------------------------------------------------------------------------------ the replacements


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return _weighted_sum(list(task_tensors), weights, "sum")


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    pruned = [prune(tensor, density, method="magnitude") for tensor in task_tensors]
    return _weighted_sum(pruned, weights, "sum")


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    pruned = [prune(tensor, density, method="magnitude") for tensor in task_tensors]
    return _disjoint(pruned, weights, majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    pruned = [_orig["prune"](tensor, density, method="random", rescale=True) for tensor in task_tensors]
    return _weighted_sum(pruned, weights, "sum")


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    pruned = [_orig["prune"](tensor, density, method="random", rescale=True) for tensor in task_tensors]
    return _disjoint(pruned, weights, majority_sign_method)


_REPLACEMENTS = {f.__name__: f for f in (task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties, prune,
                                         magnitude_based_pruning)}


def _decorate(mu) -> None:
    """PEFT's docstrings on the wrappers, plus where the work runs."""
    for name, fn in _REPLACEMENTS.items():
        if not getattr(fn, "_wweight_doc", False):
            fn.__doc__ = ((getattr(mu, name).__doc__ or "").rstrip() + "\n\n    Installed by "
                          "wweight.integrations.peft: same numbers as PEFT's; see that module for what runs on "
                          "wweight.\n")
            fn._wweight_doc = True


def install(*, backend: Optional[str] = None, min_numel: int = MIN_NUMEL) -> None:
    """Run PEFT's merge utilities (and ``add_weighted_adapter``) on wweight's ops, with PEFT's numbers.

    Args:
        backend: wweight backend for the ops the wrappers call (``None``: the usual choice; see
            ``wweight.use_backend``).
        min_numel: tensors with fewer elements run PEFT's own code (default 65536: on the 2-core CPU
            machine one wweight call costs ~0.3-1 ms where ``torch.topk`` of 2,000 elements takes 0.02
            ms; at 1M elements ``kth_largest_abs`` took 18 ms, ``topk`` 106 ms). 0 sends every tensor
            to wweight (the tests do). Calling ``install`` again only changes ``backend`` / ``min_numel``.

    Patches ``peft.utils.merge_utils`` and every loaded ``peft.*`` module holding the same function
    objects (``peft.tuners.lora.model`` is imported first so its top-level import is caught). A
    ``peft`` module imported *after* ``install`` that copies the names gets the wrappers (it copies
    them from ``merge_utils``); ``uninstall`` restores those too. Raises ``ModuleNotFoundError``
    when peft is not installed.
    """
    if backend is not None:
        _dispatch.requested(backend)   # ValueError naming ``backend`` for an unknown name
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"min_numel must be an int >= 0, got {min_numel!r}")
    with _lock:
        _state["backend"] = backend
        _state["min_numel"] = min_numel
        if _patched:
            return
        mu = importlib.import_module("peft.utils.merge_utils")
        importlib.import_module("peft.tuners.lora.model")
        for name in PATCHED:
            _orig[name] = getattr(mu, name)
        _decorate(mu)
        originals = {id(f): name for name, f in _orig.items()}
        for modname, mod in list(sys.modules.items()):
            if mod is None or not (modname == "peft" or modname.startswith("peft.")):
                continue
            for attr, val in list(vars(mod).items()):
                name = originals.get(id(val))
                if name is not None and val is _orig[name]:
                    _patched.append((mod, attr, val))
                    setattr(mod, attr, _REPLACEMENTS[name])


def uninstall() -> None:
    """Put PEFT's original functions back everywhere ``install`` replaced them (no-op if not installed)."""
    with _lock:
        if not _patched:
            return
        # every loaded peft module holding a wrapper, also those imported after install()
        wrappers = {id(f): name for name, f in _REPLACEMENTS.items()}
        for modname, mod in list(sys.modules.items()):
            if mod is None or not (modname == "peft" or modname.startswith("peft.")):
                continue
            for attr, val in list(vars(mod).items()):
                name = wrappers.get(id(val))
                if name is not None and val is _REPLACEMENTS[name]:
                    setattr(mod, attr, _orig[name])
        _patched.clear()
        _state["backend"] = None
        _state["min_numel"] = MIN_NUMEL


def installed() -> bool:
    """Whether ``install()`` is in effect."""
    return bool(_patched)


def originals() -> Dict[str, object]:
    """PEFT's original functions by name (captured at the first ``install``; empty before)."""
    return dict(_orig)
