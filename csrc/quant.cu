// CUDA kernels of the quant op family (see wweight/quant/ops.py for the public op,
// wweight/backends/cuda/quant.py for the glue, and
// wweight/reference/quant.py for the exact arithmetic they reproduce).
//
//   quant_stats   per-(block, 1024-column chunk) min/max (or absmax) of non-outlier elements;
//                 one warp per (block, chunk), lanes stride the chunk (coalesced loads).
//                 The O(blocks) reduction of partials and the scale/zero formula run in torch.
//   quant_fused   block_size % 8 == 0: one warp per block does stats, the stored scale/zero, codes
//                 and packing in one kernel (the weight is read from DRAM once).
//   quant_pack    one thread per group of 8 codes: scale, round half-to-even (rintf), clamp,
//                 pack the 8 codes into BITS bytes of the big-endian bitstream via a 64-bit word.
//   quant_dequant one thread per group: BITS bytes -> 8 codes -> code * scale + zero (fp32,
//                 no FMA contraction so results equal torch's two-op rounding) -> output dtype.
//
// All element offsets are 64-bit; grid-stride loops cover tensors of any size.
#include <pybind11/pybind11.h>
#include <cmath>
#include <cstdint>
#include "common.cuh"

namespace py = pybind11;
using namespace wweight;

namespace {

constexpr int kCols = 1024;  // columns per stats chunk; must match block_stats in wweight/backends/cuda/quant.py

// min / max / absmax of the non-outlier elements one warp visits (outliers: |v| >= thr when excl,
// or mask[off] set); shared by the statistics kernel and the one-pass kernel.
struct WarpStats {
    float lo = INFINITY, hi = -INFINITY, amax = 0.f;

    template <typename T>
    __device__ __forceinline__ void add(const T* __restrict__ x, const uint8_t* __restrict__ mask, int64_t off,
                                        float thr, bool excl) {
        const float v = to_f32<T>(x[off]);
        bool keep = !(excl && fabsf(v) >= thr);
        if (mask != nullptr && mask[off]) keep = false;
        if (keep) {
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
            amax = fmaxf(amax, fabsf(v));
        }
    }

    __device__ __forceinline__ void warp_reduce() {
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) {
            lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, s));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, s));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, s));
        }
    }
};

// The RTN code of v for the stored scale s (and zero z, asymmetric): exactly the reference's
// round((v - z) / s) (IEEE division, round half to even), clamped; scale 0 gives the zero code.
template <int BITS>
__device__ __forceinline__ uint64_t code_of(float v, float s, float z, bool sym) {
    constexpr int kHalf = 1 << (BITS - 1);
    constexpr float kMax = (float)((1 << BITS) - 1);
    float q;
    if (sym) {
        q = s > 0.f ? rintf(__fdiv_rn(v, s)) : 0.f;
        q = fminf(fmaxf(q, (float)-kHalf), (float)(kHalf - 1)) + (float)kHalf;
    } else {
        q = s > 0.f ? rintf(__fdiv_rn(__fsub_rn(v, z), s)) : 0.f;
        q = fminf(fmaxf(q, 0.f), kMax);
    }
    return (uint64_t)q;
}

// A group of 8 codes (code j at bits [BITS*(7-j), BITS*(8-j)) of word) as BITS big-endian bytes.
template <int BITS>
__device__ __forceinline__ void store_group(uint8_t* __restrict__ out, int64_t g, uint64_t word) {
#pragma unroll
    for (int j = 0; j < BITS; ++j) out[g * BITS + j] = (uint8_t)((word >> (8 * (BITS - 1 - j))) & 0xffu);
}

template <typename T>
__global__ void stats_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask, float* __restrict__ pmin,
                             float* __restrict__ pmax, int64_t n, int64_t bs, int64_t nb, int64_t nchunks,
                             float thr, bool excl, bool sym) {
    const int lane = threadIdx.x & 31;
    const int64_t warps_per_block = blockDim.x >> 5;
    const int64_t total = nb * nchunks;
    for (int64_t item = (int64_t)blockIdx.x * warps_per_block + (threadIdx.x >> 5); item < total;
         item += (int64_t)gridDim.x * warps_per_block) {
        const int64_t b = item / nchunks;
        const int64_t c = item - b * nchunks;
        const int64_t col0 = c * kCols;
        int64_t col1 = col0 + kCols;
        if (col1 > bs) col1 = bs;
        WarpStats st;
        for (int64_t col = col0 + lane; col < col1; col += 32) {
            const int64_t off = b * bs + col;
            if (off >= n) break;
            st.add(x, mask, off, thr, excl);
        }
        st.warp_reduce();
        if (lane == 0) {
            if (sym) {
                pmax[item] = st.amax;
            } else {
                pmin[item] = st.lo;
                pmax[item] = st.hi;
            }
        }
    }
}

template <typename T, int BITS>
__global__ void pack_kernel(const T* __restrict__ x, const float* __restrict__ scale, const float* __restrict__ zero,
                            uint8_t* __restrict__ out, int64_t n, int64_t bs, int64_t ngroups) {
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < ngroups;
         g += (int64_t)gridDim.x * blockDim.x) {
        uint64_t word = 0;
        // block_size % 8 == 0: the 8 codes share a block, one 64-bit division per group
        const bool aligned = (bs & 7) == 0;
        const int64_t blk0 = (g * 8) / bs;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int64_t off = g * 8 + j;
            uint64_t code = 0;
            if (off < n) {
                const int64_t blk = aligned ? blk0 : off / bs;
                code = code_of<BITS>(to_f32<T>(x[off]), scale[blk], zero == nullptr ? 0.f : zero[blk], zero == nullptr);
            }
            word |= code << (BITS * (7 - j));
        }
        store_group<BITS>(out, g, word);
    }
}

template <typename T, int BITS>
__global__ void dequant_kernel(const uint8_t* __restrict__ p, const float* __restrict__ scale,
                               const float* __restrict__ zero, T* __restrict__ out, int64_t n, int64_t bs,
                               int64_t ngroups) {
    constexpr float kHalf = (float)(1 << (BITS - 1));
    constexpr uint64_t kMask = (1u << BITS) - 1;
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < ngroups;
         g += (int64_t)gridDim.x * blockDim.x) {
        uint64_t word = 0;
#pragma unroll
        for (int j = 0; j < BITS; ++j) word |= (uint64_t)p[g * BITS + j] << (8 * (BITS - 1 - j));
        const bool aligned = (bs & 7) == 0;
        const int64_t blk0 = (g * 8) / bs;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int64_t off = g * 8 + j;
            if (off >= n) break;
            const float c = (float)((word >> (BITS * (7 - j))) & kMask);
            const int64_t blk = aligned ? blk0 : off / bs;
            const float s = scale[blk];
            const float v = zero == nullptr ? __fmul_rn(c - kHalf, s) : __fadd_rn(__fmul_rn(c, s), zero[blk]);
            out[off] = from_f32<T>(v);
        }
    }
}

// One pass for block_size % 8 == 0: one warp per block (grid-stride over blocks). Pass 1 reduces
// the block's non-outlier min/max (absmax) with shuffles; every lane then holds the stored
// scale/zero (rounded to the storage type S exactly as torch's .to(S) does); pass 2 re-reads the
// block (from L1/L2) in groups of 8 elements per lane and writes the packed bytes.
template <typename T, typename S, int BITS>
__global__ void quant_fused_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask, S* __restrict__ scale_out,
                                   S* __restrict__ zero_out, uint8_t* __restrict__ out, int64_t n, int64_t bs,
                                   int64_t nb, int64_t ngroups, float thr, bool excl, float clip, bool has_clip,
                                   bool sym) {
    constexpr int kHalf = 1 << (BITS - 1);
    constexpr float kMax = (float)((1 << BITS) - 1);
    const int lane = threadIdx.x & 31;
    const int64_t warps_per_block = blockDim.x >> 5;
    const int64_t gpb = bs / 8;  // groups of 8 codes per block
    for (int64_t b = (int64_t)blockIdx.x * warps_per_block + (threadIdx.x >> 5); b < nb;
         b += (int64_t)gridDim.x * warps_per_block) {
        const int64_t base = b * bs;
        WarpStats st;
        for (int64_t c = lane; c < bs; c += 32) {
            const int64_t off = base + c;
            if (off >= n) break;
            st.add(x, mask, off, thr, excl);
        }
        st.warp_reduce();
        float lo = st.lo, hi = st.hi;
        const float amax = st.amax;
        if (lo > hi) lo = hi = 0.f;  // every element of the block is an outlier
        float s, z = 0.f;
        if (sym) {
            const float a = has_clip ? __fmul_rn(amax, clip) : amax;
            s = to_f32<S>(from_f32<S>(__fdiv_rn(a, (float)(kHalf - 1))));
        } else {
            const float l = has_clip ? __fmul_rn(lo, clip) : lo;
            const float h = has_clip ? __fmul_rn(hi, clip) : hi;
            s = to_f32<S>(from_f32<S>(__fdiv_rn(__fsub_rn(h, l), kMax)));
            z = to_f32<S>(from_f32<S>(l));
        }
        if (lane == 0) {
            scale_out[b] = from_f32<S>(s);
            if (!sym) zero_out[b] = from_f32<S>(z);
        }
        for (int64_t gi = lane; gi < gpb; gi += 32) {
            const int64_t g = b * gpb + gi;
            if (g >= ngroups) break;
            uint64_t word = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int64_t off = g * 8 + j;
                uint64_t code = 0;
                if (off < n) code = code_of<BITS>(to_f32<T>(x[off]), s, z, sym);
                word |= code << (BITS * (7 - j));
            }
            store_group<BITS>(out, g, word);
        }
    }
}

int grid_for(int64_t work, int threads) {
    int64_t g = (work + threads - 1) / threads;
    if (g > 65535LL * 16) g = 65535LL * 16;  // grid-stride loops cover the rest
    return (int)(g < 1 ? 1 : g);
}

}  // namespace

static void quant_stats(uintptr_t x, int dtype, uintptr_t mask, uintptr_t pmin, uintptr_t pmax, int64_t n,
                        int64_t bs, int64_t nb, int64_t nchunks, double thr, bool sym, uintptr_t stream) {
    if (n <= 0) return;
    const bool excl = std::isfinite(thr);
    const int threads = 256;
    const int grid = grid_for(nb * nchunks, threads / 32);
    WW_DISPATCH_FLOAT(dtype, T, {
        stats_kernel<T><<<grid, threads, 0, as_stream(stream)>>>(
            reinterpret_cast<const T*>(x), reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<float*>(pmin),
            reinterpret_cast<float*>(pmax), n, bs, nb, nchunks, excl ? (float)thr : 0.f, excl, sym);
    });
    check_cuda(cudaGetLastError(), "quant_stats");
}

#define WW_BITS_CASES(BITS_VAR, ...)                                              \
    switch (BITS_VAR) {                                                           \
        case 2: { constexpr int B = 2; __VA_ARGS__; break; }                      \
        case 3: { constexpr int B = 3; __VA_ARGS__; break; }                      \
        case 4: { constexpr int B = 4; __VA_ARGS__; break; }                      \
        case 5: { constexpr int B = 5; __VA_ARGS__; break; }                      \
        case 6: { constexpr int B = 6; __VA_ARGS__; break; }                      \
        case 7: { constexpr int B = 7; __VA_ARGS__; break; }                      \
        case 8: { constexpr int B = 8; __VA_ARGS__; break; }                      \
        default: throw std::invalid_argument("wweight: bits must be in 2..8");    \
    }

static void quant_pack(uintptr_t x, int dtype, uintptr_t scale, uintptr_t zero, uintptr_t out, int64_t n,
                       int64_t bs, int bits, uintptr_t stream) {
    if (n <= 0) return;
    const int64_t ngroups = (n + 7) / 8;
    const int threads = 256;
    const int grid = grid_for(ngroups, threads);
    WW_DISPATCH_FLOAT(dtype, T, {
        WW_BITS_CASES(bits, {
            pack_kernel<T, B><<<grid, threads, 0, as_stream(stream)>>>(
                reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(scale),
                reinterpret_cast<const float*>(zero), reinterpret_cast<uint8_t*>(out), n, bs, ngroups);
        });
    });
    check_cuda(cudaGetLastError(), "quant_pack");
}

static void quant_fused(uintptr_t x, int dtype, uintptr_t mask, uintptr_t scale, uintptr_t zero, int scale_dtype,
                        uintptr_t out, int64_t n, int64_t bs, int bits, double thr, double clip, bool sym,
                        uintptr_t stream) {
    if (n <= 0) return;
    if (bs % 8 != 0) throw std::invalid_argument("quant_fused: block_size must be a multiple of 8");
    const int64_t nb = (n + bs - 1) / bs;
    const int64_t ngroups = (n + 7) / 8;
    const bool excl = std::isfinite(thr);
    const bool has_clip = clip > 0;
    const int threads = 256;
    const int grid = grid_for(nb, threads / 32);
    WW_DISPATCH_FLOAT(dtype, T, {
        WW_DISPATCH_FLOAT(scale_dtype, S, {
            WW_BITS_CASES(bits, {
                quant_fused_kernel<T, S, B><<<grid, threads, 0, as_stream(stream)>>>(
                    reinterpret_cast<const T*>(x), reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<S*>(scale),
                    reinterpret_cast<S*>(zero), reinterpret_cast<uint8_t*>(out), n, bs, nb, ngroups,
                    excl ? (float)thr : 0.f, excl, has_clip ? (float)clip : 1.f, has_clip, sym);
            });
        });
    });
    check_cuda(cudaGetLastError(), "quant_fused");
}

static void quant_dequant(uintptr_t packed, uintptr_t scale, uintptr_t zero, uintptr_t out, int dtype, int64_t n,
                          int64_t bs, int bits, uintptr_t stream) {
    if (n <= 0) return;
    const int64_t ngroups = (n + 7) / 8;
    const int threads = 256;
    const int grid = grid_for(ngroups, threads);
    WW_DISPATCH_FLOAT(dtype, T, {
        WW_BITS_CASES(bits, {
            dequant_kernel<T, B><<<grid, threads, 0, as_stream(stream)>>>(
                reinterpret_cast<const uint8_t*>(packed), reinterpret_cast<const float*>(scale),
                reinterpret_cast<const float*>(zero), reinterpret_cast<T*>(out), n, bs, ngroups);
        });
    });
    check_cuda(cudaGetLastError(), "quant_dequant");
}

void register_quant(py::module_& m) {
    m.def("quant_stats", &quant_stats, "per-(block, chunk) min/max or absmax of non-outliers",
          py::arg("x"), py::arg("dtype"), py::arg("mask"), py::arg("pmin"), py::arg("pmax"), py::arg("n"),
          py::arg("bs"), py::arg("nb"), py::arg("nchunks"), py::arg("thr"), py::arg("symmetric"), py::arg("stream"));
    m.def("quant_pack", &quant_pack, "RTN codes packed as a big-endian bitstream", py::arg("x"), py::arg("dtype"),
          py::arg("scale"), py::arg("zero"), py::arg("out"), py::arg("n"), py::arg("bs"), py::arg("bits"),
          py::arg("stream"));
    m.def("quant_fused", &quant_fused, "one-pass stats + stored scale/zero + codes + packing (block_size % 8 == 0)",
          py::arg("x"), py::arg("dtype"), py::arg("mask"), py::arg("scale"), py::arg("zero"), py::arg("scale_dtype"),
          py::arg("out"), py::arg("n"), py::arg("bs"), py::arg("bits"), py::arg("thr"), py::arg("clip"),
          py::arg("symmetric"), py::arg("stream"));
    m.def("quant_dequant", &quant_dequant, "unpack + scale (+ zero)", py::arg("packed"), py::arg("scale"),
          py::arg("zero"), py::arg("out"), py::arg("dtype"), py::arg("n"), py::arg("bs"), py::arg("bits"),
          py::arg("stream"));
}
