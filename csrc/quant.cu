// CUDA kernels of the quant op family (see wweight/quant/ops.py for the public op,
// wweight/backends/cuda/quant.py for the glue, and
// wweight/reference/quant.py for the exact arithmetic they reproduce).
//
//   quant_fused   block_size % 8 == 0: a sub-warp of tpb = min(32, pow2 >= block_size / 8) lanes per
//                 block (so blocks of 64 put 4 blocks in a warp, all 32 lanes busy), one group of 8
//                 codes per lane per step: stats, the stored scale/zero, codes and packing in one
//                 kernel. The lane's first group stays in registers between the two passes, so a
//                 block of <= 256 elements is read from memory exactly once.
//   quant_stats   per-(block, 1024-column chunk) min/max (or absmax) of non-outlier elements (the
//                 path for block_size % 8 != 0 or huge blocks); a sub-warp per (block, chunk), sized
//                 to about 8 elements per lane. The O(blocks) reduction and scale formula run in torch.
//   quant_pack    one thread per group of 8 codes: scale, round half-to-even (rintf), clamp,
//                 pack the 8 codes into BITS bytes of the big-endian bitstream via a 64-bit word.
//   quant_dequant one thread per group: BITS bytes -> 8 codes -> code * scale + zero (fp32, separate
//                 roundings __fmul_rn/__fadd_rn so results equal torch's two-op rounding) -> dtype.
//
// Index arithmetic: element offsets and block indices stay 64-bit (tensors reach 2^34 elements);
// everything inside a block or a group is 32-bit, and divisions go through udiv(), which uses the
// 32-bit divider whenever both operands fit (every group index below 2^35 elements). Groups of 8
// elements are loaded with 128-bit loads when the tensor's address allows it (vec flags, checked on
// the host) and the BITS bytes of a group are stored / loaded in units of the largest power of two
// dividing BITS. Launches: grid.x <= 65535 * 16, grid.y = grid.z = 1; grid-stride loops cover the
// rest for any n and block size. NaN in a block's kept elements makes its statistics NaN (as torch's
// amin/amax do), so the caller's finiteness check on the O(blocks) scales needs no extra pass.
#include <pybind11/pybind11.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include "common.cuh"
#include "quant_elem.cuh"

namespace py = pybind11;
using namespace wweight;
using namespace wweight::quant;

namespace {

constexpr int kCols = 1024;  // columns per stats chunk; must match block_stats in wweight/backends/cuda/quant.py

template <typename T>
__global__ void stats_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask, float* __restrict__ pmin,
                             float* __restrict__ pmax, int64_t n, int64_t bs, int64_t nb, int64_t nchunks,
                             float thr, bool excl, bool sym, int lg) {
    const int lane = threadIdx.x & 31, tpb = 1 << lg, r = lane & (tpb - 1);
    const int64_t per_warp = 32 >> lg;  // (block, chunk) items per warp
    const int64_t total = nb * nchunks;
    const int64_t warp = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int64_t stride = (int64_t)gridDim.x * (blockDim.x >> 5) * per_warp;
    for (int64_t it0 = warp * per_warp; it0 < total; it0 += stride) {  // warp-uniform trip count
        const int64_t item = it0 + (lane >> lg);
        Stats st;
        if (item < total) {
            const int64_t b = nchunks == 1 ? item : udiv(item, nchunks);
            const int64_t base = b * bs + (item - b * nchunks) * kCols;  // first element of the chunk
            int64_t len = bs - (item - b * nchunks) * kCols;
            if (len > kCols) len = kCols;
            if (len > n - base) len = n - base;
            for (int c = r; c < (int)len; c += tpb) {  // len <= 1024: 32-bit column
                const float v = to_f32<T>(x[base + c]);
                const bool out = (excl && fabsf(v) >= thr) || (mask != nullptr && mask[base + c]);
                if (!out) st.add(v);
            }
        }
        st.reduce(tpb, lane);
        if (item < total && r == 0) {
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
                            uint8_t* __restrict__ out, int64_t n, int64_t bs, int64_t ngroups, bool xvec) {
    const bool aligned = (bs & 7) == 0;  // the 8 codes of a group share one block
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < ngroups;
         g += (int64_t)gridDim.x * blockDim.x) {
        const int64_t e0 = g * 8;
        const int cnt = n - e0 < 8 ? (int)(n - e0) : 8;
        float v[8];
        load_group<T>(x, e0, n, xvec, v);
        uint64_t word = 0;
        // one division per group; the block of each later element follows by counting
        int64_t blk = aligned ? udiv(g, bs >> 3) : udiv(e0, bs);
        int64_t rem = aligned ? 0 : e0 - blk * bs;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (j < cnt) {
                const uint64_t code = code_of<BITS>(v[j], scale[blk], zero == nullptr ? 0.f : zero[blk], zero == nullptr);
                word |= code << (BITS * (7 - j));
                if (!aligned && ++rem == bs) rem = 0, ++blk;
            }
        }
        store_group<BITS>(out, g, word);
    }
}

template <typename T, int BITS>
__global__ void dequant_kernel(const uint8_t* __restrict__ p, const float* __restrict__ scale,
                               const float* __restrict__ zero, T* __restrict__ out, int64_t n, int64_t bs,
                               int64_t ngroups, bool pvec, bool ovec) {
    constexpr float kHalf = (float)(1 << (BITS - 1));
    constexpr uint64_t kMask = (1u << BITS) - 1;
    const bool aligned = (bs & 7) == 0;
    for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < ngroups;
         g += (int64_t)gridDim.x * blockDim.x) {
        const uint64_t word = load_word<BITS>(p, g, pvec);
        const int64_t e0 = g * 8;
        const int cnt = n - e0 < 8 ? (int)(n - e0) : 8;
        int64_t blk = aligned ? udiv(g, bs >> 3) : udiv(e0, bs);
        int64_t rem = aligned ? 0 : e0 - blk * bs;
        T h[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float c = (float)((word >> (BITS * (7 - j))) & kMask);
            const float s = scale[blk];
            const float v = zero == nullptr ? __fmul_rn(c - kHalf, s) : __fadd_rn(__fmul_rn(c, s), zero[blk]);
            h[j] = from_f32<T>(v);
            if (!aligned && j + 1 < cnt && ++rem == bs) rem = 0, ++blk;
        }
        if (ovec && cnt == 8) {  // out 16-byte aligned: one or two 128-bit stores
            uint4 u[sizeof(T) / 2];
            memcpy(u, h, sizeof(h));
#pragma unroll
            for (int i = 0; i < (int)(sizeof(T) / 2); ++i) reinterpret_cast<uint4*>(out + e0)[i] = u[i];
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (j < cnt) out[e0 + j] = h[j];
        }
    }
}

// One pass for block_size % 8 == 0 (grid-stride over groups of 32 / tpb blocks per warp). Pass 1
// reduces each block's non-outlier min/max (absmax) over its sub-warp; every lane then holds the
// stored scale/zero (rounded to the storage type S exactly as torch's .to(S) does); pass 2 codes
// the lane's first group from registers and re-reads any further ones (from L1/L2).
template <typename T, typename S, int BITS>
__global__ void quant_fused_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask, S* __restrict__ scale_out,
                                   S* __restrict__ zero_out, uint8_t* __restrict__ out, int64_t n, int64_t bs,
                                   int64_t nb, int64_t ngroups, float thr, bool excl, float clip, bool has_clip,
                                   bool sym, int lg, bool xvec, bool mvec) {
    const int lane = threadIdx.x & 31, tpb = 1 << lg, r = lane & (tpb - 1);
    const int64_t per_warp = 32 >> lg;
    const int gpb = (int)(bs >> 3);  // groups per block, <= FUSED_MAX_BLOCK / 8
    const int64_t warp = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int64_t stride = (int64_t)gridDim.x * (blockDim.x >> 5) * per_warp;
    for (int64_t b0 = warp * per_warp; b0 < nb; b0 += stride) {  // warp-uniform trip count
        const int64_t b = b0 + (lane >> lg);
        const int64_t g0 = b * gpb;
        const int ng = b < nb ? (int)(ngroups - g0 < gpb ? ngroups - g0 : gpb) : 0;  // groups of this block
        Stats st;
        float v0[8];
        uint32_t o0 = 0;
        if (r < ng) {
            load_group<T>(x, (g0 + r) * 8, n, xvec, v0);
            o0 = outlier_bits(v0, mask, (g0 + r) * 8, n, mvec, thr, excl);
            st.add_group(v0, o0, (int)(n - (g0 + r) * 8 < 8 ? n - (g0 + r) * 8 : 8));
        }
        for (int gi = r + tpb; gi < ng; gi += tpb) {
            float v[8];
            const int64_t e0 = (g0 + gi) * 8;
            load_group<T>(x, e0, n, xvec, v);
            st.add_group(v, outlier_bits(v, mask, e0, n, mvec, thr, excl), n - e0 < 8 ? (int)(n - e0) : 8);
        }
        st.reduce(tpb, lane);
        if (ng == 0) continue;  // after the shuffles: every lane takes part in them
        // the stored scale / zero: csrc/quant_elem.h (lo > hi, every element an outlier, gives 0)
        float s, z;
        quant_elem::block_scale(st.lo, st.hi, st.amax, BITS, sym, has_clip ? clip : -1.f, s, z);
        s = to_f32<S>(from_f32<S>(s));
        z = sym ? 0.f : to_f32<S>(from_f32<S>(z));
        if (r == 0) {
            scale_out[b] = from_f32<S>(s);
            if (!sym) zero_out[b] = from_f32<S>(z);
        }
        for (int gi = r; gi < ng; gi += tpb) {
            const int64_t e0 = (g0 + gi) * 8;
            float v[8];
            if (gi == r) {
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = v0[j];
            } else {
                load_group<T>(x, e0, n, xvec, v);
            }
            uint64_t word = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (e0 + j < n) word |= code_of<BITS>(v[j], s, z, sym) << (BITS * (7 - j));
            store_group<BITS>(out, g0 + gi, word);
        }
    }
}

int grid_for(int64_t work, int per_cta) {
    int64_t g = (work + per_cta - 1) / per_cta;
    if (g > 65535LL * 16) g = 65535LL * 16;  // grid.x stays far below 2^31; grid-stride loops cover the rest
    return (int)(g < 1 ? 1 : g);
}

// log2 of the lanes per item: the smallest power of two >= ceil(len / per_lane), at most 32.
int lanes_log2(int64_t len, int per_lane) {
    int lg = 0;
    while (lg < 5 && ((int64_t)per_lane << lg) < len) ++lg;
    return lg;
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }

}  // namespace

static void quant_stats(uintptr_t x, int dtype, uintptr_t mask, uintptr_t pmin, uintptr_t pmax, int64_t n,
                        int64_t bs, int64_t nb, int64_t nchunks, double thr, bool sym, uintptr_t stream) {
    if (n <= 0) return;
    const bool excl = std::isfinite(thr);
    const int threads = 256;
    const int lg = lanes_log2(bs < kCols ? bs : kCols, 8);
    const int grid = grid_for(nb * nchunks, (threads / 32) * (32 >> lg));
    WW_DISPATCH_FLOAT(dtype, T, {
        stats_kernel<T><<<grid, threads, 0, as_stream(stream)>>>(
            reinterpret_cast<const T*>(x), reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<float*>(pmin),
            reinterpret_cast<float*>(pmax), n, bs, nb, nchunks, excl ? (float)thr : 0.f, excl, sym, lg);
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
    if (out % 8 != 0) throw std::invalid_argument("quant_pack: the output buffer must be 8-byte aligned");
    WW_DISPATCH_FLOAT(dtype, T, {
        WW_BITS_CASES(bits, {
            pack_kernel<T, B><<<grid, threads, 0, as_stream(stream)>>>(
                reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(scale),
                reinterpret_cast<const float*>(zero), reinterpret_cast<uint8_t*>(out), n, bs, ngroups,
                aligned16(x));
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
    const int lg = lanes_log2(bs / 8, 1);  // one lane per group of 8, up to a full warp per block
    const int grid = grid_for(nb, (threads / 32) * (32 >> lg));
    if (out % 8 != 0) throw std::invalid_argument("quant_fused: the output buffer must be 8-byte aligned");
    WW_DISPATCH_FLOAT(dtype, T, {
        WW_DISPATCH_FLOAT(scale_dtype, S, {
            WW_BITS_CASES(bits, {
                quant_fused_kernel<T, S, B><<<grid, threads, 0, as_stream(stream)>>>(
                    reinterpret_cast<const T*>(x), reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<S*>(scale),
                    reinterpret_cast<S*>(zero), reinterpret_cast<uint8_t*>(out), n, bs, nb, ngroups,
                    excl ? (float)thr : 0.f, excl, has_clip ? (float)clip : 1.f, has_clip, sym, lg, aligned16(x),
                    mask % 8 == 0);
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
                reinterpret_cast<const float*>(zero), reinterpret_cast<T*>(out), n, bs, ngroups, packed % 8 == 0,
                aligned16(out));
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
