"""Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) in torch.

The one random-number definition shared by every backend (this file, ``kernels/philox.py``,
``csrc/sparse_elem.h``), so that DARE/DELLA masks are identical on CPU, in Triton and in CUDA.

Stream layout: element ``i`` of stream ``s`` under key ``seed`` (64-bit) takes word ``i % 4``
of ``philox(counter=(lo32(i // 4), hi32(i // 4), s, 0), key=(lo32(seed), hi32(seed)))``; its
uniform is ``(word >> 8) * 2**-24`` in [0, 1), exactly representable in float32.
"""
from __future__ import annotations

import torch

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor):
    # int64 wraps modulo 2^64, which still holds the exact low 64 bits of a 32x32-bit product.
    p = b * a
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Vectorised Philox4x32-10 on int64 tensors holding uint32 values."""
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return c0, c1, c2, c3


def philox_bits(start: int, n: int, seed: int, stream: int = 0, device="cpu") -> torch.Tensor:
    """uint32 random words (as int64) for flat indices ``start .. start + n - 1``."""
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    seed &= (1 << 64) - 1
    k0, k1 = seed & MASK32, seed >> 32
    first, last = start // 4, (start + n - 1) // 4
    ctr = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    c2 = torch.full_like(ctr, stream & MASK32)
    zero = torch.zeros_like(ctr)
    w = torch.stack(philox4x32(ctr & MASK32, (ctr >> 32) & MASK32, c2, zero, k0, k1), dim=1).reshape(-1)
    off = start - first * 4
    return w[off:off + n]


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    return (bits >> 8).to(torch.float32) * (2.0 ** -24)


def philox_uniform(n: int, seed: int, stream: int = 0, device="cpu", start: int = 0) -> torch.Tensor:
    """float32 uniforms on [0, 1) for flat indices ``start .. start + n - 1``."""
    return bits_to_uniform(philox_bits(start, n, seed, stream, device))
