"""Backend ``torch`` of the iso family: task vectors, their sum and a NaN/Inf count with torch ops.

Contract (``wweight/backends/__init__.py``): ``task_vectors(base, finetuned, each, total, bad, dtype)``
fills ``each[t] = finetuned[t] - base`` (if ``each`` is not None), ``total = sum_t`` (if not None) in
``dtype`` and ``bad[t]`` > 0 where task vector t holds NaN/Inf.
"""
from __future__ import annotations

import torch


def task_vectors(base, finetuned, each, total, bad, dtype):
    b = base.to(dtype)
    for t, ft in enumerate(finetuned):
        dt = ft.to(dtype) - b
        if each is not None:
            each[t] = dt
        if total is not None:
            if t == 0:
                total.copy_(dt)
            else:
                total += dt
    # one finiteness pass: a NaN/Inf in any task vector reaches their sum (NaN + x = NaN,
    # Inf - Inf = NaN); only on failure are the tasks counted one by one
    probe = total if total is not None else each
    if probe is not None and not bool(torch.isfinite(probe).all()):
        for t, ft in enumerate(finetuned):
            bad[t] = (~torch.isfinite(ft.to(dtype) - b)).sum()
        if not bool(bad.any()):  # finite task vectors whose float sum overflowed
            bad[0] = 1
