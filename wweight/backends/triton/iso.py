"""Backend ``triton`` of the iso family: the fused task-vector kernel of ``wweight/kernels/iso.py``.

Contract: ``wweight/backends/__init__.py`` (``task_vectors``), as ``wweight/backends/torch/iso.py``.
"""
from __future__ import annotations

import torch
import triton

from ...kernels.iso import _task_vector_kernel
from .launch import launch

BLOCK = 1024


def task_vector_grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def task_vectors(base, finetuned, each, total, bad, dtype=None):
    """Fill ``each[t] = finetuned[t] - base`` (if ``each`` is not None), ``total = sum_t`` (if not None)
    and ``bad[t]`` = number of non-finite entries of task vector t (``dtype``: that of each / total).

    base, finetuned[t]: contiguous, same shape and dtype (fp32/fp16/bf16/fp64); each: (T, *shape) and
    total: (*shape) contiguous in the compute dtype (fp32/fp64); bad: (T,) int64.
    """
    n = base.numel()
    grid = task_vector_grid(n)
    blocks = torch.empty((len(finetuned), grid[0]), dtype=torch.int32, device=base.device)
    acc = total if total is not None else (each[0] if each is not None else None)
    for t, ft in enumerate(finetuned):
        out = each[t] if each is not None else acc
        launch(_task_vector_kernel, grid,
               ft, base, out, total if total is not None else out, blocks[t], n,
               WRITE_OUT=each is not None, ACCUMULATE=total is not None, FIRST=t == 0, BLOCK=BLOCK)
    bad.copy_(blocks.sum(dim=1))
