// Keep flags of the sparse CUDA kernels (csrc/sparse.cu): magnitude windows with tie ranks and
// Philox random masks, for one thread's ept<DT>() elements of one model (layout: sparse_vec.cuh).
#pragma once
#include <cub/block/block_scan.cuh>

#include "sparse_vec.cuh"

namespace wweight {
namespace vec {

struct PlanArgs {
    int mode;
    const int64_t* kp;
    const int64_t* ties;     // (K, 2, nblocks) or null
    int64_t nblocks;
    const float* density;    // (K,) device
    uint64_t seed;
    uint32_t stream0;
};

struct Add2 {
    __device__ __forceinline__ int2 operator()(const int2& a, const int2& b) const {
        return make_int2(a.x + b.x, a.y + b.y);
    }
};

// Keep flags of this thread's E elements of model t (tie ranks via a block scan). nin: elements
// below n (the others never count as ties).
template <int DT, bool HAS_TIES>
__device__ __forceinline__ void keep_flags(const PlanArgs& p, int t, int64_t s, int nin, const float* d, bool* keep) {
    constexpr int E = ept<DT>();
    if (p.mode == MODE_WINDOW) {
        const int64_t* r = p.kp + 6 * t;
        const Win32 w = win32(r);
        uint32_t key[E];
        int lo = 0, hi = 0;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            key[j] = key_of<DT>(d[j]);
            lo += (j < nin) & (key[j] == w.eq_lo);
            hi += (j < nin) & (key[j] == w.eq_hi);
        }
        int64_t r_lo = 0, r_hi = 0;                       // rank of this thread's first tie
        if (HAS_TIES) {
            using Scan = cub::BlockScan<int2, threads<DT>()>;
            __shared__ typename Scan::TempStorage tmp;
            int2 mine = make_int2(lo, hi), before;
            Scan(tmp).ExclusiveScan(mine, before, make_int2(0, 0), Add2());
            __syncthreads();  // tmp is reused for the next model
            r_lo = p.ties[(int64_t(t) * 2 + 0) * p.nblocks + blockIdx.x] + before.x;
            r_hi = p.ties[(int64_t(t) * 2 + 1) * p.nblocks + blockIdx.x] + before.y;
        }
        // rank windows relative to this thread: 32-bit compares per element
        const int a = rel_rank(r[2], r_lo, E), b = rel_rank(r[3], r_lo, E);
        const int c = rel_rank(r[4], r_hi, E), e = rel_rank(r[5], r_hi, E);
        int k_lo = 0, k_hi = 0;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            // bitwise, not short-circuit: keep the hot loop free of unpredictable branches
            bool k = (key[j] >= w.ge_lo) & (key[j] < w.lt_hi);
            k |= (key[j] == w.eq_lo) & (k_lo >= a) & (k_lo < b);
            k |= (key[j] == w.eq_hi) & (k_hi >= c) & (k_hi < e);
            keep[j] = k;
            if (HAS_TIES) {
                k_lo += (j < nin) & (key[j] == w.eq_lo);
                k_hi += (j < nin) & (key[j] == w.eq_hi);
            }
        }
    } else if (p.mode == MODE_RANDOM) {
        const float dens = p.density[t];
#pragma unroll
        for (int g = 0; g < E / 4; ++g) {
            float u[4];
            uniform4((s >> 2) + g, p.seed, p.stream0 + uint32_t(t), u);
#pragma unroll
            for (int j = 0; j < 4; ++j) keep[4 * g + j] = u[j] < dens;
        }
    } else {
#pragma unroll
        for (int j = 0; j < E; ++j) keep[j] = true;
    }
}

}  // namespace vec
}  // namespace wweight
