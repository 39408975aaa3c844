// Per-element logic of the sparse family, shared by the CPU (OpenMP, csrc/cpu/sparse_cpu.cpp)
// and CUDA (csrc/sparse.cu) kernels so both compute the very same numbers; the CPU build is
// tested against the torch reference in CI, which also checks this code for the GPU build.
//
// Mirrors wweight/kernels/sparse.py (Triton) and wweight/backends/torch/sparse.py: deltas rounded to the input
// dtype where mergekit's torch code rounds, magnitude keys, Philox4x32-10 uniforms, keep
// windows with stable-sort tie ranks.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "dtype.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define WW_HD __host__ __device__ __forceinline__
#else
#define WW_HD inline
#endif

namespace wweight {
namespace elem {

using wweight::BF16;
using wweight::F16;
using wweight::F32;

// == wweight/sparse/plan.py MODE_* and BLOCK (tie offsets are counted per block of kBlock elements);
// both extensions export them (SPARSE_MODES, SPARSE_BLOCK: csrc/constants.h), tests/test_layout.py checks them
enum Mode : int { MODE_NONE = 0, MODE_WINDOW = 1, MODE_RANDOM = 2 };
constexpr int64_t kBlock = 1024;

WW_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}
WW_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

// ---- bfloat16: upper half of an fp32, round to nearest even. Kept on the device too: it is
// three integer instructions (cvt.rn.bf16.f32 plus the shift back is two) and, unlike the hardware
// conversion, it is what every earlier result was made with for a NaN input as well (a NaN can
// carry into the exponent: 0x7FFFFFFF -> 0x8000), so replacing it could change NaN-born outputs.
WW_HD float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }
WW_HD uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

// ---- IEEE half, round to nearest even, subnormals and overflow to inf handled.
// Device code uses the hardware conversions (cvt.f32.f16 / cvt.rn.f16.f32: IEEE, no flush to
// zero), which give the very same bits as the integer code below for every non-NaN value; the
// integer code stays for the CPU build, so CI checks the shared logic (and
// benchmarks/check_convert.cpp checks the integer code against IEEE for every fp32 bit pattern).
// NaN: see f32_to_f16 and rnd<F16>.
WW_HD float f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    if (exp == 0) {
        if (man == 0) return bits_f32(sign);
        // subnormal: value = man * 2^-24
        float v = float(man) * 5.9604644775390625e-08f;
        return bits_f32(f32_bits(v) | sign);
    }
    if (exp == 31) return bits_f32(sign | 0x7F800000u | (man << 13));
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}
WW_HD uint16_t f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
    // the stored value and the magnitude key are observable: a NaN becomes sign|0x7E00 exactly
    // as in the integer code (the hardware writes its own canonical NaN)
    const uint16_t h = __half_as_ushort(__float2half_rn(f));
    return f != f ? uint16_t(((f32_bits(f) >> 16) & 0x8000u) | 0x7E00u) : h;
#else
    uint32_t u = f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return uint16_t(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u));
    if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);          // rounds to >= 65520 -> inf
    if (a < 0x38800000u) {                                          // below 2^-14: subnormal or zero
        if (a < 0x33000000u) return uint16_t(sign);                 // < 2^-25 rounds to 0
        uint32_t e = a >> 23;
        uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126u - e;                                  // 14..24 (result = m >> (shift))
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return uint16_t(sign | r);
    }
    uint32_t r = a - 0x38000000u;                                   // rebias exponent (127 -> 15)
    uint32_t out = r >> 13;
    uint32_t rem = r & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (out & 1u))) out++;
    return uint16_t(sign | out);
#endif
}

// Host side: runs f(std::integral_constant<int, DT>{}) for a runtime dtype code. A generic lambda,
// not a macro, so OpenMP pragmas can live in the body.
template <typename F>
inline void dispatch_dt(int dt, F&& f) {
    switch (dt) {
        case F32: f(std::integral_constant<int, F32>{}); break;
        case F16: f(std::integral_constant<int, F16>{}); break;
        case BF16: f(std::integral_constant<int, BF16>{}); break;
        default: throw std::invalid_argument("wweight: unsupported dtype code " + std::to_string(dt));
    }
}

template <int DT> WW_HD float load_f32(const void* p, int64_t i);
template <> WW_HD float load_f32<F32>(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
template <> WW_HD float load_f32<F16>(const void* p, int64_t i) { return f16_to_f32(static_cast<const uint16_t*>(p)[i]); }
template <> WW_HD float load_f32<BF16>(const void* p, int64_t i) { return bf16_to_f32(static_cast<const uint16_t*>(p)[i]); }

template <int DT> WW_HD void store_f32(void* p, int64_t i, float v);
template <> WW_HD void store_f32<F32>(void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; }
template <> WW_HD void store_f32<F16>(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = f32_to_f16(v); }
template <> WW_HD void store_f32<BF16>(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); }

// Round to the dtype's precision and back: torch rounds the result of every 16-bit op.
template <int DT> WW_HD float rnd(float v);
template <> WW_HD float rnd<F32>(float v) { return v; }
template <> WW_HD float rnd<F16>(float v) {
#if defined(__CUDA_ARCH__)
    // two instructions, no NaN fix-up: an intermediate NaN here only ever meets arithmetic (whose
    // NaN result is the canonical one either way), comparisons (false either way) or the final
    // store / key (f32_to_f16, exact) - its payload is never observable. Positive in, positive out.
    return __half2float(__float2half_rn(v));
#else
    return f16_to_f32(f32_to_f16(v));
#endif
}
template <> WW_HD float rnd<BF16>(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// Monotone key of |d| for a value already representable in the dtype. 31 (fp32) or 15 bits:
// 32-bit arithmetic suffices (wweight/sparse/plan.py key_bits).
template <int DT> WW_HD uint32_t key_of(float d);
template <> WW_HD uint32_t key_of<F32>(float d) { return f32_bits(d) & 0x7FFFFFFFu; }
template <> WW_HD uint32_t key_of<F16>(float d) { return f32_to_f16(d) & 0x7FFFu; }
template <> WW_HD uint32_t key_of<BF16>(float d) { return (f32_bits(d) >> 16) & 0x7FFFu; }

// ---- Philox4x32-10 (Salmon et al., SC'11); same stream as wweight/reference/philox.py
WW_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
    uint64_t p = uint64_t(a) * uint64_t(b);
    hi = uint32_t(p >> 32);
    lo = uint32_t(p);
}
WW_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; ++r) {
        uint32_t hi0, lo0, hi1, lo1;
        mulhilo(0xD2511F53u, c[0], hi0, lo0);
        mulhilo(0xCD9E8D57u, c[2], hi1, lo1);
        uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}
// Uniforms of the four consecutive elements 4q .. 4q+3 of stream s.
WW_HD void uniform4(int64_t q, uint64_t seed, uint32_t s, float u[4]) {
    uint32_t c[4] = {uint32_t(uint64_t(q) & 0xFFFFFFFFu), uint32_t(uint64_t(q) >> 32), s, 0u};
    philox4x32_10(c, uint32_t(seed & 0xFFFFFFFFu), uint32_t(seed >> 32));
    for (int j = 0; j < 4; ++j) u[j] = float(c[j] >> 8) * (1.0f / 16777216.0f);
}

// Keep-window parameters of one model (see wweight/sparse/plan.py: kp rows).
struct Window {
    int64_t key_lo, key_hi, a, b, c, e;
};
WW_HD bool window_keep(const Window& w, int64_t key, int64_t rank_lo, int64_t rank_hi) {
    // bitwise, not short-circuit: keep the hot loop free of unpredictable branches
    bool keep = (key > w.key_lo) & (key < w.key_hi);
    keep |= (key == w.key_lo) & (rank_lo >= w.a) & (rank_lo < w.b);
    keep |= (key == w.key_hi) & (rank_hi >= w.c) & (rank_hi < w.e);
    return keep;
}

// Accumulators of one output element over the K models (mergekit's TIES "sum" election).
struct MergeAcc {
    float total = 0.f, pos = 0.f, neg = 0.f, wpos = 0.f, wneg = 0.f;
    WW_HD void add(float wd, float w) {
        // selects, not branches: the sign of wd is a coin flip
        total += wd;
        const bool p = wd > 0.f, n = wd < 0.f;
        pos += p ? wd : 0.f;
        wpos += p ? w : 0.f;
        neg += n ? wd : 0.f;
        wneg += n ? w : 0.f;
    }
};

template <int DT>
WW_HD float finish(const MergeAcc& acc, float b, bool consensus, bool normalize, bool apply_lambda,
                   float lam, float divisor_nc) {
    float mixed, div;
    if (consensus) {
        bool up = acc.total >= 0.f;
        mixed = rnd<DT>(up ? acc.pos : acc.neg);
        div = rnd<DT>(up ? acc.wpos : acc.wneg);
        if (div == 0.f) div = 1.f;
    } else {
        mixed = rnd<DT>(acc.total);
        div = divisor_nc;
    }
    if (normalize) mixed = rnd<DT>(mixed / div);
    if (apply_lambda) mixed = rnd<DT>(mixed * lam);
    return b + mixed;
}

WW_HD bool finite(float v) {
#if defined(__CUDA_ARCH__)
    return fabsf(v) <= 3.40282347e+38f;  // one FSETP (|v| modifier); false for inf and NaN, as below
#else
    return (f32_bits(v) & 0x7F800000u) != 0x7F800000u;
#endif
}

}  // namespace elem
}  // namespace wweight
