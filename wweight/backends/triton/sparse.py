"""Backend ``triton`` of the sparse family: launches the kernels of ``wweight/kernels/sparse.py``.

Contract: ``wweight/backends/__init__.py``. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
(how CI runs these kernels). Integer arguments are 64-bit; the merge and statistics kernels are
compiled without FMA contraction (mergekit rounds products and sums separately). Every launch goes
through :func:`~wweight.backends.triton.launch.launch` (grid limits, the tensors' device); the grids
are the pure functions ``*_grid`` so their limits are checked for any size without allocating.
"""
from __future__ import annotations

import torch
import triton

from ...kernels.sparse import _digit_hist_kernel, _merge_kernel, _stats_kernel, _tie_count_kernel
from ..._ext import device_tensor, ptrs
from ...sparse.plan import BLOCK, NORM_CODES, first, reduce_norm_partials, round16 as _round16
from .launch import launch, program_target

HIST_BLOCK = 1024      # elements per tile of the histogram kernel
#: elements one histogram program may count: its per-bin counters are int32
HIST_MAX_PER_PROGRAM = 2 ** 30
_PTR_TABLES: dict = {}  # (device, addresses) -> int64 device table (its content is its key)


def _ptr_table(xs):
    """The K input addresses as an int64 tensor on their device, built once per address set (a
    pageable host->device copy synchronises the host; the pinned, non-blocking one does not)."""
    addrs = tuple(ptrs(xs))
    dev = xs[0].device
    # per stream: a table is copied (non-blocking) on the stream current at its creation, and only
    # launches on that stream are ordered after the copy (and before its memory is reused)
    key = (str(dev), torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0, addrs)
    t = _PTR_TABLES.get(key)
    if t is None:
        t = device_tensor(addrs, torch.int64, dev)
        if len(_PTR_TABLES) >= 256:
            _PTR_TABLES.clear()
        _PTR_TABLES[key] = t
    return t


def aligned(*tensors) -> bool:
    """All (non-None) tensors start on a 16-byte boundary: the kernels may then use 16-byte loads."""
    return all(t.data_ptr() % 16 == 0 for t in tensors if t is not None)


def hist_grid(n: int, queries: int, target: int):
    """(grid, tiles per program) of the histogram kernel: about ``target`` programs per query
    (:func:`~wweight.backends.triton.launch.program_target`), each counting at most
    :data:`HIST_MAX_PER_PROGRAM` elements."""
    tiles = triton.cdiv(n, HIST_BLOCK)
    per = max(1, triton.cdiv(tiles, target))
    per = min(per, HIST_MAX_PER_PROGRAM // HIST_BLOCK)
    return (triton.cdiv(tiles, per), queries), per


def block_grid(n: int, rows: int = 1):
    """Grid of the one-program-per-BLOCK kernels (tie counts, statistics, merge): (nblocks, rows)."""
    return (triton.cdiv(n, BLOCK), rows)


def digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix):
    """Histogram (Q, 2**nbits) int64 of key digit ``(key >> shift) & (2**nbits - 1)`` per query."""
    ref = first(xs, base)
    n = ref.numel()
    Q = qmodel.numel()
    hist = torch.zeros((Q, 1 << nbits), dtype=torch.int64, device=ref.device)
    if n == 0 or Q == 0:
        return hist
    grid, per = hist_grid(n, Q, program_target(ref.device))
    launch(_digit_hist_kernel, grid,
           _ptr_table(xs), ref, qmodel, prefix, hist, n, per,
           SHIFT=shift, NBITS=nbits, HIGH_SHIFT=high_shift, HAS_PREFIX=has_prefix,
           HAS_BASE=base is not None, ROUND16=_round16(ref.dtype), ALIGNED=aligned(*xs, base), BLK=HIST_BLOCK,
           # 8 warps: with 4, ptxas caps the 2048-bin (11-bit digit) histogram at 32 registers and
           # spills (found by the ahead-of-time check, tests/test_triton_aot.py)
           num_warps=8)
    return hist


def tie_counts(xs, base, qmodel, qkey):
    """(Q, nblocks) int64: per BLOCK-element block, how many keys equal each query's boundary key."""
    ref = first(xs, base)
    n = ref.numel()
    nblocks = triton.cdiv(n, BLOCK)
    Q = qmodel.numel()
    out = torch.zeros((Q, nblocks), dtype=torch.int32, device=ref.device)
    if n and Q:
        launch(_tie_count_kernel, block_grid(n, Q), _ptr_table(xs), ref, qmodel, qkey, out, n, nblocks,
               HAS_BASE=base is not None, ROUND16=_round16(ref.dtype), ALIGNED=aligned(*xs, base), BLK=BLOCK)
    return out.long()


def rescale_stats(xs, base, plan, norm):
    """(K, 2) float64: (before, after) of the rescale norm for each model under ``plan``'s masks."""
    ref = first(xs, base)
    n = ref.numel()
    K = len(xs)
    nblocks = triton.cdiv(n, BLOCK)
    part = torch.zeros((K, max(nblocks, 1), 2), dtype=torch.float32, device=ref.device)
    if n:
        launch(_stats_kernel, block_grid(n, K),
               _ptr_table(xs), ref, plan.kp, plan.tie_offsets, plan.density, part, n, nblocks,
               plan.seed_lo, plan.seed_hi, plan.stream0, NORM=NORM_CODES[norm], MODE=plan.mode,
               HAS_TIES=plan.has_ties, HAS_BASE=base is not None, ROUND16=_round16(ref.dtype),
               ALIGNED=aligned(*xs, base), BLK=BLOCK)
    return reduce_norm_partials(part, norm)


def merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only=False,
          round16=None):
    ref = first(xs, base)
    n = ref.numel()
    K = len(xs)
    flags = torch.zeros(K + 1, dtype=torch.int32, device=ref.device)
    if n == 0:
        return flags
    nblocks = triton.cdiv(n, BLOCK)
    # launch() compiles without FMA contraction: mergekit rounds the product and the sum separately
    launch(_merge_kernel, block_grid(n),
           _ptr_table(xs), ref, out, plan.kp, plan.tie_offsets, plan.density, weights, scales, flags,
           n, nblocks, plan.seed_lo, plan.seed_hi, plan.stream0, float(lam), float(divisor_nc),
           K=K, MODE=plan.mode, HAS_TIES=plan.has_ties, CONSENSUS=consensus, NORMALIZE=normalize,
           APPLY_LAMBDA=lam != 1, HAS_BASE=base is not None, SPARSIFY_ONLY=sparsify_only,
           ROUND16=_round16(ref.dtype, round16), ALIGNED=aligned(*xs, base, out), BLK=BLOCK)
    return flags
