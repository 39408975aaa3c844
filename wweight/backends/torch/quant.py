"""Backend ``torch`` of the quantization family: vectorised, chunked PyTorch (the CPU product path
and the last fallback on any device). Contract: ``wweight/backends/__init__.py``.

Same semantics as :mod:`wweight.reference.quant` (see there); the difference is speed: the
flattened tensor is processed in cache-sized chunks so that every temporary (float32 copy,
codes, exclusion mask) stays in L2 instead of streaming several full-size temporaries through
memory as the straightforward vectorised version does. Each chunk is cut into at most three
*segments* that are 2-D views ``(rows, width)`` whose rows each lie in one quantization
block (head partial block, whole blocks, tail partial block), so any ``block_size`` works
without per-element block indices.

Parallelism: chunks are smaller than torch's intra-op grain size (32768 elements), so every
torch op runs inline on the calling thread, and contiguous runs of chunks are spread over a
small pool of Python threads (torch releases the GIL inside ops). This avoids thousands of
OpenMP fork/join barriers, which made a chunked path several times slower than the
straightforward one on a loaded machine.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

import torch

from ...quant.scales import finalize, packed_bytes, zero_empty_blocks

# elements per chunk: just below torch's parallel grain (32768) so ops never fork OpenMP threads,
# and a multiple of 8 so that every chunk starts at a byte boundary of the packed bitstream.
CHUNK = 32760
#: amin/amax propagate NaN into the block's scale (see wweight.quantize's finiteness check)
NAN_PROPAGATES = True

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _workers() -> int:
    # Each chunk costs ~15 torch calls whose Python dispatch holds the GIL, so extra threads only
    # overlap the numeric part (measured on 2 cores: one thread is ~10 % faster on an idle machine,
    # two are up to 2x faster on a loaded one); capped at 4 (larger machines not measured).
    return max(1, min(4, torch.get_num_threads()))


def _get_pool(k: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < k:
            _pool = ThreadPoolExecutor(max_workers=k, thread_name_prefix="wweight-quant")
            _pool_size = k
        return _pool


def _run(n: int, step: int, fn: Callable[[int, int], object]) -> list:
    """``fn(s0, s1)`` over contiguous runs of chunks (``s0``, ``s1`` multiples of ``step``, or n),
    one run per worker thread; results in order."""
    nchunks = -(-n // step)
    k = min(_workers(), nchunks)
    if k <= 1 or threading.current_thread().name.startswith("wweight-quant"):
        return [fn(0, n)]
    bounds = [min(n, (i * nchunks // k) * step) for i in range(k + 1)]
    pool = _get_pool(k)
    futs = [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(k)]
    return [f.result() for f in futs]


def _segments(s: int, e: int, bs: int):
    """[s, e) as (a, b, first_block, rows, width) pieces whose rows each lie in one block."""
    out = []
    head_end = min(e, -(-s // bs) * bs)
    if head_end > s:
        out.append((s, head_end, s // bs, 1, head_end - s))
    mid_end = max(head_end, (e // bs) * bs)
    if mid_end > head_end:
        out.append((head_end, mid_end, head_end // bs, (mid_end - head_end) // bs, bs))
    if e > mid_end:
        out.append((mid_end, e, mid_end // bs, 1, e - mid_end))
    return out


def _chunks(s0: int, s1: int, step: int, bits: int):
    """(start, end, padded length, bitstream bytes) of each chunk of [s0, s1): chunks start at a
    multiple of 8 codes and are padded to whole groups of 8 codes (``bits`` bytes each)."""
    for s in range(s0, s1, step):
        e = min(s1, s + step)
        mp = -(-(e - s) // 8) * 8
        yield s, e, mp, slice((s // 8) * bits, (s // 8) * bits + (mp // 8) * bits)


def _chunk_size(bs: int) -> int:
    if bs >= CHUNK:
        return CHUNK
    # whole blocks per chunk and a multiple of 8 codes: no partial segments in the middle
    unit = bs * 8 // math.gcd(bs, 8)
    return max(unit, (CHUNK // unit) * unit)


def _seg_stats(v: torch.Tensor, a: int, symmetric: bool, thr: float, mask: Optional[torch.Tensor],
               want_outliers: bool, idx: List[torch.Tensor]):
    """Row statistics of one (rows, width) float32 segment starting at flat offset ``a``, outliers
    (``|v| >= thr`` or ``mask``) excluded; appends the segment's outlier flat indices to ``idx``.
    -> (lo, hi, None) or (None, None, absmax)."""
    rows, width = v.shape
    r_lo = r_hi = r_am = None
    if symmetric:
        r_am = v.abs().amax(1)
    else:
        r_lo, r_hi = v.amin(1), v.amax(1)
    if not (math.isfinite(thr) or mask is not None):
        return r_lo, r_hi, r_am
    # outliers are rare: find the rows that hold one from the plain statistics and recompute
    # only those rows with the outliers masked out
    if mask is not None:
        hit = torch.ones(rows, dtype=torch.bool, device=v.device)
    elif symmetric:
        hit = r_am >= thr
    else:
        hit = (r_hi >= thr) | (r_lo <= -thr)
    rows_hit = torch.nonzero(hit).view(-1)
    if not rows_hit.numel():
        return r_lo, r_hi, r_am
    full = rows_hit.numel() == rows
    sub = v if full else v.index_select(0, rows_hit)
    ex = sub.abs() >= thr
    if mask is not None:
        ex |= mask[a:a + rows * width].view(rows, width)
    if want_outliers:
        nz = torch.nonzero(ex.view(-1)).view(-1)
        if nz.numel():
            if not full:  # (row in sub, col) -> flat offset in the segment
                nz = rows_hit[nz // width] * width + nz % width
            idx.append(nz + a)
    if symmetric:
        vals = sub.abs().masked_fill_(ex, 0.0).amax(1)
        if full:
            return None, None, vals
        r_am[rows_hit] = vals
        return None, None, r_am
    lo_s = sub.masked_fill(ex, math.inf).amin(1)
    hi_s = sub.masked_fill(ex, -math.inf).amax(1)
    if full:
        return lo_s, hi_s, None
    r_lo[rows_hit] = lo_s
    r_hi[rows_hit] = hi_s
    return r_lo, r_hi, None


def block_stats(x: torch.Tensor, bs: int, bits: int, symmetric: bool, thr: float,
                mask: Optional[torch.Tensor], want_outliers: bool):
    """Per-block float32 (lo, hi) or (absmax,) over non-outliers, plus the outlier flat indices.

    An element is an outlier when ``|x| >= thr`` (float32 compare) or ``mask`` is set.
    """
    n = x.numel()
    nb = -(-n // bs)
    dev = x.device
    step = _chunk_size(bs)

    def work(s0: int, s1: int):
        b_first, b_last = s0 // bs, (s1 - 1) // bs
        m = b_last - b_first + 1
        # this worker's blocks only; neighbours share at most the boundary blocks (merged below)
        p_lo = None if symmetric else torch.full((m,), math.inf, device=dev)
        p_hi = None if symmetric else torch.full((m,), -math.inf, device=dev)
        p_am = torch.zeros(m, device=dev) if symmetric else None
        idx: List[torch.Tensor] = []
        for s in range(s0, s1, step):
            e = min(s1, s + step)
            for a, b, b0, rows, width in _segments(s, e, bs):
                v = x[a:b].view(rows, width).float()
                r_lo, r_hi, r_am = _seg_stats(v, a, symmetric, thr, mask, want_outliers, idx)
                sl = slice(b0 - b_first, b0 - b_first + rows)
                if symmetric:
                    torch.maximum(p_am[sl], r_am, out=p_am[sl])
                else:
                    torch.minimum(p_lo[sl], r_lo, out=p_lo[sl])
                    torch.maximum(p_hi[sl], r_hi, out=p_hi[sl])
        return b_first, p_lo, p_hi, p_am, idx

    amax = lo = hi = None
    if symmetric:
        amax = torch.zeros(nb, device=dev)
    else:
        lo = torch.full((nb,), math.inf, device=dev)
        hi = torch.full((nb,), -math.inf, device=dev)
    idx: List[torch.Tensor] = []
    for b_first, p_lo, p_hi, p_am, p_idx in _run(n, step, work):
        if symmetric:
            sl = slice(b_first, b_first + p_am.numel())
            torch.maximum(amax[sl], p_am, out=amax[sl])
        else:
            sl = slice(b_first, b_first + p_lo.numel())
            torch.minimum(lo[sl], p_lo, out=lo[sl])
            torch.maximum(hi[sl], p_hi, out=hi[sl])
        idx.extend(p_idx)
    if not symmetric:
        zero_empty_blocks(lo, hi)
    oidx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64, device=dev)
    return lo, hi, amax, oidx


def _codes_into(q: torch.Tensor, v: torch.Tensor, safe: torch.Tensor, z: Optional[torch.Tensor],
                zero_s: Optional[torch.Tensor], bits: int):
    """float32 (rows, width) -> rounded, clamped codes (float32, in place in ``q``).

    ``safe`` is the scale with zeros replaced by 1; ``zero_s`` (or None when no block of the
    tensor has scale 0) marks the blocks whose codes are forced to the zero code."""
    if z is None:
        half = 1 << (bits - 1)
        torch.div(v, safe[:, None], out=q)
        q.round_().clamp_(-half, half - 1).add_(half)
        if zero_s is not None:
            q.masked_fill_(zero_s[:, None], float(half))
    else:
        torch.sub(v, z[:, None], out=q)
        q.div_(safe[:, None]).round_().clamp_(0, (1 << bits) - 1)
        if zero_s is not None:
            q.masked_fill_(zero_s[:, None], 0.0)


_SHIFTS = {}


def _shifts(bits: int, device):
    """(word dtype, per-code shifts, per-byte shifts) of a group of 8 codes = ``bits`` bytes held in
    one integer word: code i at bits [bits*(7-i), bits*(8-i)), byte j at [8*(bits-1-j), 8*(bits-j))."""
    key = (bits, str(device))
    if key not in _SHIFTS:
        dt = torch.int32 if bits * 8 <= 31 else torch.int64
        code_sh = torch.tensor([bits * (7 - i) for i in range(8)], dtype=dt, device=device)
        byte_sh = torch.tensor([8 * (bits - 1 - j) for j in range(bits)], dtype=dt, device=device)
        _SHIFTS[key] = (dt, code_sh, byte_sh)
    return _SHIFTS[key]


def pack_codes(c: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (length a multiple of 8; integral float32 also accepted for 3/5/6/7 bits)
    -> big-endian bitstream, ``len * bits / 8`` bytes."""
    if bits == 8:
        return c
    if bits == 4:
        c2 = c.view(-1, 2)
        return (c2[:, 0] << 4) | c2[:, 1]
    if bits == 2:
        c4 = c.view(-1, 4)
        return (c4[:, 0] << 6) | (c4[:, 1] << 4) | (c4[:, 2] << 2) | c4[:, 3]
    dt, code_sh, byte_sh = _shifts(bits, c.device)
    word = (c.view(-1, 8).to(dt) << code_sh).sum(1, dtype=dt)  # disjoint bit fields: sum == or
    return ((word[:, None] >> byte_sh) & 255).to(torch.uint8).view(-1)


def unpack_codes(p: torch.Tensor, bits: int, raw: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``len * 8 / bits`` uint8 codes (``raw``: odd widths stay in
    the int32/int64 word dtype, saving a conversion when they are turned into floats next)."""
    if bits == 8:
        return p
    if bits == 4:
        return torch.stack((p >> 4, p & 15), 1).view(-1)
    if bits == 2:
        return torch.stack((p >> 6, (p >> 4) & 3, (p >> 2) & 3, p & 3), 1).view(-1)
    dt, code_sh, byte_sh = _shifts(bits, p.device)
    word = (p.view(-1, bits).to(dt) << byte_sh).sum(1, dtype=dt)
    c = ((word[:, None] >> code_sh) & ((1 << bits) - 1)).view(-1)
    return c if raw else c.to(torch.uint8)


def quantize_pack(x: torch.Tensor, bs: int, bits: int, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    """Codes of the flat tensor ``x`` with the stored per-block scale/zero, packed."""
    n = x.numel()
    packed = torch.empty(packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
    s32 = scale.float()
    zs = s32 == 0
    any_zero = bool(zs.any())
    safe = torch.where(zs, torch.ones_like(s32), s32)
    z32 = zero.float() if zero is not None else None
    step = _chunk_size(bs)

    def work(s0: int, s1: int):
        qbuf = torch.empty(min(step, s1 - s0) + 8, device=x.device)
        for s, e, mp, out_bytes in _chunks(s0, s1, step, bits):
            q = qbuf[:mp]
            q[e - s:].zero_()
            for a, b, b0, rows, width in _segments(s, e, bs):
                v = x[a:b].view(rows, width).float()
                sl = slice(b0, b0 + rows)
                _codes_into(q[a - s:b - s].view(rows, width), v, safe[sl], None if z32 is None else z32[sl],
                            zs[sl] if any_zero else None, bits)
            # odd widths go through an integer word anyway: convert the float codes only once
            cq = q if bits in (3, 5, 6, 7) else q.to(torch.uint8)
            packed[out_bytes] = pack_codes(cq, bits)

    _run(n, step, work)
    return packed


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], n: int,
               dtype: torch.dtype, bits: int, bs: int) -> torch.Tensor:
    """Flat dense tensor (outliers not yet restored)."""
    out = torch.empty(n, dtype=dtype, device=packed.device)
    s32 = scale.float()
    z32 = zero.float() if zero is not None else None
    half = float(1 << (bits - 1))
    step = _chunk_size(bs)

    def work(s0: int, s1: int):
        fbuf = torch.empty(min(step, s1 - s0) + 8, device=packed.device)
        for s, e, mp, in_bytes in _chunks(s0, s1, step, bits):
            c = unpack_codes(packed[in_bytes], bits, raw=True)
            # float32 output: compute in place in the output (no extra pass) except for a padded tail
            direct = dtype == torch.float32 and mp == e - s
            f = out[s:e] if direct else fbuf[:mp]
            f.copy_(c)
            for a, b, b0, rows, width in _segments(s, e, bs):
                v = f[a - s:b - s].view(rows, width)
                sl = slice(b0, b0 + rows)
                if z32 is None:
                    v.sub_(half).mul_(s32[sl][:, None])
                else:
                    v.mul_(s32[sl][:, None]).add_(z32[sl][:, None])
            if not direct:
                out[s:e].copy_(f[:e - s])

    _run(n, step, work)
    return out


def quantize(x: torch.Tensor, mask: Optional[torch.Tensor], thr: float, bits: int, bs: int, symmetric: bool,
             clip: Optional[float], scale_dtype: torch.dtype, one_pass: Optional[bool] = None):
    """Flat contiguous ``x`` -> (codes, scale, zero or None, outlier flat indices int64); ``one_pass`` is
    accepted for the common contract (this path has one algorithm: statistics, then codes)."""
    want_outliers = math.isfinite(thr) or mask is not None
    lo, hi, amax, idx = block_stats(x, bs, bits, symmetric, thr, mask, want_outliers)
    scale, zero = finalize(lo, hi, amax, bits, symmetric, clip, scale_dtype)
    return quantize_pack(x, bs, bits, scale, zero), scale, zero, idx
