// Batched exact linear assignment on the GPU: one thread block per problem, the whole solve of
// the whole batch in one launch, no host round trip (status is written to device memory).
//
// Algorithm (per problem, (n, m) float64, n <= m, +inf = forbidden; contract in
// wweight/backends/__init__.py ``permute``): u_i = row minimum and a greedy row-order assignment
// with v = 0, then for each free row a shortest augmenting path (Dijkstra over the columns, as in
// Crouse 2016 / scipy): each step relaxes the block's share of the unsettled columns from the row
// just reached and a block-wide argmin (warp shuffles + shared memory) settles the next column by
// wweight::lap::key_less (distance, free column first, lowest index: deterministic). Then the
// settled columns' prices and their rows' potentials move by mu - d_j and the path is augmented.
// The per-step logic is csrc/lap_elem.h, which the C++ model (csrc/cpu/lap_cpu.cpp,
// lap_solve_block_model) runs serially with the same column slices, so it returns the same
// assignment, and CI tests it against scipy.
//
// Memory: column state (v, d, pred, colsol, settled: 25 bytes per column) in dynamic shared memory
// when it fits the device's opt-in limit (m <= ~9,000 on sm_90's 227 KiB), else in a global scratch
// buffer the caller passes (lap_scratch_bytes). Thread t owns columns j = t, t + T, ...: only it
// touches their d / pred / settled / v, so a step needs no barrier besides the argmin's. Row
// potentials u and the assignment live in the output arrays (global). Cost rows are read
// coalesced (consecutive threads, consecutive columns); offsets are 64-bit (b * n * m).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "lap_elem.h"

namespace py = pybind11;
using namespace wweight::lap;

namespace {

constexpr int kMaxThreads = 512;
constexpr int64_t kColBytes = 8 + 8 + 4 + 4 + 1;  // v, d, pred, colsol, settled

// bytes of one problem's column state, rounded to 16 so every problem's slice of the scratch is aligned
__host__ __device__ __forceinline__ int64_t state_bytes(int64_t m) { return (kColBytes * m + 15) / 16 * 16; }

struct Cols {
    double* v;
    double* d;
    int32_t* pred;
    int32_t* colsol;
    uint8_t* done;
};

// carve the column state out of a base pointer (shared memory or this problem's scratch slice)
__device__ __forceinline__ Cols carve(unsigned char* base, int64_t m) {
    Cols c;
    c.v = reinterpret_cast<double*>(base);
    c.d = c.v + m;
    c.pred = reinterpret_cast<int32_t*>(c.d + m);
    c.colsol = c.pred + m;
    c.done = reinterpret_cast<uint8_t*>(c.colsol + m);
    return c;
}

// Warp-wide argmin of (d, tie) by key_less; lane 0 ends with the warp's result.
__device__ __forceinline__ void warp_argmin(double& d, long long& t) {
    const unsigned full = 0xffffffffu;
    for (int off = 16; off > 0; off >>= 1) {
        double od = __shfl_down_sync(full, d, off);
        long long ot = __shfl_down_sync(full, t, off);
        if (key_less(od, ot, d, t)) {
            d = od;
            t = ot;
        }
    }
}

// Block-wide argmin of (d, tie) by key_less; every thread gets the result. red_d / red_t hold 33
// slots: one per warp, and slot 32 for the broadcast (so the next call's per-warp writes cannot
// race with a slow thread still reading this call's result).
__device__ __forceinline__ void block_argmin(double& d, long long& t, double* red_d, long long* red_t) {
    warp_argmin(d, t);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        red_d[warp] = d;
        red_t[warp] = t;
    }
    __syncthreads();
    if (warp == 0) {
        d = lane < nwarps ? red_d[lane] : kInf;
        t = lane < nwarps ? red_t[lane] : LLONG_MAX;
        warp_argmin(d, t);
        if (lane == 0) {
            red_d[32] = d;
            red_t[32] = t;
        }
    }
    __syncthreads();
    d = red_d[32];
    t = red_t[32];
}

template <bool kShared>
__global__ void __launch_bounds__(kMaxThreads) lap_sap_kernel(const double* __restrict__ cost, int n, int m,
                                                              int64_t* __restrict__ col, double* __restrict__ u_out,
                                                              double* __restrict__ v_out, int32_t* __restrict__ status,
                                                              unsigned char* __restrict__ scratch) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ double red_d[33];
    __shared__ long long red_t[33];
    const int64_t b = blockIdx.x;
    const int tid = threadIdx.x, T = blockDim.x;
    const double* c = cost + b * int64_t(n) * m;
    int64_t* rowsol = col + b * int64_t(n);
    double* u = u_out + b * int64_t(n);
    Cols s = carve(kShared ? smem : scratch + b * state_bytes(m), m);

    for (int j = tid; j < m; j += T) {
        s.v[j] = 0.0;
        s.colsol[j] = -1;
    }
    __syncthreads();
    // start: u_i = row minimum (lowest column on ties), greedy assignment in row order
    for (int i = 0; i < n; ++i) {
        const double* ci = c + int64_t(i) * m;
        double bd = kInf;
        long long bt = LLONG_MAX;
        for (int j = tid; j < m; j += T) {
            double dj = ci[j];
            if (key_less(dj, j, bd, bt)) {
                bd = dj;
                bt = j;
            }
        }
        block_argmin(bd, bt, red_d, red_t);
        if (bd == kInf) {  // a row with no finite entry
            if (tid == 0) status[b] = INFEASIBLE;
            return;
        }
        if (tid == 0) {
            u[i] = bd;
            rowsol[i] = -1;
            if (s.colsol[bt] < 0) {
                s.colsol[bt] = i;
                rowsol[i] = bt;
            }
        }
    }
    __syncthreads();
    for (int f = 0; f < n; ++f) {
        if (rowsol[f] >= 0) continue;  // uniform: read after a barrier
        for (int j = tid; j < m; j += T) {
            s.d[j] = kInf;
            s.done[j] = 0;
        }
        int i = f, sink = -1;
        double mu = 0.0, ui = u[f];
        for (;;) {
            const double* ci = c + int64_t(i) * m;
            double bd = kInf;
            long long bt = LLONG_MAX;
            for (int j = tid; j < m; j += T) {
                if (s.done[j]) continue;
                relax(reduced(ci[j], ui, s.v[j], mu), s.d[j], s.pred[j], i);
                long long tj = tie_key(j, s.colsol[j] >= 0, m);
                if (key_less(s.d[j], tj, bd, bt)) {
                    bd = s.d[j];
                    bt = tj;
                }
            }
            block_argmin(bd, bt, red_d, red_t);
            if (bd == kInf) {  // no finite augmenting path from row f: no full assignment exists
                if (tid == 0) status[b] = INFEASIBLE;
                return;
            }
            const int j = int(bt >= m ? bt - m : bt);
            if (j % T == tid) s.done[j] = 1;  // the owner's flag: only the owner reads it
            mu = bd;
            const int r = s.colsol[j];
            if (r < 0) {
                sink = j;
                break;
            }
            i = r;
            ui = u[i];
        }
        for (int j = tid; j < m; j += T) {
            if (s.done[j] && j != sink) {
                double delta = settle_delta(s.d[j], mu);
                s.v[j] -= delta;
                u[s.colsol[j]] += delta;  // distinct rows: one settled column per row
            }
        }
        __syncthreads();
        if (tid == 0) {
            u[f] += mu;
            augment(s.pred, rowsol, s.colsol, f, sink);
        }
        __syncthreads();
    }
    for (int j = tid; j < m; j += T) v_out[b * int64_t(m) + j] = s.v[j];
    if (tid == 0) status[b] = SOLVED;
}

int threads_for(int64_t m) {
    int64_t t = ((m + 3) / 4 + 31) / 32 * 32;  // ~4 columns per thread, whole warps
    return int(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

int smem_limit() {
    int dev = 0, optin = 0;
    wweight::check_cuda(cudaGetDevice(&dev), "lap: cudaGetDevice");
    wweight::check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                        "lap: shared memory limit");
    return optin - 2 * 33 * 8 - 1024;  // the reduction slots and some slack
}

bool fits_shared(int64_t m) { return state_bytes(m) <= smem_limit(); }

void check_args(int64_t B, int64_t n, int64_t m) {
    if (B < 0 || n < 0 || m < 0) throw std::invalid_argument("lap_solve: B, n, m must be >= 0");
    if (n > m) throw std::invalid_argument("lap_solve: n <= m required (transpose first), got n=" +
                                           std::to_string(n) + ", m=" + std::to_string(m));
    if (B > INT_MAX) throw std::invalid_argument("lap_solve: B must be < 2**31 (one block per problem)");
    if (m >= (int64_t(1) << 30)) throw std::invalid_argument("lap_solve: m must be < 2**30");
}

// Bytes of global scratch the solver needs for B problems of m columns (0: shared memory suffices).
int64_t lap_scratch_bytes(int64_t B, int64_t m) { return fits_shared(m) ? 0 : B * state_bytes(m); }

void lap_solve(uintptr_t cost, int64_t B, int64_t n, int64_t m, uintptr_t col, uintptr_t u, uintptr_t v,
               uintptr_t status, uintptr_t scratch, uintptr_t stream) {
    check_args(B, n, m);
    if (B == 0 || n == 0) return;  // the glue fills the trivial outputs
    cudaStream_t st = wweight::as_stream(stream);
    const int T = threads_for(m);
    auto c = reinterpret_cast<const double*>(cost);
    auto cl = reinterpret_cast<int64_t*>(col);
    auto uu = reinterpret_cast<double*>(u);
    auto vv = reinterpret_cast<double*>(v);
    auto ss = reinterpret_cast<int32_t*>(status);
    if (fits_shared(m)) {
        size_t bytes = size_t(state_bytes(m));
        if (bytes > 48 * 1024)
            wweight::check_cuda(cudaFuncSetAttribute(lap_sap_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     int(bytes)), "lap: shared memory opt-in");
        lap_sap_kernel<true><<<unsigned(B), T, bytes, st>>>(c, int(n), int(m), cl, uu, vv, ss, nullptr);
    } else {
        if (!scratch) throw std::invalid_argument("lap_solve: m too large for shared memory and no scratch given");
        lap_sap_kernel<false><<<unsigned(B), T, 0, st>>>(c, int(n), int(m), cl, uu, vv, ss,
                                                         reinterpret_cast<unsigned char*>(scratch));
    }
    wweight::check_cuda(cudaGetLastError(), "lap_sap_kernel launch");
}

}  // namespace

void register_lap(py::module_& m) {
    m.def("lap_solve", &lap_solve,
          "batched SAP, one block per problem: (cost, B, n, m, col, u, v, status, scratch, stream) raw pointers");
    m.def("lap_scratch_bytes", &lap_scratch_bytes, "global scratch bytes lap_solve needs (0: shared memory)");
    m.def("lap_threads", &threads_for, "threads per block lap_solve uses for m columns");
}
