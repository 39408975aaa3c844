"""The sparse primitives on the CUDA extension ``wweight._cuda`` (``csrc/sparse.cu``), backend ``cuda``.

Contract: ``wweight/backends/__init__.py``. Tensors are contiguous CUDA tensors, kernels run on
torch's current stream. :data:`SELFTESTS` runs the first time the kernels are picked on a device
(``wweight._dispatch``): :mod:`wweight.sparse.fused` on these primitives against the reference,
for every mask mode and dtype; a failure disables them.
"""
from __future__ import annotations

import sys

import torch

from ..._ext import cuda_extension, dtype_code, on_tensor_device, ptr, ptrs, stream
from ...methods import EPSILON, GAMMA, get
from ...reference import sparse as ref
from ...sparse.plan import BLOCK, NORM_CODES, first, reduce_norm_partials, round16 as _round16


@on_tensor_device
def digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix):
    x0 = first(xs, base)
    out = torch.zeros((qmodel.numel(), 1 << nbits), dtype=torch.int64, device=x0.device)
    qmodel, prefix = qmodel.contiguous(), prefix.contiguous()
    cuda_extension().sparse_digit_hist(ptrs(xs), ptr(base), dtype_code(x0), x0.numel(), qmodel.data_ptr(),
                                       qmodel.numel(), prefix.data_ptr(), shift, nbits, high_shift, bool(has_prefix),
                                       out.data_ptr(), stream(x0))
    return out


@on_tensor_device
def tie_counts(xs, base, qmodel, qkey):
    x0 = first(xs, base)
    n = x0.numel()
    out = torch.zeros((qmodel.numel(), (n + BLOCK - 1) // BLOCK), dtype=torch.int64, device=x0.device)
    qmodel, qkey = qmodel.contiguous(), qkey.contiguous()
    cuda_extension().sparse_tie_counts(ptrs(xs), ptr(base), dtype_code(x0), n, qmodel.data_ptr(), qkey.data_ptr(),
                                       qmodel.numel(), out.data_ptr(), stream(x0))
    return out


@on_tensor_device
def rescale_stats(xs, base, plan, norm):
    x0 = first(xs, base)
    n = x0.numel()
    nblocks = (n + BLOCK - 1) // BLOCK
    part = torch.zeros((len(xs), max(nblocks, 1), 2), dtype=torch.float32, device=x0.device)
    cuda_extension().sparse_rescale_stats(ptrs(xs), ptr(base), dtype_code(x0), n,
                                          *plan.raw_args(plan.density.data_ptr()), NORM_CODES[norm], part.data_ptr(),
                                          stream(x0))
    return reduce_norm_partials(part, norm)


@on_tensor_device
def merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only=False,
          round16=None):
    x0 = first(xs, base)
    flags = torch.zeros(len(xs) + 1, dtype=torch.int32, device=x0.device)
    weights = weights.to(device=x0.device, dtype=torch.float32).contiguous()
    scales = scales.to(device=x0.device, dtype=torch.float32).contiguous()
    cuda_extension().sparse_merge(ptrs(xs), ptr(base), out.data_ptr(), dtype_code(x0), x0.numel(),
                                  *plan.raw_args(plan.density.data_ptr()), weights.data_ptr(), scales.data_ptr(),
                                  float(lam), float(divisor_nc), bool(consensus), bool(normalize), bool(sparsify_only),
                                  _round16(x0.dtype, round16), flags.data_ptr(), stream(x0))
    return flags


def selftest(device: torch.device, prims=None) -> bool:
    """Every mask mode and dtype on these kernels (through the shared plan) vs the reference.

    ``prims``: another backend's primitives instead of these (CI runs the self-test itself on the
    CPU backends, so a wrong self-test cannot disable good kernels on the first GPU run).
    """
    from ...sparse import fused

    prims = prims or sys.modules[__name__]
    # one method per mask mode (none, window, random, two-sided window), with its registry defaults
    cases = [get(name) for name in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties")]
    g = torch.Generator(device="cpu").manual_seed(0)
    # n = 5003: the last block ends inside a thread's vector (the scalar tail path); bf16 inputs start
    # 3 elements into their storage (not 16-byte aligned: the scalar fallback path)
    n = 5003
    for dt, off in ((torch.float32, 0), (torch.bfloat16, 3), (torch.float16, 0)):
        base = torch.randn(n, generator=g).to(dt)
        ts = [base + 0.1 * torch.randn(n, generator=g).to(dt) for _ in range(3)]
        ts[1][::5] = ts[1][7]  # ties at the cuts
        w, dens, gam, eps = [0.5, 1.0, 0.3], [0.4] * 3, [GAMMA.default] * 3, [EPSILON.default] * 3

        def on_device(t):
            return torch.empty(n + off, dtype=dt, device=device)[off:].copy_(t)
        bd, tsd = on_device(base), [on_device(t) for t in ts]
        for m in cases:
            norm, resc = m.normalize, m.rescale
            want = ref.task_arithmetic_family_ref(m.name, base, ts, w, dens, gam, eps, 1.0, norm, resc, 3)
            got = fused.task_arithmetic(prims, m.consensus, m.sparsification, bd, tsd, w, dens, gam, 1.0, norm, resc,
                                        3).cpu()
            # float32 rescale factors: norms reduced in another order than torch.sum (last bits)
            tol = 1e-6 if resc and dt == torch.float32 else 0.0
            if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.float().abs().max())):
                return False
        got = fused.linear(prims, tsd, w, True).cpu()
        if not torch.allclose(got.float(), ref.linear_ref(ts, w, True).float(), rtol=1e-2, atol=1e-2):
            return False
        x = ts[1] - base
        for k in (1, 100, 2500):
            if not torch.equal(fused.kth_largest_abs(prims, x.to(device), k).cpu(), ref.kth_largest_abs_ref(x, k)):
                return False
    return True


#: CUDA kernel set (attribute of ``wweight._cuda``) -> its self-test
SELFTESTS = {"sparse_merge": selftest}
