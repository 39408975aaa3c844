// Per-element logic of the fused DELLA path (Deep et al. 2024, "DELLA-Merging: Reducing Interference
// in Model Merging through Magnitude-Based Sampling"), usable from host code (csrc/cpu/della_cpu.cpp)
// and from CUDA (__host__ __device__ through WW_HD of sparse_elem.h), so a CUDA kernel can follow
// with the very same numbers.
//
// It reproduces wweight/reference/sparse.py della_probabilities_ref / della_magprune_ref bit for
// bit: every torch op there rounds its result to the work dtype WD (float32 for fp32/fp16 inputs,
// bfloat16 for bf16: mergekit upcasts only fp16), so each step below rounds with rnd<WD> exactly
// where torch does. How torch treats the Python scalars matters for bf16 (measured on torch 2.13,
// CPU): `tensor * s` multiplies by float(s) (the unrounded scalar), `s + tensor` first rounds s to
// the tensor's dtype. The host passes those two constants already converted (DellaRow::base_p,
// DellaRow::eps2).
#pragma once
#include <cmath>
#include <cstdint>

#include "sparse_elem.h"

namespace wweight {
namespace elem {

// Per-model mode of the fused DELLA merge (== wweight/backends/cpu/sparse.py DELLA_*):
// FULL keeps the delta (density >= 1: the reference returns it untouched), ZERO drops it
// (density <= 0), SAMPLE draws the magnitude-ranked keep mask.
enum DellaMode : int { DELLA_FULL = 0, DELLA_ZERO = 1, DELLA_SAMPLE = 2 };

// The constants of one row length m (ranks 1..m as the reference rounds them) and one model.
struct DellaRow {
    float lo;       // min rank = rank of position 0 (= 1)
    float span;     // rnd(hi - lo), hi = rank of position m - 1
    float base_p;   // density - epsilon as `s + tensor` sees it (rounded to WD)
    float eps;      // float(epsilon) as `tensor * s` sees it (unrounded)
};

// The reference's rank of the element at stable ascending position r (0-based):
// `argsort(argsort(|x|, stable=True)).to(wd) + 1`, i.e. rnd(rnd(float(r)) + 1).
template <int WD>
WW_HD float della_rank(int64_t r) {
    return rnd<WD>(rnd<WD>(float(r)) + 1.0f);
}

template <int WD>
WW_HD DellaRow della_row(int64_t m, float base_p, float eps) {
    DellaRow d;
    d.lo = della_rank<WD>(0);
    d.span = rnd<WD>(della_rank<WD>(m - 1) - d.lo);   // ranks are monotone: max is the last position
    d.base_p = base_p;
    d.eps = eps;
    return d;
}

// Keep probability of stable position r: (density - eps) + rank_norm * 2 * eps, rank_norm =
// clamp((rank - lo) / span, 0, 1) (0 when span == 0, i.e. rows of one element), each op rounded.
template <int WD>
WW_HD float della_prob(const DellaRow& row, int64_t r) {
    float rn = 0.f;
    if (row.span > 0.f) {
        rn = rnd<WD>(rnd<WD>(della_rank<WD>(r) - row.lo) / row.span);
        rn = rn < 0.f ? 0.f : (rn > 1.f ? 1.f : rn);
    }
    const float t = rnd<WD>(rnd<WD>(rn * 2.0f) * row.eps);
    return rnd<WD>(row.base_p + t);
}

// The sparsified delta of one element in the input dtype DT: `(d * mask)` in WD (a dropped negative
// element is -0, as torch's product), times the rescale factor when there is one, back to DT.
template <int DT, int WD>
WW_HD float della_apply(float d, bool keep, bool has_scale, float scale) {
    float v = d * (keep ? 1.0f : 0.0f);   // exact; keeps torch's signed zero
    if (has_scale) v = rnd<WD>(v * scale);
    return rnd<DT>(v);
}

// Neumaier's compensated sum: the per-row norms of the rescale are (s, c) pairs the host adds with
// math.fsum, so the result matches the reference's float64 fixed-order sum to double rounding
// whatever the thread count (rows are grouped in a fixed way, never per thread).
struct CompSum {
    double s = 0.0, c = 0.0;
    WW_HD void add(double x) {
        const double t = s + x;
        // the larger operand's low bits survive in t; recover the smaller one's lost bits
        if (fabs(s) >= fabs(x)) c += (s - t) + x;
        else c += (x - t) + s;
        s = t;
    }
};

}  // namespace elem
}  // namespace wweight
