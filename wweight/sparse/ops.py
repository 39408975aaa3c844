"""Sparse masks of task vectors: ``sparsify`` and the exact threshold ``kth_largest_abs``.

Papers: TIES-Merging (Yadav et al. 2023, magnitude trim), DARE (Yu et al. 2023, random drop),
Model Breadcrumbs (Davari & Belilovsky 2023, drop outliers and small values), DELLA (Deep et al.
2024, magnitude-ranked drop probabilities). Semantics are mergekit 0.1.5's
(``mergekit/sparsify.py``); the documented differences are listed in
``wweight/reference/sparse.py`` (stable tie breaking, Philox randomness).

This module is the contract (validation, ``torch.library`` registration); the work is
:mod:`wweight.sparse.fused` on the primitives of the resolved backend:
``cuda`` (``csrc/sparse.cu``), ``triton`` (``wweight/kernels/sparse.py``), ``cpu``
(``csrc/cpu/sparse_cpu.cpp``), ``torch`` (``wweight/backends/torch/sparse.py``, chunked), or
``reference`` (``wweight/reference/sparse.py``).
"""
from __future__ import annotations

import zlib
from typing import Optional

import torch

from .. import _dispatch, _validate
from ..methods import EPSILON, GAMMA
from ..reference import sparse as ref
from . import fused

SPARSIFY_METHODS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
RESCALE_NORMS = (None, "l1", "l2", "linf", "density")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(device: torch.device, backend: Optional[str], dtype: torch.dtype, op: str) -> str:
    """Backend name for a sparse op on ``device``: float64 always runs the reference."""
    # every sparse op runs on the same four primitives: "sparse_merge" names the CUDA kernel set
    name = _dispatch.resolve("sparse_merge", device, backend, family="sparse", has_cpu=True)
    if dtype not in KERNEL_DTYPES and name in ("cuda", "triton", "cpu"):
        if _dispatch.requested(backend) != "auto":
            raise TypeError(f"{op}: backend {name!r} supports float32/float16/bfloat16, got {dtype}")
        name = "torch"
    if dtype not in KERNEL_DTYPES and name == "torch":
        name = "reference"   # float64: exact torch reference (used for checking, not speed)
    return name


def primitives(name: str):
    """The sparse primitives of a resolved backend name (not ``reference``)."""
    return _dispatch.backend_module("sparse", name)


def resolve_seed(seed: Optional[int]) -> int:
    """``None`` draws a seed from torch's default generator (so ``torch.manual_seed`` reproduces it)."""
    if seed is None:
        return int(torch.randint(0, 2 ** 62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    return seed


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


def check_finite(tensors, names) -> None:
    """For the paths without a fused finiteness check (reference, DELLA): refuse NaN/Inf by name."""
    named = [(t, name) for t, name in zip(tensors, names) if t is not None and t.numel()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t).all() for t, _ in named]).tolist()   # one read for all inputs
    for (_, name), ok in zip(named, finite):
        if not ok:
            raise ValueError(f"{name} contains NaN or Inf; wweight refuses non-finite weights")


# ------------------------------------------------------------------------------ kth_largest_abs


@torch.library.custom_op("wweight::kth_largest_abs", mutates_args=())
def _kth_largest_abs_op(x: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    name = resolve_backend(x.device, backend, x.dtype, "kth_largest_abs")
    if name == "reference":
        return ref.kth_largest_abs_ref(x, k)
    return fused.kth_largest_abs(primitives(name), x, k)


@_kth_largest_abs_op.register_fake
def _(x, k, backend):
    return x.new_empty(())


def kth_largest_abs(x: torch.Tensor, k: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """Exact k-th largest ``|x|`` (1-based) over all elements, as a 0-d tensor of ``x.dtype``.

    Radix select on the magnitude bits (3 passes over memory for float32, 2 for 16-bit types),
    64-bit indexing, no sort and no copy of ``x`` (torch.quantile refuses > 16M elements;
    kthvalue/topk sort or copy). NaN counts as larger than every number (as in ``torch.sort``).

    Args:
        x: float tensor of any shape and size (float32/float16/bfloat16 on every backend; float64
           through the torch reference).
        k: 1 <= k <= x.numel().
    """
    _validate.tensor("x", x)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= x.numel():
        raise ValueError(f"k must be in [1, x.numel()={x.numel()}], got {k}")
    return _dispatch.run_op(_kth_largest_abs_op, x.contiguous(), k, _dispatch.requested(backend))


# ------------------------------------------------------------------------------ sparsify


def sparsify_impl(x: torch.Tensor, density: float, method: str, gamma: float, epsilon: float,
                  rescale_norm: Optional[str], seed: int, stream: int, name: str) -> torch.Tensor:
    if method == "della_magprune" and name == "cpu" and x.numel() and primitives(name).della_available():
        # fused C++ DELLA (csrc/cpu/della_cpu.cpp): the reference's numbers (fixed_order=True) bit for bit
        return primitives(name).della_sparsify(x, density, epsilon, rescale_norm, seed, stream)
    if name == "reference" or method == "della_magprune":
        # DELLA off the cpu backend ranks every row with a sort (as mergekit)
        out = ref.sparsify_ref(x, density, method, gamma, epsilon, rescale_norm, seed, stream,
                               fixed_order=name != "reference")
        check_finite([x], ["tensor"])
        return out
    return fused.sparsify(primitives(name), x, density, method, gamma, rescale_norm, seed, stream)


@torch.library.custom_op("wweight::sparsify", mutates_args=())
def _sparsify_op(x: torch.Tensor, density: float, method: str, gamma: float, epsilon: float,
                 rescale_norm: str, seed: int, stream: int, backend: str) -> torch.Tensor:
    name = resolve_backend(x.device, backend, x.dtype, "sparsify")
    return sparsify_impl(x, density, method, gamma, epsilon, rescale_norm or None, seed, stream, name)


@_sparsify_op.register_fake
def _(x, density, method, gamma, epsilon, rescale_norm, seed, stream, backend):
    return torch.empty_like(x)


def check_sparsify_args(density, method, gamma, epsilon, rescale_norm, argprefix=""):
    _validate.choice(argprefix + "method", method, SPARSIFY_METHODS)
    density = _validate.number(argprefix + "density", density, lo=0.0, hi=1.0)
    gamma = _validate.number(argprefix + "gamma", gamma, lo=0.0, hi=1.0)
    epsilon = _validate.number(argprefix + "epsilon", epsilon, lo=0.0, hi=1.0)
    _validate.choice(argprefix + "rescale_norm", rescale_norm, RESCALE_NORMS)
    if method == "della_magprune" and 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(f"{argprefix}epsilon must keep density +/- epsilon inside (0, 1): "
                         f"density={density}, epsilon={epsilon}")
    if rescale_norm == "density" and density <= 0:
        raise ValueError(f"{argprefix}rescale_norm='density' needs density > 0")
    return density, gamma, epsilon


def sparsify(tensor: torch.Tensor, density: float, method: str = "magnitude", gamma: float = GAMMA.default,
             epsilon: float = EPSILON.default, rescale_norm: Optional[str] = None, seed: Optional[int] = None,
             *, stream: int = 0, backend: Optional[str] = None) -> torch.Tensor:
    """Sparsify a task vector (mergekit's ``sparsify``): returns a new tensor, same shape/dtype.

    Args:
        tensor: float tensor (fp32/fp16/bf16; fp64 via the reference), any shape, any layout.
        density: fraction kept, in [0, 1]; ``>= 1`` returns a copy.
        method: ``magnitude`` (keep the ``max(1, int(density*n))`` largest |x|, TIES),
            ``random`` (keep each element with probability ``density``, DARE),
            ``magnitude_outliers`` (drop the top ``int(gamma*n)`` by |x|, keep the next
            ``int(density*n)``, Model Breadcrumbs), ``della_magprune`` (keep probability from
            ``density - epsilon`` to ``density + epsilon`` by magnitude rank along dim 1, DELLA).
        rescale_norm: ``None``, ``"l1"``, ``"l2"``, ``"linf"`` (scale the kept values so the norm
            matches the input's, as mergekit), or ``"density"`` (multiply by ``1/density``, the
            DARE paper's rescaling; mergekit's DARE merges use ``"l1"``).
        seed: key of the counter-based Philox stream for ``random``/``della_magprune`` (same
            seed -> same mask on every backend); ``None`` draws one from torch's generator.
        stream: Philox stream id (merges use the model index), for independent masks under one seed.
        gamma, epsilon: default 0.01 and 0.15, the defaults of mergekit 0.1.5's Breadcrumbs / DELLA
            *merge methods* (its YAML), so ``sparsify(x, d, "della_magprune")`` is what a DELLA
            merge does to each task vector. mergekit's low-level ``mergekit.sparsify.sparsify``
            defaults both to 0 (with ``epsilon=0`` DELLA is plain DARE, with ``gamma=0``
            Breadcrumbs keeps no outlier margin); pass ``gamma=0, epsilon=0`` for its numbers.

    0-d and one-element tensors are accepted by every method (DELLA ranks them as one row with
    keep probability ``density - epsilon``; mergekit's ``della_magprune`` fails on them).

    Ties at a magnitude cut are broken by lowest flat index (a stable sort's order); see
    ``wweight/reference/sparse.py`` for this and the other documented differences from mergekit.
    """
    _validate.tensor("tensor", tensor)
    density, gamma, epsilon = check_sparsify_args(density, method, gamma, epsilon, rescale_norm)
    seed = resolve_seed(seed)
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2 ** 32:
        raise ValueError(f"stream must be an int in [0, 2**32), got {stream!r}")
    return _dispatch.run_op(_sparsify_op, tensor.contiguous(), density, method, gamma, epsilon, rescale_norm or "",
                            seed, stream, _dispatch.requested(backend))
