"""Philox4x32-10 in Triton: the same stream as ``wweight/reference/philox.py`` and
``csrc/sparse_elem.h`` (``philox4x32_10``, used by the CUDA and C++ kernels).

Element ``i`` of stream ``s`` under the 64-bit key ``seed`` is word ``i % 4`` of
``philox((lo32(i // 4), hi32(i // 4), s, 0), (lo32(seed), hi32(seed)))``; its uniform is
``(word >> 8) * 2**-24``.
"""
import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 blocks (Salmon et al., SC'11)."""
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = tl.mul(_c2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(_c0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def uniform_block(start, seed_lo, seed_hi, stream, BLOCK: tl.constexpr):
    """float32 uniforms for flat indices ``start .. start + BLOCK - 1`` (``start`` int64, a multiple of 4).

    One Philox call per 4 elements: the four output words are interleaved back into index order.
    """
    q = (start // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((q >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros([BLOCK // 4], dtype=tl.uint32) + stream.to(tl.uint32)
    c3 = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    # join(join(r0, r2), join(r1, r3))[i, j, m] == word 2*j + m  ->  row-major reshape gives index order
    w = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])
    return (w >> 8).to(tl.float32) * (1.0 / 16777216.0)
