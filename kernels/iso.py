"""Triton kernels of the iso op family (isotropic merging, see ``wweight/iso.py``).

The spectral work of Iso-C / Iso-CTS / TSV-M is GEMMs and small symmetric eigendecompositions,
which cuBLAS / cuSOLVER already run at peak; the one memory-bound step that pays to fuse is
building the task vectors: ``Delta_t = finetuned_t - base`` in the compute dtype, their running
sum ``M = sum_t Delta_t`` and a NaN/Inf count, in one pass over each fine-tuned tensor instead of
torch's cast / subtract / add / isfinite passes (and with no full-size temporaries).
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


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


def task_vectors(base, finetuned, each, total, bad):
    """Fill ``each[t] = finetuned[t] - base`` (if ``each`` is not None), ``total = sum_t`` (if not None)
    and ``bad[t]`` = number of non-finite entries of task vector t.

    base, finetuned[t]: contiguous, same shape and dtype (fp32/fp16/bf16/fp64); each: (T, *shape) and
    total: (*shape) contiguous in the compute dtype (fp32/fp64); bad: (T,) int64.
    """
    import torch

    n = base.numel()
    grid = (triton.cdiv(n, BLOCK),)
    blocks = torch.empty((len(finetuned), grid[0]), dtype=torch.int32, device=base.device)
    acc = total if total is not None else (each[0] if each is not None else None)
    for t, ft in enumerate(finetuned):
        out = each[t] if each is not None else acc
        _task_vector_kernel[grid](
            ft, base, out, total if total is not None else out, blocks[t], n,
            WRITE_OUT=each is not None, ACCUMULATE=total is not None, FIRST=t == 0, BLOCK=BLOCK,
        )
    bad.copy_(blocks.sum(dim=1))
