"""Triton kernels of the iso op family (isotropic merging, see ``wweight/iso/``), launched by
``wweight/backends/triton/iso.py``.

The spectral work of Iso-C / Iso-CTS / TSV-M is GEMMs and small symmetric eigendecompositions,
which cuBLAS / cuSOLVER already run at peak; the one memory-bound step that pays to fuse is
building the task vectors: ``Delta_t = finetuned_t - base`` in the compute dtype, their running
sum ``M = sum_t Delta_t`` and a NaN/Inf count, in one pass over each fine-tuned tensor instead of
torch's cast / subtract / add / isfinite passes (and with no full-size temporaries).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _task_vector_kernel(ft_ptr, base_ptr, out_ptr, sum_ptr, bad_ptr, n_elements,
                        WRITE_OUT: tl.constexpr, ACCUMULATE: tl.constexpr, FIRST: tl.constexpr,
                        BLOCK: tl.constexpr):
    # 64-bit offsets: one key of a large model has billions of elements
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n_elements
    acc_ty = sum_ptr.dtype.element_ty
    ft = tl.load(ft_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    d = ft - b
    if WRITE_OUT:
        tl.store(out_ptr + offs, d.to(out_ptr.dtype.element_ty), mask=mask)
    if ACCUMULATE:
        if FIRST:
            s = d
        else:
            s = tl.load(sum_ptr + offs, mask=mask, other=0.0) + d
        tl.store(sum_ptr + offs, s, mask=mask)
    # NaN != NaN; Inf - Inf = NaN, Inf - x = Inf: both flagged
    bad = ((d != d) | (tl.abs(d) == float("inf"))) & mask
    tl.store(bad_ptr + pid, tl.sum(bad.to(tl.int32), axis=0))
