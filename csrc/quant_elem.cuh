// Device helpers of the quant CUDA kernels (csrc/quant.cu): 32/64-bit division, group loads and
// stores of 8 elements / BITS packed bytes, outlier bits, the NaN-propagating block statistics and
// the RTN code. Kept apart so each file stays readable; only quant.cu includes it.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include "common.cuh"
#include "quant_elem.h"

namespace wweight {
namespace quant {

// a / d for a, d >= 0: the 32-bit divider when both fit, else nvcc's 64-bit division routine.
__device__ __forceinline__ int64_t udiv(int64_t a, int64_t d) {
    if ((((uint64_t)a | (uint64_t)d) >> 32) == 0) return (int64_t)((uint32_t)a / (uint32_t)d);
    return (int64_t)((uint64_t)a / (uint64_t)d);
}

// The 8 elements of the group starting at element e0 as fp32 (0 past n): one or two 128-bit loads
// when vec (x 16-byte aligned) and the group is whole, else scalar loads.
template <typename T>
__device__ __forceinline__ void load_group(const T* __restrict__ x, int64_t e0, int64_t n, bool vec, float (&v)[8]) {
    if (vec && e0 + 8 <= n) {
        uint4 u[sizeof(T) / 2];
#pragma unroll
        for (int i = 0; i < (int)(sizeof(T) / 2); ++i) u[i] = __ldg(reinterpret_cast<const uint4*>(x + e0) + i);
        T h[8];
        memcpy(h, u, sizeof(h));
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = to_f32<T>(h[j]);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = e0 + j < n ? to_f32<T>(x[e0 + j]) : 0.f;
    }
}

// Bit j set: element e0 + j is an outlier (|v| >= thr when excl, or mask set); 8-byte mask load when mvec.
__device__ __forceinline__ uint32_t outlier_bits(const float (&v)[8], const uint8_t* __restrict__ mask, int64_t e0,
                                                 int64_t n, bool mvec, float thr, bool excl) {
    uint32_t bits = 0;
    uint64_t m = 0;
    if (mask != nullptr) {
        if (mvec && e0 + 8 <= n) {
            m = __ldg(reinterpret_cast<const unsigned long long*>(mask + e0));
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) m |= e0 + j < n ? (uint64_t)mask[e0 + j] << (8 * j) : 0;
        }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
        if ((excl && fabsf(v[j]) >= thr) || ((m >> (8 * j)) & 0xffu)) bits |= 1u << j;
    return bits;
}

// min / max / absmax of the non-outlier elements a lane visits, plus whether one of them is NaN
// (fminf / fmaxf drop NaNs; the flag restores torch's propagation after the reduction).
struct Stats {
    float lo = INFINITY, hi = -INFINITY, amax = 0.f;
    bool nan = false;

    __device__ __forceinline__ void add(float v) {
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
        amax = fmaxf(amax, fabsf(v));
        nan |= v != v;
    }
    __device__ __forceinline__ void add_group(const float (&v)[8], uint32_t out, int cnt) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
            if (j < cnt && !((out >> j) & 1u)) add(v[j]);
    }
    // Reduce over the aligned segment of tpb lanes (a power of two); every lane of the warp calls it.
    __device__ __forceinline__ void reduce(int tpb, int lane) {
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) {
            if (s < tpb) {
                lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, s));
                hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, s));
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, s));
            }
        }
        const unsigned seg = tpb == 32 ? 0xffffffffu : ((1u << tpb) - 1u) << (lane & ~(tpb - 1));
        if (__ballot_sync(0xffffffffu, nan) & seg) lo = hi = amax = NAN;
    }
};

// The RTN code of v for the stored scale s (and zero z, asymmetric): exactly the reference's
// round((v - z) / s) (IEEE division, round half to even), clamped; scale 0 gives the zero code.
// The formula is csrc/quant_elem.h's, shared with the C++ CPU kernels (csrc/cpu/quant_cpu.cpp).
template <int BITS>
__device__ __forceinline__ uint64_t code_of(float v, float s, float z, bool sym) {
    return (uint64_t)quant_elem::code_of(v, s, z, sym, BITS);
}

// Bytes per access of a group's BITS bytes: the largest power of two dividing BITS, so that
// out + g * BITS stays aligned (the packed buffer itself is 8-byte aligned).
template <int BITS> constexpr int kUnit = BITS & -BITS;

template <int U> struct UInt;
template <> struct UInt<1> { using type = uint8_t; };
template <> struct UInt<2> { using type = uint16_t; };
template <> struct UInt<4> { using type = uint32_t; };
template <> struct UInt<8> { using type = unsigned long long; };

// A group of 8 codes (code j at bits [BITS*(7-j), BITS*(8-j)) of word) as BITS big-endian bytes.
template <int BITS>
__device__ __forceinline__ void store_group(uint8_t* __restrict__ out, int64_t g, uint64_t word) {
    constexpr int U = kUnit<BITS>;
    using W = typename UInt<U>::type;
    W* p = reinterpret_cast<W*>(out + g * BITS);
#pragma unroll
    for (int k = 0; k < BITS / U; ++k) {
        uint64_t u = 0;
#pragma unroll
        for (int i = 0; i < U; ++i) u |= ((word >> (8 * (BITS - 1 - (k * U + i)))) & 0xffu) << (8 * i);
        p[k] = (W)u;
    }
}

// Inverse of store_group: unit loads when vec (packed buffer 8-byte aligned), else byte loads.
template <int BITS>
__device__ __forceinline__ uint64_t load_word(const uint8_t* __restrict__ p, int64_t g, bool vec) {
    constexpr int U = kUnit<BITS>;
    using W = typename UInt<U>::type;
    uint64_t word = 0;
    if (vec) {
        const W* q = reinterpret_cast<const W*>(p + g * BITS);
#pragma unroll
        for (int k = 0; k < BITS / U; ++k) {
            const uint64_t u = (uint64_t)__ldg(q + k);
#pragma unroll
            for (int i = 0; i < U; ++i) word |= ((u >> (8 * i)) & 0xffu) << (8 * (BITS - 1 - (k * U + i)));
        }
    } else {
#pragma unroll
        for (int j = 0; j < BITS; ++j) word |= (uint64_t)p[g * BITS + j] << (8 * (BITS - 1 - j));
    }
    return word;
}

}  // namespace quant
}  // namespace wweight
