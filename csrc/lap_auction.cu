// The large-n LAP solver: the whole epsilon-scaled forward/reverse auction of ONE problem in one
// persistent cooperative kernel (glue: wweight/backends/cuda/lap_auction.py).
//
// The solve itself (phase loop, rounds, eps update) is wweight::lap::solve in
// csrc/lap_auction_elem.h, shared with the serial C++ model of the CPU extension
// (csrc/cpu/lap_auction_cpu.cpp); its algorithm and exactness argument are in
// wweight/backends/torch/permute.py, the torch model with the very same rounds. Both are tested
// against scipy on CPU. This file supplies the grid as the executor:
//   each       grid-strided loop, one thread per row / column
//   top2_each  one warp per row (column in reverse rounds): lane-strided coalesced float64 reads, each
//              lane keeps its first maximum, then a shuffle merge (ties to the lowest index); lane 0
//              runs the body (the 64-bit atomicMax of the packed key)
//   sync       cooperative_groups grid.sync(): 2 per forward round, 2 per reverse round
// Launch: grid = co-resident blocks (occupancy API) x SMs through cudaLaunchCooperativeKernel; since
// CUDA 11 grid.sync() needs no -rdc. 64-bit offsets (n * m beyond 2^31 at n = m = 46341).
#include <pybind11/pybind11.h>

#include <cooperative_groups.h>
#include <cstdint>
#include <stdexcept>

#include "common.cuh"
#include "lap_auction_elem.h"

namespace py = pybind11;
namespace cg = cooperative_groups;
using namespace wweight::lap;

namespace {

constexpr int THREADS = 256;

struct GridX {
    cg::grid_group grid;
    int64_t tid, nthreads, warp, nwarps;
    int lane;

    template <class F> __device__ __forceinline__ void each(int64_t count, F f) {
        for (int64_t k = tid; k < count; k += nthreads) f(k);
    }
    template <class F> __device__ __forceinline__ void single(F f) {
        if (tid == 0) f();
    }
    __device__ __forceinline__ void sync() { grid.sync(); }
    __device__ __forceinline__ int load(const int* p) { return *(const volatile int*)p; }
    __device__ __forceinline__ unsigned long long load_u64(const unsigned long long* p) {
        return *(const volatile unsigned long long*)p;
    }
    __device__ __forceinline__ void max_u64(unsigned long long* p, unsigned long long v) { atomicMax(p, v); }
    __device__ __forceinline__ void min_u64(unsigned long long* p, unsigned long long v) { atomicMin(p, v); }
    __device__ __forceinline__ void add(int* p, int v) { atomicAdd(p, v); }

    template <class P, class R, class F>
    // row_of(k) points into a / at (read-only for the whole kernel: __restrict__ lets it take the
    // read-only cache); sub is price / pi, written between rounds, so never through that cache
    __device__ __forceinline__ void top2_each(int64_t count, P pred, R row_of, const double* sub, int len, F f) {
        for (int64_t k = warp; k < count; k += nwarps) {
            if (!pred(k)) continue;                       // warp-uniform: one k per warp
            const double* __restrict__ row = row_of(k);
            Top2 t = top2_init();
            for (int c = lane; c < len; c += 32) top2_push(t, row[c] - sub[c], c);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                Top2 o;
                o.v1 = __shfl_xor_sync(0xffffffffu, t.v1, off);
                o.v2 = __shfl_xor_sync(0xffffffffu, t.v2, off);
                o.j1 = __shfl_xor_sync(0xffffffffu, t.j1, off);
                t = top2_merge(t, o);
            }
            top2_finish(t);
            if (lane == 0) f(k, t);
        }
    }
};

__global__ void __launch_bounds__(THREADS, 2) lap_auction_kernel(Args g) {
    GridX x{cg::this_grid(), 0, 0, 0, 0, 0};
    x.tid = int64_t(blockIdx.x) * THREADS + threadIdx.x;
    x.nthreads = int64_t(gridDim.x) * THREADS;
    x.warp = x.tid >> 5;
    x.nwarps = x.nthreads >> 5;
    x.lane = int(threadIdx.x & 31);
    solve(x, g);
}

int grid_size(int device) {
    int sms = 0, per_sm = 0, coop = 0;
    wweight::check_cuda(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device), "lap_auction attr");
    if (!coop) throw std::runtime_error("lap_auction: the device does not support cooperative launches");
    wweight::check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "lap_auction attr");
    wweight::check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, lap_auction_kernel, THREADS, 0),
                        "lap_auction occupancy");
    if (per_sm < 1) throw std::runtime_error("lap_auction: the kernel cannot be resident (occupancy 0)");
    return sms * per_sm;
}

// One problem; every pointer is a device pointer of a contiguous tensor (see Args), ctl a zeroed Ctl.
void lap_auction(uintptr_t a, uintptr_t at, uintptr_t sched, uintptr_t price, uintptr_t pnew, uintptr_t pi,
                 uintptr_t col, uintptr_t owner, uintptr_t key, uintptr_t rkey, uintptr_t ctl, int n, int m,
                 int max_rounds, uintptr_t stream) {
    if (n <= 0 || m < n || m > int(kLow) + 1) throw std::invalid_argument("lap_auction: need 0 < n <= m <= 65536");
    int device = 0;
    wweight::check_cuda(cudaGetDevice(&device), "lap_auction device");
    Args g{reinterpret_cast<const double*>(a), reinterpret_cast<const double*>(at),
           reinterpret_cast<const double*>(sched), reinterpret_cast<double*>(price),
           reinterpret_cast<double*>(pnew), reinterpret_cast<double*>(pi), reinterpret_cast<int*>(col),
           reinterpret_cast<int*>(owner), reinterpret_cast<unsigned long long*>(key),
           reinterpret_cast<unsigned long long*>(rkey), reinterpret_cast<Ctl*>(ctl), n, m, max_rounds};
    void* params[] = {&g};
    const int blocks = grid_size(device);
    wweight::check_cuda(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(lap_auction_kernel), dim3(blocks),
                                                    dim3(THREADS), params, 0, wweight::as_stream(stream)),
                        "lap_auction launch");
}

}  // namespace

void register_lap_auction(py::module_& m) {
    m.def("lap_auction", &lap_auction, "epsilon-scaled forward/reverse auction of one (n, m) problem (cooperative)");
    m.attr("LAP_AUCTION_CTL_BYTES") = int(sizeof(Ctl));
    m.attr("LAP_AUCTION_THREADS") = THREADS;
}
