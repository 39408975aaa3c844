// The per-thread memory layout of the sparse CUDA kernels (csrc/sparse.cu): 16 bytes per thread
// and input, so every input is read with one LDG.E.128 and the output written with one STG.E.128.
//
// A CTA still owns one tie block of kBlock = 1024 consecutive elements (wweight/sparse/plan.py
// BLOCK): fp32 runs 256 threads x 4 elements, 16-bit dtypes 128 threads x 8. Tie ranks are a
// block scan in element order and every 4 consecutive elements 4q..4q+3 share one Philox call, so
// the numbers do not depend on how many elements a thread holds.
#pragma once
#include <cstdint>

#include "sparse_elem.h"

namespace wweight {
namespace vec {

using namespace ::wweight::elem;

template <int DT> constexpr int ept() { return DT == F32 ? 4 : 8; }             // elements per thread
template <int DT> constexpr int threads() { return int(kBlock) / ept<DT>(); }   // threads per CTA
template <int DT> constexpr int esize() { return DT == F32 ? 4 : 2; }           // bytes per element
static_assert(threads<F32>() * ept<F32>() == kBlock && threads<F16>() * ept<F16>() == kBlock, "one tie block per CTA");

// One thread's 16 bytes, little-endian: 16-bit element 2k is the low half of word k.
struct Raw {
    uint32_t w[4];
};

// This thread's elements s .. s+E-1 of p; elements at or past n read as 0 (+0.0 in every dtype).
// `full`: all E are in range and every pointer of the launch is 16-byte aligned (the host checks
// the pointers; a CTA's first element is a multiple of 1024). Otherwise scalar loads: unaligned
// tensors (views at odd offsets) and the tail of the last block.
template <int DT>
__device__ __forceinline__ Raw load_raw(const void* p, int64_t s, int nin, bool full) {
    Raw r;
    if (full) {
        const uint4 q = *reinterpret_cast<const uint4*>(static_cast<const char*>(p) + s * esize<DT>());
        r.w[0] = q.x; r.w[1] = q.y; r.w[2] = q.z; r.w[3] = q.w;
        return r;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) r.w[k] = 0u;
    if (DT == F32) {
        const uint32_t* q = static_cast<const uint32_t*>(p) + s;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (j < nin) r.w[j] = q[j];
    } else {
        const uint16_t* q = static_cast<const uint16_t*>(p) + s;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            if (j < nin) r.w[j >> 1] |= uint32_t(q[j]) << (16 * (j & 1));
    }
    return r;
}

template <int DT>
__device__ __forceinline__ void unpack(const Raw& r, float* v) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if (DT == F32) {
            v[k] = __uint_as_float(r.w[k]);
        } else if (DT == BF16) {                       // bf16 -> fp32 is the upper half
            v[2 * k] = __uint_as_float(r.w[k] << 16);
            v[2 * k + 1] = __uint_as_float(r.w[k] & 0xFFFF0000u);
        } else {
            v[2 * k] = f16_to_f32(uint16_t(r.w[k] & 0xFFFFu));
            v[2 * k + 1] = f16_to_f32(uint16_t(r.w[k] >> 16));
        }
    }
}

template <int DT>
__device__ __forceinline__ uint32_t bits_of(float v) {
    return DT == F32 ? __float_as_uint(v) : DT == F16 ? uint32_t(f32_to_f16(v)) : uint32_t(f32_to_bf16(v));
}

// Store this thread's elements of v (only those below n).
template <int DT>
__device__ __forceinline__ void store_vec(void* p, int64_t s, int nin, bool full, const float* v) {
    Raw r;
#pragma unroll
    for (int k = 0; k < 4; ++k)
        r.w[k] = DT == F32 ? bits_of<DT>(v[k]) : bits_of<DT>(v[2 * k]) | (bits_of<DT>(v[2 * k + 1]) << 16);
    if (full) {
        *reinterpret_cast<uint4*>(static_cast<char*>(p) + s * esize<DT>()) = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
    } else if (DT == F32) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (j < nin) static_cast<uint32_t*>(p)[s + j] = r.w[j];
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j)
            if (j < nin) static_cast<uint16_t*>(p)[s + j] = uint16_t(r.w[j >> 1] >> (16 * (j & 1)));
    }
}

// Number of this thread's elements below n, in 0..E (a 32-bit loop bound for the tail tests).
template <int DT>
__device__ __forceinline__ int in_range(int64_t s, int64_t n) {
    const int64_t left = n - s;
    return left <= 0 ? 0 : left >= ept<DT>() ? ept<DT>() : int(left);
}

// The deltas of this thread's elements: x, or x - base rounded to the dtype (as torch does).
template <int DT>
__device__ __forceinline__ void deltas(const Raw& x, const float* b, bool has_base, float* d) {
    unpack<DT>(x, d);
    if (has_base) {
#pragma unroll
        for (int j = 0; j < ept<DT>(); ++j) d[j] = rnd<DT>(d[j] - b[j]);
    }
}

// Keep window of one model in 32-bit compares. The plan's keys are < 2^31 and its sentinels are
// -1 and 2^62 (wweight/sparse/plan.py BIG); each test is rewritten with the same truth for every
// 32-bit key: key > lo as key >= lo+1, and an impossible equality as key == 0xFFFFFFFF.
struct Win32 {
    uint32_t ge_lo, lt_hi, eq_lo, eq_hi;
};
__device__ __forceinline__ uint32_t clamp_u32(int64_t v) {
    return v < 0 ? 0u : v > int64_t(0xFFFFFFFFu) ? 0xFFFFFFFFu : uint32_t(v);
}
__device__ __forceinline__ Win32 win32(const int64_t* r) {
    const int64_t lo = r[0], hi = r[1];
    const bool lo_ok = lo >= 0 && lo < int64_t(0xFFFFFFFFu), hi_ok = hi >= 0 && hi < int64_t(0xFFFFFFFFu);
    return Win32{clamp_u32(lo + 1), clamp_u32(hi), lo_ok ? uint32_t(lo) : 0xFFFFFFFFu,
                 hi_ok ? uint32_t(hi) : 0xFFFFFFFFu};
}
// A rank window [a, b) seen from a thread whose first tied element has rank r0: its local ranks
// are 0..E, so a - r0 and b - r0 clamp to -1..E+1 with the same truth.
__device__ __forceinline__ int rel_rank(int64_t a, int64_t r0, int e) {
    const int64_t v = a - r0;
    return v < -1 ? -1 : v > e + 1 ? e + 1 : int(v);
}

}  // namespace vec
}  // namespace wweight
