"""Backend ``triton`` of the ``interp`` family: the elementwise methods on the kernels of
``wweight/kernels/interp.py``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (CI).

Contract: the functions of :mod:`wweight.interp.fast` that have a kernel, with its names and
arguments (``slerp``, ``nearswap``, ``ram``, ``ramplus_tl``), so :func:`wweight.interp.ops.run`
calls either module. Each returns mergekit 0.1.5's bits (the tests compare with the reference and
mergekit). What stays torch, and why:

* slerp's norms and dot: the same torch reductions as :func:`wweight.interp.fast.slerp` (mergekit
  reduces per 1M-element chunk, then over the chunks; those roundings define the coefficients),
  kept on the device (no ``.item()``); only the blend ``coef_a * x + coef_b * y`` is a kernel;
* RAM+'s ``lambda_`` from the exact integer counts of pass 1 (K numbers);
* float64 inputs, empty tensors and RAM / RAM+ with K >= 5 models go to :mod:`~wweight.interp.fast`
  (torch's CPU K-sum order for K >= 5 depends on the column's place in its loop; on a GPU torch's
  own reduction order is what mergekit gives there).

Every launch goes through :func:`~wweight.backends.triton.launch.launch` (grid limits, the
tensors' device, no FMA contraction). Grids are 1-D, ``cdiv(n, BLOCK)`` programs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton

from ...interp import fast
from ...kernels.interp import _nearswap_kernel, _ram_count_kernel, _ram_merge_kernel, _slerp_blend_kernel
from .launch import launch
from .sparse import _ptr_table, aligned

BLOCK = 1024
#: the dtypes with kernels (16-bit: rounded after each op as torch does)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: RAM / RAM+ run on the kernel up to this many models (see the module docstring)
MAX_K = 4


def _round16(dtype) -> bool:
    return dtype != torch.float32


def _kernel_ok(x: torch.Tensor) -> bool:
    return x.dtype in DTYPES and x.numel() > 0


def grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1)


def _in_dtype(value: float, dtype) -> float:
    """``value`` rounded to ``dtype``: what torch compares a tensor with when given a Python scalar."""
    return float(torch.tensor(value, dtype=dtype))


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    if not _kernel_ok(base):
        return fast.nearswap(base, other, t)
    a, b = _flat(base), _flat(other)
    out = torch.empty_like(a)
    n = a.numel()
    launch(_nearswap_kernel, grid(n), a, b, out, n, float(t), ROUND16=_round16(a.dtype), BLOCK=BLOCK)
    return out.view(base.shape)


def _ram_inputs(base, tensors):
    b = _flat(base)
    xs = [_flat(t) for t in tensors]
    return b, xs, _ptr_table(xs), aligned(*xs, b)


def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    if not _kernel_ok(base) or len(tensors) > MAX_K:
        return fast.ram(base, tensors, epsilon)
    b, xs, table, al = _ram_inputs(base, tensors)
    out = torch.empty_like(b)
    n = b.numel()
    launch(_ram_merge_kernel, grid(n), table, b, out, b, n, _in_dtype(epsilon, b.dtype),
           K=len(xs), PLUS=False, ROUND16=_round16(b.dtype), ALIGNED=al and aligned(out), BLOCK=BLOCK)
    return out.view(base.shape)


def ramplus_tl(base: torch.Tensor, tensors: Sequence[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    if not _kernel_ok(base) or len(tensors) > MAX_K:
        return fast.ramplus_tl(base, tensors, r, alpha, epsilon)
    b, xs, table, al = _ram_inputs(base, tensors)
    K, n = len(xs), b.numel()
    eps = _in_dtype(epsilon, b.dtype)
    g = grid(n)
    part = torch.empty((g[0], K, 2), dtype=torch.int32, device=b.device)
    launch(_ram_count_kernel, g, table, b, part, n, eps, K=K, ROUND16=_round16(b.dtype), ALIGNED=al, BLOCK=BLOCK)
    counts = part.sum(dim=0, dtype=torch.int64)          # (K, 2): shared, unique
    # mergekit's lambda_ from the counts, with its ops (int64 / float32 clamp -> float32)
    rho = counts[:, 0] / counts[:, 1].clamp(min=epsilon)
    lambda_ = (1 + r * rho.clamp(min=0, max=alpha)).to(torch.float32).contiguous()
    out = torch.empty_like(b)
    launch(_ram_merge_kernel, g, table, b, out, lambda_, n, eps,
           K=K, PLUS=True, ROUND16=_round16(b.dtype), ALIGNED=al and aligned(out), BLOCK=BLOCK)
    return out.view(base.shape)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    if not _kernel_ok(v0):
        return fast.slerp(t, v0, v1, dot_threshold, eps)
    coef_a, coef_b = fast.slerp_coefficients(t, v0, v1, dot_threshold, eps)   # mergekit's reductions
    coef = torch.cat([coef_a.view(1), coef_b.view(1)]).to(torch.float32)
    a, b = _flat(v0), _flat(v1)
    out = torch.empty_like(a)
    n = a.numel()
    launch(_slerp_blend_kernel, grid(n), a, b, out, coef, n, ROUND16=_round16(a.dtype), BLOCK=BLOCK)
    return out.view(v0.shape)
