"""What a merge's work items cost in host memory, and how the pipeline holds them to the budget.

:func:`item_cost` is the upper bound of the host bytes one work item allocates from the moment its
reads start until its output is written (the plan, :mod:`.plan`, attaches it to every item);
:class:`Ledger` keeps the sum of the costs of the items in flight within the budget (:mod:`.pipeline`);
:func:`return_freed_memory` makes glibc give freed tensors back, so the bound is what RSS shows.
"""
from __future__ import annotations

import ctypes
import math
import threading
from typing import List, Optional, Tuple

import torch

from .. import methods as M
from .format import itemsize

_MiB = 1 << 20
#: elements of one chunk of the torch backend's sparse primitives (wweight/backends/torch/sparse.py)
_TORCH_CHUNK = 1024 * 4096


def _sz(dt: torch.dtype) -> int:
    return itemsize(dt)


def item_cost(method: str, kind: str, shapes: List[Tuple[int, ...]], in_dtype: torch.dtype,
              compute_dtype: torch.dtype, out_dtype: torch.dtype, n_in: int, *, backend: Optional[str] = None,
              device: str = "cpu") -> int:
    """Upper bound of the host bytes one work item allocates: ``n_in`` inputs of each shape in
    ``shapes`` (one key, or an iso group of same-shape keys) read in ``in_dtype``, merged in
    ``compute_dtype``, written in ``out_dtype``.

    Counted from the code that runs (measured in tests/test_memory_budget.py):
    reads ``n_in N s_in``; the cast to the compute dtype ``n_in N s_c`` (when it differs); the
    per-tensor methods' fused pass (backends cpu / cuda / triton) allocates only its output ``N s_c``
    plus per-block tie counts (8 bytes per model per 1024 elements) and, for random masks, one keep
    bit per element and model; the torch backend's chunked
    primitives up to ``16 (K + 2)`` bytes per element of one 4M-element chunk; the reference
    (float64, ``backend="reference"``, DELLA off the cpu backend) up to ``24 (K + 2) N``; DELLA's fused
    C++ pass its output, ``K N / 8`` bytes of keep bits and per-thread row scratch; the iso methods
    :func:`wweight.iso.ops.batch_bytes` for the batch plus their merged outputs ``N s_c``; the cast to
    the output dtype ``N s_o`` (when it differs). On CUDA the merge's temporaries are device memory:
    the host holds the (pinned) reads and the (pinned) output.
    """
    numel = [math.prod(s) for s in shapes]
    N = sum(numel)
    s_in, s_c, s_o = _sz(in_dtype), _sz(compute_dtype), _sz(out_dtype)
    reads = n_in * N * s_in
    if kind == "copy":
        return reads
    if device != "cpu":
        return reads + N * s_o
    cast = n_in * N * s_c if compute_dtype != in_dtype else 0
    out_cast = N * s_o if out_dtype != compute_dtype else 0
    K = n_in - 1 if M.get(method).needs_base else n_in
    if kind == "group":
        from ..iso.ops import batch_bytes, other_bytes

        cb = 4  # the iso ops compute task vectors in float32 (their compute_dtype default)
        s0 = shapes[0]
        if len(s0) == 2 and all(s == s0 for s in shapes):
            work = batch_bytes(method, len(shapes), n_in - 1, s0[0], s0[1], cb)
        else:
            work = max(other_bytes(x, cb) for x in numel)
        return reads + cast + work + N * s_c + out_cast
    fused = (backend in (None, "auto", "cpu", "cuda", "triton") and compute_dtype in (torch.float32, torch.float16,
             torch.bfloat16) and not method.startswith("della"))
    # DELLA's fused C++ pass (cpu backend; wweight/backends/cpu/sparse.py della_merge, K < 16): its
    # output, one keep bit per element and model, per-row-group norm partials and per-thread rank scratch
    della_fused = (method.startswith("della") and backend in (None, "auto", "cpu") and K < 16
                   and compute_dtype in (torch.float32, torch.float16, torch.bfloat16))
    if fused:
        work = N * s_c + 8 * (K + 1) * (N // 1024 + 1)
        if M.get(method).sparsification == "random":   # the CPU pass's keep bits (MaskPlan.keep_bits)
            work += 4 * K * ((N + 31) // 32)
    elif della_fused:
        row = max(shapes[0][1] if len(shapes[0]) > 1 else N, 1)
        work = N * s_c + K * N // 8 + 16 * K * (N // 4096 + 1) + 64 * 24 * row
    elif backend == "torch" and not method.startswith("della") and compute_dtype != torch.float64:
        work = N * s_c + 16 * (K + 2) * min(N, _TORCH_CHUNK)
    else:
        work = N * s_c + 24 * (K + 2) * N
    return reads + cast + work + out_cast + _MiB // 4


# ----- enforcing the costs: the pipeline's byte ledger and glibc's release of freed memory -----

_MALLOC_SET = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 << 10


def return_freed_memory() -> None:
    """Make glibc return freed tensors to the OS at once, process-wide (once; a no-op elsewhere).

    glibc serves allocations above ``M_MMAP_THRESHOLD`` with ``mmap`` and unmaps them on free, but
    by default it *raises* the threshold to the size of each mmapped block freed (up to 32 MiB):
    after the first 8 MiB tensor is freed, every later tensor below 8 MiB comes from the heap /
    per-thread arenas (the reader, writer and I/O threads each get one), where freed memory stays
    resident and fragments: measured here, +100 MB of RSS for a 16 MB budget. A fixed threshold
    (256 KiB) turns the dynamic raise off: each tensor is its own mapping, returned on free.
    """
    global _MALLOC_SET
    if _MALLOC_SET:
        return
    _MALLOC_SET = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
    except (OSError, AttributeError):  # pragma: no cover - not glibc: its allocator's own policy
        pass


class Ledger:
    """Bytes reserved by the work items in flight, against the budget (thread-safe)."""

    def __init__(self, budget: int, serial: bool):
        self.budget, self.serial = budget, serial
        self.used = 0
        self.items = 0
        self.lock = threading.Lock()

    def admit(self, cost: int) -> bool:
        """Reserve ``cost`` when it fits (always when nothing is in flight: one item at least)."""
        with self.lock:
            if self.items and (self.serial or self.used + cost > self.budget):
                return False
            self.used += cost
            self.items += 1
            return True

    def release(self, nbytes: int, *, done: bool = False) -> None:
        with self.lock:
            self.used -= nbytes
            self.items -= 1 if done else 0
