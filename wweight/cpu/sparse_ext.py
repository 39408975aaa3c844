"""The sparse primitives on the C++/OpenMP extension ``wweight._cpu`` (``csrc/cpu/sparse_cpu.cpp``).

Same contract as ``wweight/cpu/sparse.py`` (torch) and ``kernels/sparse.py`` (Triton): the
backend ``cpu`` of ``wweight._dispatch``. Inputs are contiguous CPU tensors.
"""
from __future__ import annotations

import torch

from .. import _dispatch
from .._cuda_util import dtype_code
from ..sparse_plan import BLOCK


def _ext():
    return _dispatch.cpu_extension()


def _ptrs(xs):
    return [x.data_ptr() for x in xs]


def _args(xs, base):
    ref = base if base is not None else xs[0]
    return _ptrs(xs), (base.data_ptr() if base is not None else 0), dtype_code(ref), ref.numel()


def digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix):
    out = torch.zeros((qmodel.numel(), 1 << nbits), dtype=torch.int64)
    _ext().sparse_digit_hist(*_args(xs, base), qmodel.tolist(), prefix.tolist(), shift, nbits, high_shift,
                             bool(has_prefix), out.data_ptr())
    return out


def tie_counts(xs, base, qmodel, qkey):
    n = (base if base is not None else xs[0]).numel()
    out = torch.zeros((qmodel.numel(), (n + BLOCK - 1) // BLOCK), dtype=torch.int64)
    _ext().sparse_tie_counts(*_args(xs, base), qmodel.tolist(), qkey.tolist(), out.data_ptr())
    return out


def _plan_args(plan):
    ties = plan.tie_offsets.data_ptr() if plan.has_ties else 0
    seed = (plan.seed_hi << 32) | plan.seed_lo
    return plan.mode, plan.kp.data_ptr(), ties, plan.density.tolist(), seed, plan.stream0


def rescale_stats(xs, base, plan, norm):
    out = torch.zeros((len(xs), 2), dtype=torch.float64)
    _ext().sparse_rescale_stats(*_args(xs, base), *_plan_args(plan), {"l1": 1, "l2": 2, "linf": 3}[norm],
                                out.data_ptr())
    return out


def merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only=False,
          round16=None):
    ref = base if base is not None else xs[0]
    flags = torch.zeros(len(xs) + 1, dtype=torch.int32)
    r16 = ref.dtype in (torch.float16, torch.bfloat16) if round16 is None else bool(round16)
    _ext().sparse_merge(*[_ptrs(xs), base.data_ptr() if base is not None else 0, out.data_ptr(), dtype_code(ref),
                          ref.numel()], *_plan_args(plan), weights.tolist(), scales.tolist(), float(lam),
                        float(divisor_nc), bool(consensus), bool(normalize), bool(sparsify_only), r16,
                        flags.data_ptr())
    return flags
