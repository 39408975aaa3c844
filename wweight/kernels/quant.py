"""Triton kernels of blockwise round-to-nearest quantization (see ``wweight/quant/``), launched by
``wweight/backends/triton/quant.py``.

Kernels, all with 64-bit element offsets:

* ``_quant_fused_kernel`` the one-pass quantizer for ``block_size % 8 == 0`` and
  ``block_size <= FUSED_MAX_BLOCK``: block statistics without the outliers, stored scale/zero,
  codes and packing from a single read of the weight.
* ``_dq_matmul_kernel`` ``x @ W_hat^T`` with each weight tile unpacked and scaled in registers.

The general path (any block size) is three kernels:

* ``_stats_kernel``  per-(block, column-chunk) min/max (or absmax) of the non-outlier elements;
  a 2-D tile of ``ROWS`` blocks x ``COLS`` columns, so tiny blocks (64) share a program and
  huge ones (a row, the whole tensor) are split over ``cdiv(block_size, COLS)`` programs. The
  O(blocks) reduction of the partials and the scale/zero formula run in torch.
* ``_pack_kernel``   one program = ``G`` groups of 8 codes: load, scale, round half-to-even,
  clamp, and pack each group of 8 codes into ``BITS`` bytes of the big-endian bitstream
  (through one int64 word per group), so 3/5/6/7-bit codes are packed without waste.
* ``_dequant_kernel`` the inverse: ``BITS`` bytes -> 8 codes -> ``code * scale + zero`` in
  float32 -> the output dtype. Outliers are scattered afterwards by torch (K << n elements).

Division uses ``div_rn`` (IEEE round-to-nearest) and rounding is done by hand as exact
round-half-to-even so codes match ``torch.round((w - zero) / scale)`` bit for bit.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rne(t):
    # exact round-half-to-even (torch.round): t - floor(t) is exact in float32
    f = tl.floor(t)
    d = t - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _rne_bf16(v):
    # float32 -> the nearest-even bfloat16 value, still as float32. Done with integer ops because
    # the Triton interpreter truncates fp32 -> bf16 casts (GPUs round to nearest even); the
    # following .to(bfloat16) is then exact everywhere.
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _code(v, zero, safe, pos, BITS: tl.constexpr, SYM: tl.constexpr):
    """RTN code of float32 ``v`` for the stored scale (``safe``: the scale, 1 where it is 0; ``pos``:
    scale > 0). Symmetric codes are offset by 2**(BITS-1) (``zero`` unused); a block of scale 0
    gets the zero code. Exactly ``torch.round((v - zero) / scale)`` clamped, as the reference."""
    if SYM:
        HALF: tl.constexpr = 1 << (BITS - 1)
        q = _rne(tl.math.div_rn(v, safe))
        q = tl.minimum(tl.maximum(q, -HALF), HALF - 1) + HALF
        return tl.where(pos, q, HALF)
    else:
        q = _rne(tl.math.div_rn(v - zero, safe))
        q = tl.minimum(tl.maximum(q, 0.0), (1 << BITS) - 1)
        return tl.where(pos, q, 0.0)


@triton.jit
def _kept(v, m_ptr, offs, valid, thr, HAS_MASK: tl.constexpr, EXCL: tl.constexpr):
    """The elements that count in the block statistics: valid and not outliers (``|v| >= thr`` with
    EXCL, or set in the uint8 mask)."""
    keep = valid
    if EXCL:
        keep = keep & (tl.abs(v) < thr)
    if HAS_MASK:
        mk = tl.load(m_ptr + offs, mask=valid, other=0)
        keep = keep & (mk == 0)
    return keep


@triton.jit
def _stats_kernel(x_ptr, m_ptr, pmin_ptr, pmax_ptr, n, bs, nb, nchunks, thr,
                  HAS_MASK: tl.constexpr, EXCL: tl.constexpr, SYM: tl.constexpr,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    # a 1-D grid over (row tile, chunk): grid.y is capped at 65,535, which nchunks (block_size =
    # "tensor": n / 1024) or the row tiles (small blocks) would pass for large tensors
    pid = tl.program_id(0).to(tl.int64)
    pid_r = pid // nchunks
    pid_c = pid - pid_r * nchunks
    rows = pid_r * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = pid_c * COLS + tl.arange(0, COLS).to(tl.int64)
    offs = rows[:, None] * bs + cols[None, :]
    valid = (rows[:, None] < nb) & (cols[None, :] < bs) & (offs < n)
    v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    keep = _kept(v, m_ptr, offs, valid, thr, HAS_MASK, EXCL)
    out = rows * nchunks + pid_c
    rmask = rows < nb
    if SYM:
        a = tl.max(tl.where(keep, tl.abs(v), 0.0), axis=1)
        tl.store(pmax_ptr + out, a, mask=rmask)
    else:
        lo = tl.min(tl.where(keep, v, float("inf")), axis=1)
        hi = tl.max(tl.where(keep, v, float("-inf")), axis=1)
        tl.store(pmin_ptr + out, lo, mask=rmask)
        tl.store(pmax_ptr + out, hi, mask=rmask)


@triton.jit
def _block_of(g, offs, bs, G: tl.constexpr, ALIGNED: tl.constexpr):
    """Block index of every element of a [G, 8] tile of groups of 8 codes (``offs``: their offsets)."""
    if ALIGNED:  # block_size % 8 == 0: one (64-bit, slow on GPUs) division per group, not per element
        return ((g * 8) // bs)[:, None] + tl.zeros([G, 8], dtype=tl.int64)
    else:
        return offs // bs


@triton.jit
def _byte_shifts(jb, BITS: tl.constexpr):
    """Shift of byte ``jb`` of a group's big-endian 8-code word (BITS bytes; the rest unused)."""
    return tl.where(jb < BITS, 8 * (BITS - 1 - jb), 0)


@triton.jit
def _pack_kernel(x_ptr, s_ptr, z_ptr, out_ptr, n, bs, ngroups,
                 BITS: tl.constexpr, SYM: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * G + tl.arange(0, G).to(tl.int64)
    j = tl.arange(0, 8).to(tl.int64)
    offs = g[:, None] * 8 + j[None, :]
    valid = offs < n
    v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    blk = _block_of(g, offs, bs, G, ALIGNED)
    s = tl.load(s_ptr + blk, mask=valid, other=1.0).to(tl.float32)
    pos = s > 0
    safe = tl.where(pos, s, 1.0)
    if SYM:
        z = 0.0
    else:
        z = tl.load(z_ptr + blk, mask=valid, other=0.0).to(tl.float32)
    q = _code(v, z, safe, pos, BITS, SYM)
    q = tl.where(valid, q, 0.0).to(tl.int64)  # padding codes are 0
    word = tl.sum(q << (BITS * (7 - j))[None, :], axis=1)
    jb = tl.arange(0, 8).to(tl.int64)
    sh = _byte_shifts(jb, BITS)
    byte = (word[:, None] >> sh[None, :]) & 255
    omask = (jb[None, :] < BITS) & (g[:, None] < ngroups)
    tl.store(out_ptr + g[:, None] * BITS + jb[None, :], byte.to(tl.uint8), mask=omask)


@triton.jit
def _dequant_kernel(p_ptr, s_ptr, z_ptr, out_ptr, n, bs, ngroups,
                    BITS: tl.constexpr, SYM: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * G + tl.arange(0, G).to(tl.int64)
    jb = tl.arange(0, 8).to(tl.int64)
    bmask = (jb[None, :] < BITS) & (g[:, None] < ngroups)
    byte = tl.load(p_ptr + g[:, None] * BITS + jb[None, :], mask=bmask, other=0).to(tl.int64)
    sh = _byte_shifts(jb, BITS)
    word = tl.sum(byte << sh[None, :], axis=1)
    j = tl.arange(0, 8).to(tl.int64)
    c = ((word[:, None] >> (BITS * (7 - j))[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    offs = g[:, None] * 8 + j[None, :]
    valid = offs < n
    blk = _block_of(g, offs, bs, G, ALIGNED)
    s = tl.load(s_ptr + blk, mask=valid, other=0.0).to(tl.float32)
    if SYM:
        HALF: tl.constexpr = 1 << (BITS - 1)
        val = (c - HALF) * s
    else:
        z = tl.load(z_ptr + blk, mask=valid, other=0.0).to(tl.float32)
        val = c * s + z
    if out_ptr.dtype.element_ty == tl.bfloat16:
        val = _rne_bf16(val)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _quant_fused_kernel(x_ptr, m_ptr, s_ptr, z_ptr, out_ptr, n, bs, nb, ngroups, thr, clip,
                        BITS: tl.constexpr, SYM: tl.constexpr, HAS_MASK: tl.constexpr, EXCL: tl.constexpr,
                        HAS_CLIP: tl.constexpr, SD: tl.constexpr, ROWS: tl.constexpr, GP: tl.constexpr):
    """One pass for block_size % 8 == 0 and block_size <= 8 * GP: a program owns ROWS whole
    blocks as a [ROWS, GP, 8] tile (GP groups of 8 codes per block), computes the block
    statistics without the outliers, the stored scale/zero (rounded to the storage dtype SD:
    0 float16, 1 bfloat16, 2 float32, exactly as torch rounds them), the codes and their packed
    bytes, reading the weight once."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    g = tl.arange(0, GP).to(tl.int64)
    j = tl.arange(0, 8).to(tl.int64)
    col = g[None, :, None] * 8 + j[None, None, :]
    offs = rows[:, None, None] * bs + col
    valid = (rows[:, None, None] < nb) & (col < bs) & (offs < n)
    v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    keep = _kept(v, m_ptr, offs, valid, thr, HAS_MASK, EXCL)
    rmask = rows < nb
    if SYM:
        a = tl.max(tl.max(tl.where(keep, tl.abs(v), 0.0), axis=2), axis=1)
        if HAS_CLIP:
            a = a * clip
        sc = tl.math.div_rn(a, ((1 << (BITS - 1)) - 1) * 1.0)
    else:
        lo = tl.min(tl.min(tl.where(keep, v, float("inf")), axis=2), axis=1)
        hi = tl.max(tl.max(tl.where(keep, v, float("-inf")), axis=2), axis=1)
        empty = lo > hi
        lo = tl.where(empty, 0.0, lo)
        hi = tl.where(empty, 0.0, hi)
        if HAS_CLIP:
            lo = lo * clip
            hi = hi * clip
        sc = tl.math.div_rn(hi - lo, ((1 << BITS) - 1) * 1.0)
    # round to the storage dtype; the codes use the stored values
    if SD == 0:
        sc = sc.to(tl.float16).to(tl.float32)
    elif SD == 1:
        sc = _rne_bf16(sc)
    tl.store(s_ptr + rows, sc.to(s_ptr.dtype.element_ty), mask=rmask)
    s3 = sc[:, None, None]
    pos = s3 > 0
    safe = tl.where(pos, s3, 1.0)
    if SYM:
        z3 = 0.0
    else:
        if SD == 0:
            lo = lo.to(tl.float16).to(tl.float32)
        elif SD == 1:
            lo = _rne_bf16(lo)
        tl.store(z_ptr + rows, lo.to(z_ptr.dtype.element_ty), mask=rmask)
        z3 = lo[:, None, None]
    q = _code(v, z3, safe, pos, BITS, SYM)
    q = tl.where(valid, q, 0.0).to(tl.int64)
    word = tl.sum(q << (BITS * (7 - j))[None, None, :], axis=2)  # [ROWS, GP]
    sh = tl.where(j < BITS, 8 * (BITS - 1 - j), 0)
    byte = (word[:, :, None] >> sh[None, None, :]) & 255
    grp = rows[:, None] * (bs // 8) + g[None, :]  # global group index
    gmask = (rows[:, None] < nb) & (g[None, :] < bs // 8) & (grp < ngroups)
    omask = gmask[:, :, None] & (j[None, None, :] < BITS)
    tl.store(out_ptr + grp[:, :, None] * BITS + j[None, None, :], byte.to(tl.uint8), mask=omask)


@triton.jit
def _dq_matmul_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, M, N, K, bs, nbytes,
                      sxm, sxk, sym_, syn,
                      BITS: tl.constexpr, SYM: tl.constexpr, W_F32: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[M, N] (float32) = x[M, K] @ W_hat[N, K]^T with W_hat unpacked and scaled tile by tile.

    Element W[n, k] is code number f = n*K + k of the bitstream; it starts at bit f*BITS, so it
    lies inside the 16-bit window of bytes (f*BITS >> 3, +1) for every width 2..8."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = (k0 + tl.arange(0, BK)).to(tl.int64)
        xm = (rm[:, None] < M) & (rk[None, :] < K)
        xt = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=xm, other=0.0)
        wm = (rk[:, None] < K) & (rn[None, :] < N)
        f = rn[None, :] * K + rk[:, None]  # (BK, BN) flat indices of W[n, k]
        bitpos = f * BITS
        byte = bitpos >> 3
        b0 = tl.load(p_ptr + byte, mask=wm, other=0).to(tl.int32)
        b1 = tl.load(p_ptr + byte + 1, mask=wm & (byte + 1 < nbytes), other=0).to(tl.int32)
        sh = (16 - BITS - (bitpos & 7)).to(tl.int32)
        code = (((b0 << 8) | b1) >> sh) & ((1 << BITS) - 1)
        blk = f // bs
        s = tl.load(s_ptr + blk, mask=wm, other=0.0).to(tl.float32)
        if SYM:
            w = (code.to(tl.float32) - (1 << (BITS - 1))) * s
        else:
            z = tl.load(z_ptr + blk, mask=wm, other=0.0).to(tl.float32)
            w = code.to(tl.float32) * s + z
        w = tl.where(wm, w, 0.0)
        if W_F32:
            acc += tl.dot(xt.to(tl.float32), w, input_precision="ieee")
        else:
            # 16-bit weights: round the dequantized weight to its dtype (what dequantize returns);
            # fp16/bf16 values are exact in tf32, so the tf32 dot equals a 16-bit tensor-core dot
            if x_ptr.dtype.element_ty == tl.bfloat16:
                w = _rne_bf16(w)
            w16 = w.to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.dot(xt.to(tl.float32), w16, input_precision="tf32")
    ym = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * sym_ + rn[None, :] * syn, acc, mask=ym)
