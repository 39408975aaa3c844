// CUDA kernels of the sparse family: the four primitives of wweight/sparse/plan.py (glue:
// wweight/backends/cuda/sparse.py).
//
//  * sparse_digit_hist   one radix-select pass (shared-memory histogram per CTA, one global
//                        atomic per bin per CTA), all queries in one launch (grid.y = query)
//  * sparse_tie_counts   per 1024-element block counts of a boundary key
//  * sparse_rescale_stats per block (before, after) partial norms
//  * sparse_merge        the fused mask-and-merge: one read of every input, one write
//
// Each CTA owns BLOCK = 1024 consecutive elements and each thread 16 bytes of them (4 fp32 or 8
// 16-bit elements: csrc/sparse_vec.cuh), read with one 128-bit load per input when the launch's
// pointers are 16-byte aligned. Every 4 consecutive elements share one Philox call (the stream
// layout of wweight/reference/philox.py) and tie ranks are a block-wide exclusive scan plus the
// block's offset, so results do not depend on that split. Element arithmetic is
// csrc/sparse_elem.h, shared with (and tested through) the CPU build. 64-bit element indices;
// grids stay within the hardware limits (grid.x < 2^31, grid.y <= 65535) for any n.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <algorithm>
#include <initializer_list>
#include <vector>

#include "common.cuh"
#include "sparse_elem.h"
#include "sparse_vec.cuh"
#include "sparse_keep.cuh"

namespace py = pybind11;
using namespace wweight::elem;

namespace {

using wweight::vec::keep_flags;
using wweight::vec::PlanArgs;
using wweight::vec::Raw;
using wweight::vec::ept;
using wweight::vec::in_range;
using wweight::vec::load_raw;
using wweight::vec::threads;
using wweight::vec::unpack;

constexpr int64_t BLOCK = kBlock;                 // elements per CTA (one tie block)
constexpr int HIST_THREADS = 256;
constexpr int MAX_K = 64;                         // models per launch (pointer table in constant args)
constexpr unsigned MAX_GRID_Y = 65535;

struct Ptrs {
    const void* x[MAX_K];
};


// ---------------------------------------------------------------- radix select histogram
// Grid-stride over 16-byte chunks; query q0 + blockIdx.y. Keys and prefixes are < 2^31, so the
// prefix test (key >> high_shift) == (prefix >> high_shift) is a 32-bit mask compare.
template <int DT>
__global__ void digit_hist_kernel(Ptrs xs, const void* base, const int64_t* qmodel, const int64_t* prefix,
                                  unsigned long long* hist, int64_t n, int shift, int nbits, int high_shift,
                                  bool has_prefix, bool aligned, int q0) {
    constexpr int E = ept<DT>();
    extern __shared__ unsigned int sh[];
    const int nb = 1 << nbits;
    for (int j = threadIdx.x; j < nb; j += blockDim.x) sh[j] = 0;
    __syncthreads();
    const int q = q0 + int(blockIdx.y);
    const void* x = xs.x[qmodel[q]];
    const uint32_t hmask = (!has_prefix || high_shift >= 32) ? 0u : ~0u << high_shift;
    const uint32_t pre = uint32_t(prefix[q]) & hmask;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x * E;
    for (int64_t s = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * E; s < n; s += stride) {
        const int nin = in_range<DT>(s, n);
        const bool full = aligned && nin == E;
        float b[E], d[E];
        if (base) unpack<DT>(load_raw<DT>(base, s, nin, full), b);
        wweight::vec::deltas<DT>(load_raw<DT>(x, s, nin, full), b, base != nullptr, d);
#pragma unroll
        for (int j = 0; j < E; ++j) {
            const uint32_t key = key_of<DT>(d[j]);
            if (j < nin && (key & hmask) == pre) atomicAdd(&sh[(key >> shift) & uint32_t(nb - 1)], 1u);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < nb; j += blockDim.x)
        if (sh[j]) atomicAdd(&hist[int64_t(q) * nb + j], (unsigned long long)sh[j]);
}

// ---------------------------------------------------------------- tie counts
template <int DT>
__global__ void __launch_bounds__(threads<DT>()) tie_count_kernel(Ptrs xs, const void* base, const int64_t* qmodel,
                                                                  const int64_t* qkey, int64_t* out, int64_t n,
                                                                  int64_t nblocks, bool aligned, int q0) {
    constexpr int E = ept<DT>();
    using Reduce = cub::BlockReduce<int, threads<DT>()>;
    __shared__ typename Reduce::TempStorage tmp;
    const int q = q0 + int(blockIdx.y);
    const void* x = xs.x[qmodel[q]];
    const int64_t key = qkey[q];
    const bool key_ok = key >= 0 && key < int64_t(0xFFFFFFFFu);   // else no key equals it
    const int64_t s = int64_t(blockIdx.x) * BLOCK + int64_t(threadIdx.x) * E;
    const int nin = in_range<DT>(s, n);
    const bool full = aligned && nin == E;
    float b[E], d[E];
    if (base) unpack<DT>(load_raw<DT>(base, s, nin, full), b);
    wweight::vec::deltas<DT>(load_raw<DT>(x, s, nin, full), b, base != nullptr, d);
    int c = 0;
#pragma unroll
    for (int j = 0; j < E; ++j) c += (j < nin) & key_ok & (key_of<DT>(d[j]) == uint32_t(key));
    int total = Reduce(tmp).Sum(c);
    if (threadIdx.x == 0) out[int64_t(q) * nblocks + blockIdx.x] = total;
}

struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// ---------------------------------------------------------------- rescale statistics
template <int DT, bool HAS_TIES>
__global__ void __launch_bounds__(threads<DT>()) stats_kernel(Ptrs xs, const void* base, PlanArgs p, float* out,
                                                              int64_t n, int norm, bool aligned) {
    constexpr int E = ept<DT>();
    using Reduce = cub::BlockReduce<float, threads<DT>()>;
    __shared__ typename Reduce::TempStorage tmp;
    const int t = blockIdx.y;
    const int64_t s = int64_t(blockIdx.x) * BLOCK + int64_t(threadIdx.x) * E;
    const int nin = in_range<DT>(s, n);
    const bool full = aligned && nin == E;
    float b[E], d[E];
    bool keep[E];
    if (base) unpack<DT>(load_raw<DT>(base, s, nin, full), b);
    wweight::vec::deltas<DT>(load_raw<DT>(xs.x[t], s, nin, full), b, base != nullptr, d);
    keep_flags<DT, HAS_TIES>(p, t, s, nin, d, keep);
    float bb = 0.f, aa = 0.f;
#pragma unroll
    for (int j = 0; j < E; ++j) {
        float v = fabsf(d[j]);
        float vk = keep[j] ? v : 0.f;
        if (norm == 1) { bb += v; aa += vk; }
        else if (norm == 2) { bb += v * v; aa += vk * vk; }
        else { bb = fmaxf(bb, v); aa = fmaxf(aa, vk); }
    }
    if (norm == 3) {
        bb = Reduce(tmp).Reduce(bb, MaxOp());
        __syncthreads();
        aa = Reduce(tmp).Reduce(aa, MaxOp());
    } else {
        bb = Reduce(tmp).Sum(bb);
        __syncthreads();
        aa = Reduce(tmp).Sum(aa);
    }
    if (threadIdx.x == 0) {
        float* row = out + (int64_t(t) * p.nblocks + blockIdx.x) * 2;
        row[0] = bb;
        row[1] = aa;
    }
}

// ---------------------------------------------------------------- fused merge
template <int DT, int RD, bool HAS_TIES>
__global__ void __launch_bounds__(threads<DT>()) merge_kernel(Ptrs xs, int K, const void* base, void* out, PlanArgs p,
                                                              const float* weights, const float* scales, int* flags,
                                                              int64_t n, float lam, float divisor_nc, bool consensus,
                                                              bool normalize, bool sparsify_only, bool aligned) {
    constexpr int E = ept<DT>();
    const int64_t s = int64_t(blockIdx.x) * BLOCK + int64_t(threadIdx.x) * E;
    const int nin = in_range<DT>(s, n);
    const bool full = aligned && nin == E;
    float b[E];
    MergeAcc acc[E];
    bool ok = true;
    if (base) unpack<DT>(load_raw<DT>(base, s, nin, full), b);
#pragma unroll
    for (int j = 0; j < E; ++j) {
        if (!base) b[j] = 0.f;
        ok &= finite(b[j]);
    }
    if (!ok) flags[K] = 1;
    // software pipeline: model t+1's 16 bytes are in flight while model t is computed
    Raw cur = K > 0 ? load_raw<DT>(xs.x[0], s, nin, full) : Raw{};
    for (int t = 0; t < K; ++t) {
        const Raw nxt = t + 1 < K ? load_raw<DT>(xs.x[t + 1], s, nin, full) : Raw{};
        float d[E];
        bool keep[E];
        unpack<DT>(cur, d);
        bool okt = true;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            okt &= finite(d[j]);
            if (base) d[j] = rnd<DT>(d[j] - b[j]);
        }
        if (!okt) flags[t] = 1;
        if (p.mode != MODE_NONE) keep_flags<DT, HAS_TIES>(p, t, s, nin, d, keep);
        const float w = sparsify_only ? 1.f : weights[t];
        const float sc = p.mode != MODE_NONE ? scales[t] : 1.f;
#pragma unroll
        for (int j = 0; j < E; ++j) {
            float v = d[j];
            if (p.mode != MODE_NONE) v = rnd<RD>((keep[j] ? v : 0.f) * sc);
            if (sparsify_only) acc[j].total = v;
            else acc[j].add(rnd<RD>(v * w), w);
        }
        cur = nxt;
    }
    const bool apply_lambda = lam != 1.f;
    float v[E];
#pragma unroll
    for (int j = 0; j < E; ++j)
        v[j] = sparsify_only ? acc[j].total
                             : finish<RD>(acc[j], b[j], consensus, normalize, apply_lambda, lam, divisor_nc);
    wweight::vec::store_vec<DT>(out, s, nin, full, v);
}

// ---------------------------------------------------------------- host wrappers
Ptrs make_ptrs(const std::vector<uintptr_t>& xs) {
    if (xs.size() > size_t(MAX_K)) throw std::invalid_argument("wweight._cuda: at most 64 models per launch");
    Ptrs p{};
    for (size_t i = 0; i < xs.size(); ++i) p.x[i] = reinterpret_cast<const void*>(xs[i]);
    return p;
}

// The 128-bit path needs every pointer of the launch 16-byte aligned (a CTA starts at element
// 1024*b, a multiple of 16 bytes); otherwise the kernels take their scalar loads.
bool aligned16(const std::vector<uintptr_t>& xs, std::initializer_list<uintptr_t> more) {
    uintptr_t bits = 0;
    for (uintptr_t x : xs) bits |= x;
    for (uintptr_t x : more) bits |= x;   // a null base is 0: aligned
    return (bits & 15u) == 0;
}

int64_t num_blocks(int64_t n) {
    const int64_t nb = (n + BLOCK - 1) / BLOCK;
    if (nb >= (int64_t(1) << 31)) throw std::invalid_argument("wweight._cuda: tensor too large (>= 2^41 elements)");
    return nb;
}

int num_sms() {
    int dev = 0, sms = 0;
    wweight::check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    wweight::check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    return sms;
}

// Queries ride on grid.y (at most 65535): larger query sets go in slices starting at q0.
template <typename F>
void for_query_slices(int64_t Q, F&& launch) {
    for (int64_t q0 = 0; q0 < Q; q0 += MAX_GRID_Y) launch(int(q0), unsigned(std::min<int64_t>(Q - q0, MAX_GRID_Y)));
}

void digit_hist(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, uintptr_t qmodel, int64_t Q,
                uintptr_t prefix, int shift, int nbits, int high_shift, bool has_prefix, uintptr_t hist,
                uintptr_t stream) {
    if (n == 0 || Q == 0) return;
    Ptrs p = make_ptrs(xs);
    const bool al = aligned16(xs, {base});
    const int64_t want = (n + HIST_THREADS * 16 - 1) / (HIST_THREADS * 16);   // >= 16 elements a thread
    const unsigned grid_x = unsigned(std::min<int64_t>(want, int64_t(num_sms()) * 8));
    const size_t smem = sizeof(unsigned int) << nbits;
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        for_query_slices(Q, [&](int q0, unsigned gy) {
            digit_hist_kernel<DT><<<dim3(grid_x, gy), HIST_THREADS, smem, wweight::as_stream(stream)>>>(
                p, reinterpret_cast<const void*>(base), reinterpret_cast<const int64_t*>(qmodel),
                reinterpret_cast<const int64_t*>(prefix), reinterpret_cast<unsigned long long*>(hist), n, shift,
                nbits, high_shift, has_prefix, al, q0);
        });
    });
    wweight::check_cuda(cudaGetLastError(), "sparse_digit_hist");
}

void tie_counts(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, uintptr_t qmodel, uintptr_t qkey,
                int64_t Q, uintptr_t out, uintptr_t stream) {
    if (n == 0 || Q == 0) return;
    const int64_t nblocks = num_blocks(n);
    Ptrs p = make_ptrs(xs);
    const bool al = aligned16(xs, {base});
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        for_query_slices(Q, [&](int q0, unsigned gy) {
            tie_count_kernel<DT><<<dim3(unsigned(nblocks), gy), threads<DT>(), 0, wweight::as_stream(stream)>>>(
                p, reinterpret_cast<const void*>(base), reinterpret_cast<const int64_t*>(qmodel),
                reinterpret_cast<const int64_t*>(qkey), reinterpret_cast<int64_t*>(out), n, nblocks, al, q0);
        });
    });
    wweight::check_cuda(cudaGetLastError(), "sparse_tie_counts");
}

PlanArgs make_plan(int mode, uintptr_t kp, uintptr_t ties, int64_t n, uintptr_t density, uint64_t seed,
                   uint32_t stream0) {
    return PlanArgs{mode, reinterpret_cast<const int64_t*>(kp), reinterpret_cast<const int64_t*>(ties),
                    num_blocks(n), reinterpret_cast<const float*>(density), seed, stream0};
}

void rescale_stats(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, int mode, uintptr_t kp,
                   uintptr_t ties, uintptr_t density, uint64_t seed, uint32_t stream0, int norm, uintptr_t out,
                   uintptr_t stream) {
    if (n == 0) return;
    Ptrs p = make_ptrs(xs);                                   // grid.y = model: at most MAX_K
    PlanArgs pa = make_plan(mode, kp, ties, n, density, seed, stream0);
    const dim3 grid(unsigned(pa.nblocks), unsigned(xs.size()));
    const bool al = aligned16(xs, {base});
    const void* b = reinterpret_cast<const void*>(base);
    float* o = reinterpret_cast<float*>(out);
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        cudaStream_t st = wweight::as_stream(stream);
        if (ties) stats_kernel<DT, true><<<grid, threads<DT>(), 0, st>>>(p, b, pa, o, n, norm, al);
        else stats_kernel<DT, false><<<grid, threads<DT>(), 0, st>>>(p, b, pa, o, n, norm, al);
    });
    wweight::check_cuda(cudaGetLastError(), "sparse_rescale_stats");
}

template <int DT, int RD>
void launch_merge(bool has_ties, dim3 grid, cudaStream_t st, Ptrs p, int K, const void* base, void* out,
                  PlanArgs pa, const float* w, const float* sc, int* flags, int64_t n, float lam, float div,
                  bool consensus, bool normalize, bool sparsify_only, bool al) {
    if (has_ties)
        merge_kernel<DT, RD, true><<<grid, threads<DT>(), 0, st>>>(p, K, base, out, pa, w, sc, flags, n, lam, div,
                                                                    consensus, normalize, sparsify_only, al);
    else
        merge_kernel<DT, RD, false><<<grid, threads<DT>(), 0, st>>>(p, K, base, out, pa, w, sc, flags, n, lam, div,
                                                                     consensus, normalize, sparsify_only, al);
}

void merge(std::vector<uintptr_t> xs, uintptr_t base, uintptr_t out, int dt, int64_t n, int mode, uintptr_t kp,
           uintptr_t ties, uintptr_t density, uint64_t seed, uint32_t stream0, uintptr_t weights, uintptr_t scales,
           float lam, float divisor_nc, bool consensus, bool normalize, bool sparsify_only, bool round16,
           uintptr_t flags, uintptr_t stream) {
    if (n == 0) return;
    Ptrs p = make_ptrs(xs);
    PlanArgs pa = make_plan(mode, kp, ties, n, density, seed, stream0);
    const dim3 grid(unsigned(pa.nblocks));                    // < 2^31 (num_blocks)
    const bool al = aligned16(xs, {base, out});
    cudaStream_t st = wweight::as_stream(stream);
    const void* b = reinterpret_cast<const void*>(base);
    void* o = reinterpret_cast<void*>(out);
    const float* w = reinterpret_cast<const float*>(weights);
    const float* sc = reinterpret_cast<const float*>(scales);
    int* f = reinterpret_cast<int*>(flags);
    const int K = int(xs.size());
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        if (round16 && DT != F32)
            launch_merge<DT, DT>(ties != 0, grid, st, p, K, b, o, pa, w, sc, f, n, lam, divisor_nc, consensus,
                                 normalize, sparsify_only, al);
        else
            launch_merge<DT, F32>(ties != 0, grid, st, p, K, b, o, pa, w, sc, f, n, lam, divisor_nc, consensus,
                                  normalize, sparsify_only, al);
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
