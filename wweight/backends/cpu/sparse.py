"""The sparse primitives on the C++/OpenMP extension ``wweight._cpu`` (``csrc/cpu/sparse_cpu.cpp``).

Backend ``cpu`` of the sparse family (contract: ``wweight/backends/__init__.py``). Inputs are
contiguous CPU tensors; the small per-model arrays (queries, densities, weights) travel as lists.
"""
from __future__ import annotations

import torch

from ..._ext import cpu_extension, dtype_code, empty_like, ptr, ptrs
from ...sparse.plan import BLOCK, MODE_RANDOM, NORM_CODES, first, round16 as _round16


def _args(xs, base):
    x0 = first(xs, base)
    return ptrs(xs), ptr(base), dtype_code(x0), x0.numel()


def digits_for(bits: int):
    """Radix digits of the CPU select (see wweight/sparse/plan.py digits_for): 2^16 / 2^15 counters per
    thread and query fit in L2 and leave far fewer repeated increments of one hot counter (the
    dependency that bounds a narrow histogram); fp32 keys take 2 passes, 16-bit keys 1."""
    return [(15, 16), (0, 15)] if bits == 31 else [(0, 15)]


def digit_hist(xs, base, qmodel, prefix, shift, nbits, high_shift, has_prefix):
    out = torch.zeros((qmodel.numel(), 1 << nbits), dtype=torch.int64)
    cpu_extension().sparse_digit_hist(*_args(xs, base), qmodel.tolist(), prefix.tolist(), shift, nbits, high_shift,
                                      bool(has_prefix), out.data_ptr())
    return out


def select(xs, base, qmodel, ks):
    """Exact k-th largest key of every query and its per-block tie counts, usually in one pass
    (``csrc/cpu/sparse_select.h`` select_keys; the plan's optional fast path, see
    wweight/sparse/plan.py build_plan). Returns ``(res, ties)``: (Q, 4) int64 rows
    (key, count_gt, count_eq, resolved) and (Q, nblocks) int64; a row with resolved = 0 is left to
    the radix passes."""
    n = first(xs, base).numel()
    Q = len(qmodel)
    res = torch.zeros((Q, 4), dtype=torch.int64)
    ties = torch.zeros((Q, (n + BLOCK - 1) // BLOCK), dtype=torch.int64)
    cpu_extension().sparse_select(*_args(xs, base), list(qmodel), list(ks), res.data_ptr(), ties.data_ptr())
    return res, ties


def tie_counts(xs, base, qmodel, qkey):
    n = first(xs, base).numel()
    out = torch.zeros((qmodel.numel(), (n + BLOCK - 1) // BLOCK), dtype=torch.int64)
    cpu_extension().sparse_tie_counts(*_args(xs, base), qmodel.tolist(), qkey.tolist(), out.data_ptr())
    return out


def _bits_shape(xs, base):
    return (len(xs), (first(xs, base).numel() + 31) // 32)


def rescale_stats(xs, base, plan, norm):
    """Random mode: the pass also keeps the Philox masks it draws, one bit per element and model
    (``plan.keep_bits``, K n / 8 bytes), for ``merge`` to read: the draw is most of either pass."""
    out = torch.zeros((len(xs), 2), dtype=torch.float64)
    bits = 0
    if plan.mode == MODE_RANDOM:
        plan.keep_bits = torch.empty(_bits_shape(xs, base), dtype=torch.int32)
        bits = plan.keep_bits.data_ptr()
    cpu_extension().sparse_rescale_stats(*_args(xs, base), *plan.raw_args(plan.density.tolist()),
                                         NORM_CODES[norm], out.data_ptr(), bits)
    return out


def merge(xs, base, out, plan, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only=False,
          round16=None):
    ref = first(xs, base)
    flags = torch.zeros(len(xs) + 1, dtype=torch.int32)
    kb = plan.keep_bits
    # the masks rescale_stats drew for these inputs' shape, or 0: the merge draws them itself
    bits = kb.data_ptr() if (plan.mode == MODE_RANDOM and kb is not None and kb.device.type == "cpu"
                             and tuple(kb.shape) == _bits_shape(xs, base)) else 0
    cpu_extension().sparse_merge(ptrs(xs), ptr(base), out.data_ptr(), dtype_code(ref), ref.numel(),
                                 *plan.raw_args(plan.density.tolist()), weights.tolist(), scales.tolist(), float(lam),
                                 float(divisor_nc), bool(consensus), bool(normalize), bool(sparsify_only),
                                 _round16(ref.dtype, round16), flags.data_ptr(), bits)
    return flags


# ------------------------------------------------------------------------------ fused DELLA
# Not one of the four primitives: DELLA ranks each row (dim 1) of each task vector, which no
# flat radix-select plan expresses. Two kernels of csrc/cpu/della_cpu.cpp (keep bits + norms, then
# the merge pass) reproduce wweight/reference/sparse.py's DELLA with ``fixed_order=True`` bit for bit.

DELLA_FULL, DELLA_ZERO, DELLA_SAMPLE = 0, 1, 2   # == csrc/della_elem.h DellaMode
DELLA_GROUP = 1 << 16   # about this many elements of rows share one compensated norm partial
_NORMS = {None: 0, "l1": 1, "l2": 2, "linf": 3, "density": 0}


def della_available() -> bool:
    ext = cpu_extension()
    return ext is not None and hasattr(ext, "della_masks")


def della_geometry(shape) -> tuple:
    """(outer, m, inner): the reference ranks along dim 1 (0-d and 1-D tensors as one row)."""
    if len(shape) < 2:
        n = 1
        for s in shape:
            n *= int(s)
        return 1, n, 1
    inner = 1
    for s in shape[2:]:
        inner *= int(s)
    return int(shape[0]), int(shape[1]), inner


def _della_constants(density: float, epsilon: float, wd: torch.dtype):
    """(density - epsilon) as ``scalar + tensor`` rounds it, float32(epsilon) as ``tensor * scalar`` uses it."""
    base_p = float((torch.zeros(1, dtype=wd) + (density - epsilon)).float()[0])
    return base_p, float(torch.tensor(epsilon, dtype=torch.float32))


def _della_masks(xs, base, density, epsilon, seed, stream0, norm, wd):
    """Run the mask pass: (modes, bits, stats (K, nchunks, 4) float64, flags (K+1,) int32)."""
    x0 = first(xs, base)
    K, n = len(xs), x0.numel()
    outer, m, inner = della_geometry(x0.shape)
    modes, base_ps, epss = [], [], []
    for d, e in zip(density, epsilon):
        modes.append(DELLA_FULL if d >= 1 else DELLA_ZERO if d <= 0 else DELLA_SAMPLE)
        bp, ep = _della_constants(float(d), float(e), wd)
        base_ps.append(bp)
        epss.append(ep)
    group = max(1, DELLA_GROUP // m)
    nchunks = (outer * inner + group - 1) // group
    sample = any(md == DELLA_SAMPLE for md in modes)
    bits = torch.zeros((K, (n + 63) // 64) if sample else (1,), dtype=torch.int64)
    stats = torch.zeros((K, nchunks, 4), dtype=torch.float64)
    flags = torch.zeros(K + 1, dtype=torch.int32)
    cpu_extension().della_masks(ptrs(xs), ptr(base), dtype_code(x0), n, outer, m, inner, modes, base_ps, epss,
                                int(seed) & ((1 << 64) - 1), int(stream0), _NORMS[norm], group, bits.data_ptr(),
                                stats.data_ptr(), flags.data_ptr())
    return modes, bits, stats, flags


def _della_scale(stats_t: torch.Tensor, norm, density: float, wd: torch.dtype):
    """(has_scale, factor) of one model: wweight/reference/sparse.py rescaled_masked_tensor with
    ``fixed_order=True``, on the norms of the mask pass (the same 0-d torch ops on the same values)."""
    import math

    from ...reference.sparse import EPS
    if norm is None:
        return False, 1.0
    if norm == "density":
        return True, float(torch.tensor(1.0 / density, dtype=wd).float())
    if norm == "linf":
        before = torch.tensor(float(stats_t[:, 0].max()), dtype=torch.float64).to(wd)
        after = torch.tensor(float(stats_t[:, 2].max()), dtype=torch.float64).to(wd)
    else:
        b = torch.tensor(math.fsum(stats_t[:, 0:2].reshape(-1).tolist()), dtype=torch.float64)
        a = torch.tensor(math.fsum(stats_t[:, 2:4].reshape(-1).tolist()), dtype=torch.float64)
        if norm == "l2":
            b, a = b.sqrt(), a.sqrt()
        before, after = b.to(wd), a.to(wd)
    if before < EPS or after < EPS:
        return False, 1.0
    return True, float((before / after).float())


def _raise_nonfinite(flags, names):
    for name, f in zip(names, flags.tolist()):
        if f:   # wweight/sparse/ops.py check_finite's message
            raise ValueError(f"{name} contains NaN or Inf; wweight refuses non-finite weights")


def _outer_sum_split(dtype: torch.dtype, K: int, N: int):
    """The first column where torch's CPU ``(K, N).sum(dim=0)`` stops adding the K rows in order and uses
    SumKernel.cpp's row_sum (4 interleaved partials), or None when a column does neither.

    Rows 0, 1, K-1 = 1, 2**-24, -1 (exact in every dtype): in order, 1 + 2**-24 rounds to 1 in float32
    and the sum is 0; row_sum adds row K-1 to partial 0 first and keeps 2**-24."""
    x = torch.zeros(K, N, dtype=dtype)
    x[0], x[1], x[K - 1] = 1.0, 2.0 ** -24, -1.0
    got = x.sum(dim=0).float()
    is_seq, is_four = got == 0, got == 2.0 ** -24
    if not bool((is_seq | is_four).all()):
        return None
    split = int(is_seq.sum())
    if not bool(is_seq[:split].all()):
        return None
    return split


_SUM_BLOCK = {}


def _sum_block(dtype: torch.dtype):
    """The column block W of torch's vectorized outer sum for ``dtype`` (columns below ``n // W * W`` add
    the models in order), checked on probes with K = 5 and 9 and two widths; None if torch differs."""
    if dtype not in _SUM_BLOCK:
        found = None
        for W in (8, 16, 32, 64, 128):
            ok = True
            for K in (5, 9):
                for N in (1000, 1008, 777, 4096 + 77):
                    if _outer_sum_split(dtype, K, N) != N // W * W:
                        ok = False
            if ok:
                found = W
                break
        _SUM_BLOCK[dtype] = found
    return _SUM_BLOCK[dtype]


def della_merge(xs, base, weights, density, epsilon, lambda_, normalize, rescale, seed, consensus):
    """mergekit's DELLA / DELLA-linear ``merge_group`` for one tensor (contiguous CPU inputs, n > 0), the
    reference's numbers bit for bit; None where the sums over the models cannot follow torch's order
    (K >= 16, K >= 5 with n < 64 or an unrecognised torch reduction): the caller runs the reference."""
    from ...sparse.plan import work_dtype
    dtype = base.dtype
    K, n = len(xs), base.numel()
    if K <= 4:
        seq_end = n           # every order of <= 4 rows that torch uses is the plain one
    else:
        W = _sum_block(dtype) if K < 16 and n >= 64 else None
        if W is None:
            return None
        seq_end = n // W * W
    wd = work_dtype(dtype, "della_magprune")
    norm = "l1" if rescale else None
    modes, bits, stats, flags = _della_masks(xs, base, density, epsilon, seed, 0, norm, wd)
    _raise_nonfinite(flags, [f"tensors[{i}]" for i in range(K)] + ["base"])
    hs, sc = zip(*[_della_scale(stats[t], norm, float(density[t]), wd) if modes[t] == DELLA_SAMPLE else (False, 1.0)
                   for t in range(K)])
    # the reference's weights and linear divisor: (K, 1, ..., 1) in the dtype, summed over dim 0
    w = torch.tensor(list(weights), dtype=dtype).reshape(K, *([1] * base.dim()))
    div = w.sum(dim=0)
    div[div.abs() < 1e-8] = 1
    out = empty_like(base)
    cpu_extension().della_merge(ptrs(xs), ptr(base), out.data_ptr(), dtype_code(base), n, seq_end, modes,
                                [int(h) for h in hs], list(sc), bits.data_ptr(), w.float().reshape(-1).tolist(),
                                float(lambda_), float(div.reshape(-1)[0]), bool(consensus), bool(normalize), False)
    return out


def della_sparsify(x, density, epsilon, rescale_norm, seed, stream):
    """``sparsify(x, density, "della_magprune", ...)`` (contiguous CPU ``x``, n > 0, 0 < density < 1)."""
    from ...sparse.plan import work_dtype
    wd = work_dtype(x.dtype, "della_magprune")
    modes, bits, stats, flags = _della_masks([x], None, [density], [epsilon], seed, stream, rescale_norm, wd)
    _raise_nonfinite(flags, ["tensor"])
    hs, sc = _della_scale(stats[0], rescale_norm, float(density), wd)
    out = empty_like(x)
    cpu_extension().della_merge([x.data_ptr()], 0, out.data_ptr(), dtype_code(x), x.numel(), x.numel(), modes,
                                [int(hs)], [sc], bits.data_ptr(), [1.0], 1.0, 1.0, False, False, True)
    return out
