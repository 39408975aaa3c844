// CUDA kernels of the sparse family: the four primitives of wweight/sparse/plan.py (glue:
// wweight/backends/cuda/sparse.py).
//
//  * sparse_digit_hist   one radix-select pass (shared-memory histogram per CTA, one global
//                        atomic per bin per CTA), all queries in one launch (grid.y = query)
//  * sparse_tie_counts   per 1024-element block counts of a boundary key
//  * sparse_rescale_stats per block (before, after) partial norms
//  * sparse_merge        the fused mask-and-merge: one read of every input, one write
//
// Each CTA owns BLOCK = 1024 consecutive elements, 4 per thread, so a thread's four elements
// share one Philox call (the stream layout of wweight/reference/philox.py) and tie ranks are a
// block-wide exclusive scan plus the block's offset. Element arithmetic is csrc/sparse_elem.h,
// shared with (and tested through) the CPU build. 64-bit indexing throughout.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <vector>

#include "common.cuh"
#include "sparse_elem.h"

namespace py = pybind11;
using namespace wweight::elem;

namespace {

constexpr int THREADS = 256;
constexpr int PER_THREAD = 4;
constexpr int64_t BLOCK = THREADS * PER_THREAD;
static_assert(BLOCK == kBlock, "a CTA owns one tie block (wweight/sparse/plan.py BLOCK)");
constexpr int MAX_K = 64;                         // models per launch (pointer table in constant args)

struct Ptrs {
    const void* x[MAX_K];
};

struct PlanArgs {
    int mode;
    const int64_t* kp;
    const int64_t* ties;     // (K, 2, nblocks) or null
    int64_t nblocks;
    const float* density;    // (K,) device
    uint64_t seed;
    uint32_t stream0;
};

template <int DT>
__device__ __forceinline__ float delta_at(const void* x, const void* base, int64_t i) {
    float v = load_f32<DT>(x, i);
    return base ? rnd<DT>(v - load_f32<DT>(base, i)) : v;
}

// ---------------------------------------------------------------- radix select histogram
template <int DT>
__global__ void digit_hist_kernel(Ptrs xs, const void* base, const int64_t* qmodel, const int64_t* prefix,
                                  unsigned long long* hist, int64_t n, int shift, int nbits, int high_shift,
                                  bool has_prefix) {
    extern __shared__ unsigned int sh[];
    const int nb = 1 << nbits;
    for (int j = threadIdx.x; j < nb; j += blockDim.x) sh[j] = 0;
    __syncthreads();
    const int q = blockIdx.y;
    const void* x = xs.x[qmodel[q]];
    const int64_t pre = prefix[q] >> high_shift;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        int64_t key = key_of<DT>(delta_at<DT>(x, base, i));
        if (has_prefix && (key >> high_shift) != pre) continue;
        atomicAdd(&sh[(key >> shift) & (nb - 1)], 1u);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < nb; j += blockDim.x)
        if (sh[j]) atomicAdd(&hist[int64_t(q) * nb + j], (unsigned long long)sh[j]);
}

// ---------------------------------------------------------------- tie counts
template <int DT>
__global__ void tie_count_kernel(Ptrs xs, const void* base, const int64_t* qmodel, const int64_t* qkey,
                                 int64_t* out, int64_t n, int64_t nblocks) {
    using Reduce = cub::BlockReduce<int, THREADS>;
    __shared__ typename Reduce::TempStorage tmp;
    const int q = blockIdx.y;
    const void* x = xs.x[qmodel[q]];
    const int64_t key = qkey[q];
    const int64_t s = int64_t(blockIdx.x) * BLOCK + int64_t(threadIdx.x) * PER_THREAD;
    int c = 0;
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j)
        if (s + j < n) c += key_of<DT>(delta_at<DT>(x, base, s + j)) == key;
    int total = Reduce(tmp).Sum(c);
    if (threadIdx.x == 0) out[int64_t(q) * nblocks + blockIdx.x] = total;
}

struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct Add2 {
    __device__ __forceinline__ int2 operator()(const int2& a, const int2& b) const {
        return make_int2(a.x + b.x, a.y + b.y);
    }
};

// Keep flags of this thread's 4 elements of model t (tie ranks via a block scan).
template <int DT, bool HAS_TIES>
__device__ __forceinline__ void keep4(const PlanArgs& p, int t, int64_t s, int64_t n, const float d[4], bool keep[4]) {
    if (p.mode == MODE_WINDOW) {
        const int64_t* r = p.kp + 6 * t;
        Window w{r[0], r[1], r[2], r[3], r[4], r[5]};
        int64_t key[4];
        int lo = 0, hi = 0;
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            key[j] = key_of<DT>(d[j]);
            bool in = s + j < n;
            lo += in && key[j] == w.key_lo;
            hi += in && key[j] == w.key_hi;
        }
        int64_t r_lo = 0, r_hi = 0;
        if (HAS_TIES) {
            using Scan = cub::BlockScan<int2, THREADS>;
            __shared__ typename Scan::TempStorage tmp;
            int2 mine = make_int2(lo, hi), before;
            Scan(tmp).ExclusiveScan(mine, before, make_int2(0, 0), Add2());
            __syncthreads();  // tmp is reused for the next model
            r_lo = p.ties[(int64_t(t) * 2 + 0) * p.nblocks + blockIdx.x] + before.x;
            r_hi = p.ties[(int64_t(t) * 2 + 1) * p.nblocks + blockIdx.x] + before.y;
        }
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            keep[j] = window_keep(w, key[j], r_lo, r_hi);
            if (HAS_TIES) {
                bool in = s + j < n;
                r_lo += in && key[j] == w.key_lo;
                r_hi += in && key[j] == w.key_hi;
            }
        }
    } else if (p.mode == MODE_RANDOM) {
        float u[4];
        uniform4(s >> 2, p.seed, p.stream0 + uint32_t(t), u);
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) keep[j] = u[j] < p.density[t];
    } else {
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) keep[j] = true;
    }
}

// ---------------------------------------------------------------- rescale statistics
template <int DT, bool HAS_TIES>
__global__ void stats_kernel(Ptrs xs, const void* base, PlanArgs p, float* out, int64_t n, int norm) {
    using Reduce = cub::BlockReduce<float, THREADS>;
    __shared__ typename Reduce::TempStorage tmp;
    const int t = blockIdx.y;
    const int64_t s = int64_t(blockIdx.x) * BLOCK + int64_t(threadIdx.x) * PER_THREAD;
    float d[4];
    bool keep[4];
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) d[j] = s + j < n ? delta_at<DT>(xs.x[t], base, s + j) : 0.f;
    keep4<DT, HAS_TIES>(p, t, s, n, d, keep);
    float b = 0.f, a = 0.f;
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        float v = fabsf(d[j]);
        float vk = keep[j] ? v : 0.f;
        if (norm == 1) { b += v; a += vk; }
        else if (norm == 2) { b += v * v; a += vk * vk; }
        else { b = fmaxf(b, v); a = fmaxf(a, vk); }
    }
    float bb, aa;
    if (norm == 3) {
        bb = Reduce(tmp).Reduce(b, MaxOp());
        __syncthreads();
        aa = Reduce(tmp).Reduce(a, MaxOp());
    } else {
        bb = Reduce(tmp).Sum(b);
        __syncthreads();
        aa = Reduce(tmp).Sum(a);
    }
    if (threadIdx.x == 0) {
        float* row = out + (int64_t(t) * p.nblocks + blockIdx.x) * 2;
        row[0] = bb;
        row[1] = aa;
    }
}

// ---------------------------------------------------------------- fused merge
template <int DT, int RD, bool HAS_TIES>
__global__ void merge_kernel(Ptrs xs, int K, const void* base, void* out, PlanArgs p, const float* weights,
                             const float* scales, int* flags, int64_t n, float lam, float divisor_nc, bool consensus,
                             bool normalize, bool sparsify_only) {
    const int64_t s = int64_t(blockIdx.x) * BLOCK + int64_t(threadIdx.x) * PER_THREAD;
    float b[4];
    MergeAcc acc[4];
    bool bad = false;
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        b[j] = (base && s + j < n) ? load_f32<DT>(base, s + j) : 0.f;
        bad |= !finite(b[j]);
    }
    if (bad) flags[K] = 1;
    for (int t = 0; t < K; ++t) {
        float d[4];
        bool keep[4];
        bool badt = false;
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            float x = s + j < n ? load_f32<DT>(xs.x[t], s + j) : 0.f;
            badt |= !finite(x);
            d[j] = base ? rnd<DT>(x - b[j]) : x;
        }
        if (badt) flags[t] = 1;
        if (p.mode != MODE_NONE) keep4<DT, HAS_TIES>(p, t, s, n, d, keep);
        const float w = sparsify_only ? 1.f : weights[t];
        const float sc = p.mode != MODE_NONE ? scales[t] : 1.f;
#pragma unroll
        for (int j = 0; j < PER_THREAD; ++j) {
            float v = d[j];
            if (p.mode != MODE_NONE) v = rnd<RD>((keep[j] ? v : 0.f) * sc);
            if (sparsify_only) acc[j].total = v;
            else acc[j].add(rnd<RD>(v * w), w);
        }
    }
    const bool apply_lambda = lam != 1.f;
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        if (s + j >= n) continue;
        float v = sparsify_only ? acc[j].total
                                : finish<RD>(acc[j], b[j], consensus, normalize, apply_lambda, lam, divisor_nc);
        store_f32<DT>(out, s + j, v);
    }
}

// ---------------------------------------------------------------- host wrappers
Ptrs make_ptrs(const std::vector<uintptr_t>& xs) {
    if (xs.size() > size_t(MAX_K)) throw std::invalid_argument("wweight._cuda: at most 64 models per launch");
    Ptrs p{};
    for (size_t i = 0; i < xs.size(); ++i) p.x[i] = reinterpret_cast<const void*>(xs[i]);
    return p;
}

int num_sms() {
    int dev = 0, sms = 0;
    wweight::check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    wweight::check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    return sms;
}

void digit_hist(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, uintptr_t qmodel, int64_t Q,
                uintptr_t prefix, int shift, int nbits, int high_shift, bool has_prefix, uintptr_t hist,
                uintptr_t stream) {
    if (n == 0 || Q == 0) return;
    Ptrs p = make_ptrs(xs);
    int64_t want = (n + THREADS * 16 - 1) / (THREADS * 16);
    int grid_x = int(std::min<int64_t>(want, int64_t(num_sms()) * 8));
    dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(Q));
    size_t smem = sizeof(unsigned int) << nbits;
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        digit_hist_kernel<DT><<<grid, THREADS, smem, wweight::as_stream(stream)>>>(
            p, reinterpret_cast<const void*>(base), reinterpret_cast<const int64_t*>(qmodel),
            reinterpret_cast<const int64_t*>(prefix), reinterpret_cast<unsigned long long*>(hist), n, shift, nbits,
            high_shift, has_prefix);
    });
    wweight::check_cuda(cudaGetLastError(), "sparse_digit_hist");
}

void tie_counts(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, uintptr_t qmodel, uintptr_t qkey,
                int64_t Q, uintptr_t out, uintptr_t stream) {
    const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    if (n == 0 || Q == 0) return;
    Ptrs p = make_ptrs(xs);
    dim3 grid(static_cast<unsigned>(nblocks), static_cast<unsigned>(Q));
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        tie_count_kernel<DT><<<grid, THREADS, 0, wweight::as_stream(stream)>>>(
            p, reinterpret_cast<const void*>(base), reinterpret_cast<const int64_t*>(qmodel),
            reinterpret_cast<const int64_t*>(qkey), reinterpret_cast<int64_t*>(out), n, nblocks);
    });
    wweight::check_cuda(cudaGetLastError(), "sparse_tie_counts");
}

PlanArgs make_plan(int mode, uintptr_t kp, uintptr_t ties, int64_t n, uintptr_t density, uint64_t seed,
                   uint32_t stream0) {
    return PlanArgs{mode, reinterpret_cast<const int64_t*>(kp), reinterpret_cast<const int64_t*>(ties),
                    (n + BLOCK - 1) / BLOCK, reinterpret_cast<const float*>(density), seed, stream0};
}

void rescale_stats(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, int mode, uintptr_t kp,
                   uintptr_t ties, uintptr_t density, uint64_t seed, uint32_t stream0, int norm, uintptr_t out,
                   uintptr_t stream) {
    if (n == 0) return;
    Ptrs p = make_ptrs(xs);
    PlanArgs pa = make_plan(mode, kp, ties, n, density, seed, stream0);
    dim3 grid(static_cast<unsigned>(pa.nblocks), static_cast<unsigned>(xs.size()));
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        if (ties)
            stats_kernel<DT, true><<<grid, THREADS, 0, wweight::as_stream(stream)>>>(
                p, reinterpret_cast<const void*>(base), pa, reinterpret_cast<float*>(out), n, norm);
        else
            stats_kernel<DT, false><<<grid, THREADS, 0, wweight::as_stream(stream)>>>(
                p, reinterpret_cast<const void*>(base), pa, reinterpret_cast<float*>(out), n, norm);
    });
    wweight::check_cuda(cudaGetLastError(), "sparse_rescale_stats");
}

template <int DT, int RD>
void launch_merge(bool has_ties, dim3 grid, cudaStream_t st, Ptrs p, int K, const void* base, void* out,
                  PlanArgs pa, const float* w, const float* sc, int* flags, int64_t n, float lam, float div,
                  bool consensus, bool normalize, bool sparsify_only) {
    if (has_ties)
        merge_kernel<DT, RD, true><<<grid, THREADS, 0, st>>>(p, K, base, out, pa, w, sc, flags, n, lam, div,
                                                              consensus, normalize, sparsify_only);
    else
        merge_kernel<DT, RD, false><<<grid, THREADS, 0, st>>>(p, K, base, out, pa, w, sc, flags, n, lam, div,
                                                               consensus, normalize, sparsify_only);
}

void merge(std::vector<uintptr_t> xs, uintptr_t base, uintptr_t out, int dt, int64_t n, int mode, uintptr_t kp,
           uintptr_t ties, uintptr_t density, uint64_t seed, uint32_t stream0, uintptr_t weights, uintptr_t scales,
           float lam, float divisor_nc, bool consensus, bool normalize, bool sparsify_only, bool round16,
           uintptr_t flags, uintptr_t stream) {
    if (n == 0) return;
    Ptrs p = make_ptrs(xs);
    PlanArgs pa = make_plan(mode, kp, ties, n, density, seed, stream0);
    dim3 grid(static_cast<unsigned>(pa.nblocks));
    cudaStream_t st = wweight::as_stream(stream);
    const void* b = reinterpret_cast<const void*>(base);
    void* o = reinterpret_cast<void*>(out);
    const float* w = reinterpret_cast<const float*>(weights);
    const float* sc = reinterpret_cast<const float*>(scales);
    int* f = reinterpret_cast<int*>(flags);
    const int K = int(xs.size());
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        if (round16)
            launch_merge<DT, DT>(ties != 0, grid, st, p, K, b, o, pa, w, sc, f, n, lam, divisor_nc, consensus,
                                 normalize, sparsify_only);
        else
            launch_merge<DT, F32>(ties != 0, grid, st, p, K, b, o, pa, w, sc, f, n, lam, divisor_nc, consensus,
                                  normalize, sparsify_only);
    });
    wweight::check_cuda(cudaGetLastError(), "sparse_merge");
}

}  // namespace

void register_sparse(py::module_& m) {
    m.def("sparse_digit_hist", &digit_hist);
    m.def("sparse_tie_counts", &tie_counts);
    m.def("sparse_rescale_stats", &rescale_stats);
    m.def("sparse_merge", &merge);
}
