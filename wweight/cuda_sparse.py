"""The sparse primitives on the CUDA extension (``csrc/sparse.cu``), backend ``cuda``.

Same contract as ``kernels/sparse.py``; tensors are contiguous CUDA tensors, kernels run on
torch's current stream. The first use on a device runs :func:`selftest` (a small merge of every
mask mode against the torch path) and disables these kernels if it fails.
"""
from __future__ import annotations

import torch

from . import _dispatch
from ._cuda_util import dtype_code, stream
from .sparse_plan import BLOCK


def _ext():
    return _dispatch.cuda_extension()


def _ptrs(xs):
    return [x.data_ptr() for x in xs]


def _ref(xs, base):
    return base if base is not None else xs[0]


def digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix):
    ref = _ref(xs, base)
    out = torch.zeros((qmodel.numel(), 1 << nbits), dtype=torch.int64, device=ref.device)
    qmodel, prefix = qmodel.contiguous(), prefix.contiguous()
    _ext().sparse_digit_hist(_ptrs(xs), base.data_ptr() if base is not None else 0, dtype_code(ref), ref.numel(),
                             qmodel.data_ptr(), qmodel.numel(), prefix.data_ptr(), shift, nbits, high_shift,
                             bool(has_prefix), out.data_ptr(), stream(ref))
    return out


def tie_counts(xs, base, qmodel, qkey):
    ref = _ref(xs, base)
    n = ref.numel()
    out = torch.zeros((qmodel.numel(), (n + BLOCK - 1) // BLOCK), dtype=torch.int64, device=ref.device)
    qmodel, qkey = qmodel.contiguous(), qkey.contiguous()
    _ext().sparse_tie_counts(_ptrs(xs), base.data_ptr() if base is not None else 0, dtype_code(ref), n,
                             qmodel.data_ptr(), qkey.data_ptr(), qmodel.numel(), out.data_ptr(), stream(ref))
    return out


def _plan_args(plan):
    ties = plan.tie_offsets.data_ptr() if plan.has_ties else 0
    seed = (plan.seed_hi << 32) | plan.seed_lo
    return plan.mode, plan.kp.data_ptr(), ties, plan.density.data_ptr(), seed, plan.stream0


def rescale_stats(xs, base, plan, norm):
    ref = _ref(xs, base)
    n = ref.numel()
    nblocks = (n + BLOCK - 1) // BLOCK
    part = torch.zeros((len(xs), max(nblocks, 1), 2), dtype=torch.float32, device=ref.device)
    code = {"l1": 1, "l2": 2, "linf": 3}[norm]
    _ext().sparse_rescale_stats(_ptrs(xs), base.data_ptr() if base is not None else 0, dtype_code(ref), n,
                                *_plan_args(plan), code, part.data_ptr(), stream(ref))
    part = part.double()
    return part.amax(dim=1) if code == 3 else part.sum(dim=1)


def merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only=False,
          round16=None):
    ref = _ref(xs, base)
    flags = torch.zeros(len(xs) + 1, dtype=torch.int32, device=ref.device)
    r16 = ref.dtype in (torch.float16, torch.bfloat16) if round16 is None else bool(round16)
    weights = weights.to(device=ref.device, dtype=torch.float32).contiguous()
    scales = scales.to(device=ref.device, dtype=torch.float32).contiguous()
    _ext().sparse_merge(_ptrs(xs), base.data_ptr() if base is not None else 0, out.data_ptr(), dtype_code(ref),
                        ref.numel(), *_plan_args(plan), weights.data_ptr(), scales.data_ptr(), float(lam),
                        float(divisor_nc), bool(consensus), bool(normalize), bool(sparsify_only), r16,
                        flags.data_ptr(), stream(ref))
    return flags


def selftest(device: torch.device) -> bool:
    """CUDA merge of every mask mode and dtype vs the torch path on the same small inputs."""
    from .merge import merge_tensors
    from .sparse import kth_largest_abs

    g = torch.Generator(device="cpu").manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        base = torch.randn(5000, generator=g).to(dt)
        ts = [base + 0.1 * torch.randn(5000, generator=g).to(dt) for _ in range(3)]
        ts[1][::5] = ts[1][7]  # ties at the cuts
        for m in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "linear"):
            kw = dict(weights=[0.5, 1.0, 0.3], density=0.4, seed=3)
            want = merge_tensors(m, base, ts, backend="torch", **kw)
            got = merge_tensors(m, base.to(device), [t.to(device) for t in ts], backend="cuda", **kw).cpu()
            tol = 0 if m != "linear" else 1e-2
            if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
                return False
        x = ts[1] - base
        for k in (1, 100, 2500):
            if not torch.equal(kth_largest_abs(x.to(device), k, backend="cuda").cpu(), kth_largest_abs(x, k)):
                return False
    return True


_dispatch.register_selftest("sparse_merge", selftest)
