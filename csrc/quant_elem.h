// Element formulas of the quant family shared by the C++ CPU kernels (csrc/cpu/quant_cpu.cpp) and
// usable from CUDA: the stored scale / zero of a block and the RTN code of one element, exactly
// wweight/reference/quant.py (float32 arithmetic, one IEEE rounding per operation, round half to
// even), so the CPU build that CI runs checks the same formulas the GPU kernels use.
//
// Host builds must not contract a * b + c into an FMA (quant_cpu.cpp turns contraction off) and
// must not use fast-math: every formula below is a sequence of separately rounded float32 ops.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define WQ_HD __host__ __device__ __forceinline__
#else
#define WQ_HD inline
#endif

namespace wweight {
namespace quant_elem {

WQ_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}
WQ_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
WQ_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

// max(q, lo) with NaN -> lo, min(q, hi): the CUDA fmaxf / fminf results for every input (a
// NaN quotient becomes the lowest code there too); on x86 these are maxss / minss.
WQ_HD float clamp_nan_lo(float q, float lo, float hi) {
    q = q > lo ? q : lo;
    return q < hi ? q : hi;
}

// Round half to even of |q| <= 2^22 (clamped codes are within [-128, 255]): adding and removing
// 1.5 * 2^23 leaves the integer that IEEE round-to-nearest-even picks (rintf, torch.round).
WQ_HD float rint_small(float q) {
#if defined(__CUDA_ARCH__)
    return rintf(q);
#else
    const float m = 12582912.0f;  // no fast-math: the compiler keeps both roundings
    return (q + m) - m;
#endif
}

// The unrounded float32 scale (and zero) of a block from its non-outlier statistics; the caller
// rounds both to the storage dtype (torch's .to(scale_dtype)). lo > hi (every element an outlier)
// gives 0. clip <= 0: no clipping.
WQ_HD void block_scale(float lo, float hi, float amax, int bits, bool sym, float clip, float& s, float& z) {
    const bool has_clip = clip > 0.f;
    if (sym) {
        const float a = has_clip ? fmul(amax, clip) : amax;
        s = fdiv(a, (float)((1 << (bits - 1)) - 1));
        z = 0.f;
    } else {
        if (lo > hi) lo = hi = 0.f;
        const float l = has_clip ? fmul(lo, clip) : lo;
        const float h = has_clip ? fmul(hi, clip) : hi;
        s = fdiv(fsub(h, l), (float)((1 << bits) - 1));
        z = l;
    }
}

// The code of v for the STORED scale s / zero z (as float32): clamp(round(v / s)) + 2^(b-1)
// (symmetric) or clamp(round((v - z) / s)) (asymmetric); scale 0 gives the zero code. Clamping
// before rounding gives the same integer (the bounds are integers) and keeps |q| small.
WQ_HD uint32_t code_of(float v, float s, float z, bool sym, int bits) {
    if (sym) {
        const float half = (float)(1 << (bits - 1));
        const float q = s > 0.f ? clamp_nan_lo(fdiv(v, s), -half, half - 1.f) : 0.f;
        return (uint32_t)(int)(rint_small(q) + half);
    }
    const float q = s > 0.f ? clamp_nan_lo(fdiv(fsub(v, z), s), 0.f, (float)((1 << bits) - 1)) : 0.f;
    return (uint32_t)(int)rint_small(q);
}

// The dequantized float32 value of code c: (c - 2^(b-1)) * s, or c * s + z (two roundings).
WQ_HD float value_of(uint32_t c, float s, float z, bool sym, int bits) {
    if (sym) return fmul((float)c - (float)(1 << (bits - 1)), s);
    const float p = fmul((float)c, s);
#if defined(__CUDA_ARCH__)
    return __fadd_rn(p, z);
#else
    return p + z;
#endif
}

}  // namespace quant_elem
}  // namespace wweight
