"""The sparse primitives on the C++/OpenMP extension ``wweight._cpu`` (``csrc/cpu/sparse_cpu.cpp``).

Backend ``cpu`` of the sparse family (contract: ``wweight/backends/__init__.py``). Inputs are
contiguous CPU tensors; the small per-model arrays (queries, densities, weights) travel as lists.
"""
from __future__ import annotations

import torch

from ..._ext import cpu_extension, dtype_code, ptr, ptrs
from ...sparse.plan import BLOCK, NORM_CODES, first, round16 as _round16


def _args(xs, base):
    x0 = first(xs, base)
    return ptrs(xs), ptr(base), dtype_code(x0), x0.numel()


def digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix):
    out = torch.zeros((qmodel.numel(), 1 << nbits), dtype=torch.int64)
    cpu_extension().sparse_digit_hist(*_args(xs, base), qmodel.tolist(), prefix.tolist(), shift, nbits, high_shift,
                                      bool(has_prefix), out.data_ptr())
    return out


def tie_counts(xs, base, qmodel, qkey):
    n = first(xs, base).numel()
    out = torch.zeros((qmodel.numel(), (n + BLOCK - 1) // BLOCK), dtype=torch.int64)
    cpu_extension().sparse_tie_counts(*_args(xs, base), qmodel.tolist(), qkey.tolist(), out.data_ptr())
    return out


def rescale_stats(xs, base, plan, norm):
    out = torch.zeros((len(xs), 2), dtype=torch.float64)
    cpu_extension().sparse_rescale_stats(*_args(xs, base), *plan.raw_args(plan.density.tolist()),
                                         NORM_CODES[norm], out.data_ptr())
    return out


def merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only=False,
          round16=None):
    ref = first(xs, base)
    flags = torch.zeros(len(xs) + 1, dtype=torch.int32)
    cpu_extension().sparse_merge(ptrs(xs), ptr(base), out.data_ptr(), dtype_code(ref), ref.numel(),
                                 *plan.raw_args(plan.density.tolist()), weights.tolist(), scales.tolist(), float(lam),
                                 float(divisor_nc), bool(consensus), bool(normalize), bool(sparsify_only),
                                 _round16(ref.dtype, round16), flags.data_ptr())
    return flags
