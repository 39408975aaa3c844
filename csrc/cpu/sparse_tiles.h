// Tile helpers of the sparse CPU kernels (csrc/cpu/sparse_kernels.h): constants, loads, deltas
// and keys of one tile, the Philox keep mask (AVX2: 8 counters per vector), the block walk over
// the distinct models, and the Masker shared by rescale_stats and merge.
// Included by sparse_kernels.h inside the build's namespace; see there for what it expects.
#pragma once
#include "../sparse_elem.h"

namespace sparse_cpu {

using namespace wweight::elem;

constexpr int64_t BLOCK = kBlock;  // tie offsets are per block (csrc/sparse_elem.h)
constexpr int TILE = 256;          // 9 float arrays of TILE: 9 KB, well inside L1
static_assert(BLOCK % TILE == 0, "tiles must not straddle blocks");

using In = ::wweight_cpu::SparseIn;
using Plan = ::wweight_cpu::SparsePlan;

inline Window window_of(const Plan& p, int64_t t) {
    const int64_t* r = p.kp + 6 * t;
    return Window{r[0], r[1], r[2], r[3], r[4], r[5]};
}

// A key bound as int32: keys are < 2^31, so clamping BIG to INT32_MAX only differs for the key
// 0x7FFFFFFF, a NaN bit pattern (non-finite inputs make the op raise; a difference of finite
// inputs is never NaN).
inline int32_t clamp_key(int64_t k) { return k > INT32_MAX ? INT32_MAX : k < -1 ? -1 : int32_t(k); }

// The base tile as floats: fp32 is read in place (a copy of 1 KB compiles to `rep movsq`, slower
// than the loop it replaces); 16-bit values are widened into the scratch array.
template <int DT>
inline const float* base_tile(const void* p, int64_t i0, int m, float* scratch) {
    if (DT == F32) return static_cast<const float*>(p) + i0;
    for (int j = 0; j < m; ++j) scratch[j] = load_f32<DT>(p, i0 + j);
    return scratch;
}

// out[i0 .. i0 + m) = v rounded to the dtype (csrc/sparse_elem.h store_f32), in a loop that
// vectorises for fp32 and bf16 (the bf16 rounding is integer arithmetic)
template <int DT>
inline void store_tile(void* out, int64_t i0, int m, const float* v) {
    if (DT == F32) {
        float* o = static_cast<float*>(out) + i0;
        for (int j = 0; j < m; ++j) o[j] = v[j];
    } else if (DT == BF16) {
        uint16_t* o = static_cast<uint16_t*>(out) + i0;
        for (int j = 0; j < m; ++j) {
            uint32_t u = f32_bits(v[j]);
            u += 0x7FFFu + ((u >> 16) & 1u);
            o[j] = uint16_t(u >> 16);
        }
    } else {
        for (int j = 0; j < m; ++j) store_f32<DT>(out, i0 + j, v[j]);
    }
}

inline uint32_t nonfinite(float v) { return uint32_t((f32_bits(v) & 0x7F800000u) == 0x7F800000u); }

// d[j] = round(x[j] - b[j]) (x[j] with no base) for the elements i0 .. i0 + m of input x; returns
// 1 if any x[j] is inf / NaN.
template <int DT>
inline uint32_t delta_tile(const void* x, int64_t i0, const float* b, int m, float* d) {
    uint32_t bad = 0;
    if (b) {
        for (int j = 0; j < m; ++j) {
            const float v = load_f32<DT>(x, i0 + j);
            bad |= nonfinite(v);
            d[j] = rnd<DT>(v - b[j]);
        }
    } else {
        for (int j = 0; j < m; ++j) {
            const float v = load_f32<DT>(x, i0 + j);
            bad |= nonfinite(v);
            d[j] = v;
        }
    }
    return bad;
}

template <int DT>
inline void keys_tile(const float* d, uint32_t* key, int m) {
    if (DT == F32) {
        for (int j = 0; j < m; ++j) key[j] = f32_bits(d[j]) & 0x7FFFFFFFu;
    } else if (DT == BF16) {
        for (int j = 0; j < m; ++j) key[j] = (f32_bits(d[j]) >> 16) & 0x7FFFu;
    } else {
        for (int j = 0; j < m; ++j) key[j] = key_of<DT>(d[j]);
    }
}

// Software prefetch of a tile PREFETCH elements ahead of x[i0 ..), one line at a time, into L2.
// A pass walks K + 1 streams a tile (1 KB of fp32) at a time and computes between the loads; the
// hardware prefetchers alone left its loads stalled (on a 2-vCPU Xeon the threshold pass read
// 9.5 GB/s of a 15-18 GB/s read bandwidth, 56 % of its samples on the first load of each tile).
// Four tiles ahead (16M x 4, alternating builds, min-median of 20 calls): the threshold pass
// 36-41 -> 28-31 ms in fp32, DARE's fp32 statistics pass 67-71 -> 59-63 ms, the bf16 merge
// 30.0-31.0 -> 27.8-29.7 ms (fp32 merge and bf16 statistics unchanged); 8 tiles ahead was no
// better. Prefetches only hint: they never fault, and none is issued past n.
constexpr int64_t PREFETCH = 4 * TILE;

template <int DT>
inline void prefetch_tile(const void* x, int64_t i0, int m, int64_t n) {
    constexpr int64_t ES = DT == F32 ? 4 : 2;
    const int64_t s = i0 + PREFETCH, e = std::min<int64_t>(n, s + m);
    const char* p = static_cast<const char*>(x);
    for (int64_t o = s * ES; o < e * ES; o += 64) __builtin_prefetch(p + o, 0, 2);
}

// Delta keys of model t for elements [i0, i0 + m); b: the base tile or null; d: scratch.
template <int DT>
inline void model_keys(const In& in, int64_t t, int64_t i0, int m, const float* b, float* d, uint32_t* key) {
    delta_tile<DT>(in.xs[t], i0, b, m, d);
    keys_tile<DT>(d, key, m);
}

// Philox uniforms of the elements i0 .. i0 + m (i0 a multiple of 4) of stream s, lane-parallel
// over the groups of 4 so the compiler vectorises the 10 rounds (vpmuludq for the 32x32->64 products).
inline void uniform_tile(int64_t i0, int m, uint64_t seed, uint32_t s, float* u) {
    constexpr int G = TILE / 4;
    alignas(64) uint32_t c0[G], c1[G], c2[G], c3[G];
    const int g = (m + 3) / 4;
    const uint64_t q0 = uint64_t(i0 >> 2);
    for (int q = 0; q < G; ++q) {
        const uint64_t qq = q0 + uint64_t(q);
        c0[q] = uint32_t(qq & 0xFFFFFFFFu);
        c1[q] = uint32_t(qq >> 32);
        c2[q] = s;
        c3[q] = 0u;
    }
    uint32_t k0 = uint32_t(seed & 0xFFFFFFFFu), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r) {
        for (int q = 0; q < G; ++q) {
            const uint64_t p0 = uint64_t(0xD2511F53u) * c0[q], p1 = uint64_t(0xCD9E8D57u) * c2[q];
            const uint32_t n0 = uint32_t(p1 >> 32) ^ c1[q] ^ k0, n2 = uint32_t(p0 >> 32) ^ c3[q] ^ k1;
            c0[q] = n0;
            c1[q] = uint32_t(p1);
            c2[q] = n2;
            c3[q] = uint32_t(p0);
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    for (int q = 0; q < g; ++q) {
        u[4 * q + 0] = float(c0[q] >> 8) * (1.0f / 16777216.0f);
        u[4 * q + 1] = float(c1[q] >> 8) * (1.0f / 16777216.0f);
        u[4 * q + 2] = float(c2[q] >> 8) * (1.0f / 16777216.0f);
        u[4 * q + 3] = float(c3[q] >> 8) * (1.0f / 16777216.0f);
    }
}

// The low and high words of the Philox group counters q0 .. q0 + w - 1, for a vector of w
// counters whose low word wraps inside it (random_keep_avx2 / _avx512).
inline void group_counters(uint64_t q0, int w, uint32_t* lo, uint32_t* hi) {
    for (int g = 0; g < w; ++g) {
        lo[g] = uint32_t(q0 + uint64_t(g));
        hi[g] = uint32_t((q0 + uint64_t(g)) >> 32);
    }
}

#if defined(__AVX2__)
// AVX2 Philox keep mask of elements i0 .. i0 + 32 * (m / 32) (i0 a multiple of 4): 8 counters per
// vector, the 32x32 -> 64 products from two vpmuludq, then u < dens as the exact integer test
// (c >> 8) < ceil(dens * 2^24) (u = (c >> 8) * 2^-24 is exact), and a 4x8 transpose back to
// element order. Returns how many elements it did; the rest go through uniform_tile.
inline void mulhilo8(__m256i c, __m256i mult, __m256i& hi, __m256i& lo) {
    const __m256i pe = _mm256_mul_epu32(c, mult), po = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), mult);
    lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

inline int random_keep_avx2(int64_t i0, int m, uint64_t seed, uint32_t s, float dens, uint32_t* keep) {
    const double x = std::ceil(double(dens) * 16777216.0);
    const int32_t thr = x <= 0.0 ? 0 : x >= 16777217.0 ? 16777217 : int32_t(x);
    const __m256i vthr = _mm256_set1_epi32(thr), one = _mm256_set1_epi32(1);
    const __m256i m0 = _mm256_set1_epi32(int(0xD2511F53u)), m1 = _mm256_set1_epi32(int(0xCD9E8D57u));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int j = 0;
    for (; j + 32 <= m; j += 32) {
        const uint64_t q0 = uint64_t((i0 + j) >> 2);   // 8 consecutive groups: q0 .. q0 + 7
        const uint64_t q7 = q0 + 7;
        __m256i c0, c1;
        if ((q0 >> 32) == (q7 >> 32)) {
            c0 = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(q0))), lane);
            c1 = _mm256_set1_epi32(int(uint32_t(q0 >> 32)));
        } else {   // the low word wraps inside this vector
            alignas(32) uint32_t lo8[8], hi8[8];
            group_counters(q0, 8, lo8, hi8);
            c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo8));
            c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi8));
        }
        __m256i c2 = _mm256_set1_epi32(int(s)), c3 = _mm256_setzero_si256();
        uint32_t k0 = uint32_t(seed & 0xFFFFFFFFu), k1 = uint32_t(seed >> 32);
        for (int r = 0; r < 10; ++r) {
            __m256i hi0, lo0, hi1, lo1;
            mulhilo8(c0, m0, hi0, lo0);
            mulhilo8(c2, m1, hi1, lo1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(int(k0)));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
            c1 = lo1;
            c3 = lo0;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        // keep = (c >> 8) < thr, as 0 / 1
        const __m256i e0 = _mm256_and_si256(_mm256_cmpgt_epi32(vthr, _mm256_srli_epi32(c0, 8)), one);
        const __m256i e1 = _mm256_and_si256(_mm256_cmpgt_epi32(vthr, _mm256_srli_epi32(c1, 8)), one);
        const __m256i e2 = _mm256_and_si256(_mm256_cmpgt_epi32(vthr, _mm256_srli_epi32(c2, 8)), one);
        const __m256i e3 = _mm256_and_si256(_mm256_cmpgt_epi32(vthr, _mm256_srli_epi32(c3, 8)), one);
        // element 4g + w is word w of group g: transpose (4 words x 8 groups) to element order
        const __m256i a = _mm256_unpacklo_epi32(e0, e1), b = _mm256_unpackhi_epi32(e0, e1);
        const __m256i c = _mm256_unpacklo_epi32(e2, e3), d = _mm256_unpackhi_epi32(e2, e3);
        const __m256i r0 = _mm256_unpacklo_epi64(a, c), r1 = _mm256_unpackhi_epi64(a, c);
        const __m256i r2 = _mm256_unpacklo_epi64(b, d), r3 = _mm256_unpackhi_epi64(b, d);
        __m256i* o = reinterpret_cast<__m256i*>(keep + j);
        _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(r0, r1, 0x20));
        _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(r2, r3, 0x20));
        _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(r0, r1, 0x31));
        _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(r2, r3, 0x31));
    }
    return j;
}
#endif

#if WW_AVX512
// The AVX-512 form of random_keep_avx2: 16 counters (64 elements) per vector. A product's high and
// low words come from two vpmuludq and two masked in-lane shuffles (no shifts and blends), the
// three-way xors are one vpternlogd each: about half the instructions per element, and the
// shuffles run on another port than the products. Same integers, so the same bits. Measured with
// perf (bf16 DARE-TIES statistics, 16M x 4): Philox was 64 % of that pass's samples in the AVX2 form.
// GCC 12 flags the _mm512_undefined_epi32() its AVX-512 intrinsics pass as the unused source
// (-Wmaybe-uninitialized, a false positive that GCC 13 no longer gives): silenced for these two functions.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline void mulhilo16(__m512i c, __m512i mult, __m512i& hi, __m512i& lo) {
    const __m512i pe = _mm512_mul_epu32(c, mult), po = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), mult);
    lo = _mm512_mask_shuffle_epi32(pe, __mmask16(0xAAAA), po, _MM_PERM_CDAB);   // odd lanes: po's low word
    hi = _mm512_mask_shuffle_epi32(po, __mmask16(0x5555), pe, _MM_PERM_CDAB);   // even lanes: pe's high word
}

inline int random_keep_avx512(int64_t i0, int m, uint64_t seed, uint32_t s, float dens, uint32_t* keep) {
    const double x = std::ceil(double(dens) * 16777216.0);
    const int32_t thr = x <= 0.0 ? 0 : x >= 16777217.0 ? 16777217 : int32_t(x);
    const __m512i vthr = _mm512_set1_epi32(thr), one = _mm512_set1_epi32(1);
    const __m512i m0 = _mm512_set1_epi32(int(0xD2511F53u)), m1 = _mm512_set1_epi32(int(0xCD9E8D57u));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int j = 0;
    for (; j + 64 <= m; j += 64) {
        const uint64_t q0 = uint64_t((i0 + j) >> 2);   // 16 consecutive groups: q0 .. q0 + 15
        __m512i c0, c1;
        if ((q0 >> 32) == ((q0 + 15) >> 32)) {
            c0 = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(q0))), lane);
            c1 = _mm512_set1_epi32(int(uint32_t(q0 >> 32)));
        } else {   // the low word wraps inside this vector
            alignas(64) uint32_t lo16[16], hi16[16];
            group_counters(q0, 16, lo16, hi16);
            c0 = _mm512_load_si512(lo16);
            c1 = _mm512_load_si512(hi16);
        }
        __m512i c2 = _mm512_set1_epi32(int(s)), c3 = _mm512_setzero_si512();
        uint32_t k0 = uint32_t(seed & 0xFFFFFFFFu), k1 = uint32_t(seed >> 32);
        for (int r = 0; r < 10; ++r) {
            __m512i hi0, lo0, hi1, lo1;
            mulhilo16(c0, m0, hi0, lo0);
            mulhilo16(c2, m1, hi1, lo1);
            c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(int(k0)), 0x96);   // a ^ b ^ c
            c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(int(k1)), 0x96);
            c1 = lo1;
            c3 = lo0;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        // keep = (c >> 8) < thr as 0 / 1; element 4g + w is word w of group g
        const __m512i e0 = _mm512_maskz_mov_epi32(_mm512_cmplt_epi32_mask(_mm512_srli_epi32(c0, 8), vthr), one);
        const __m512i e1 = _mm512_maskz_mov_epi32(_mm512_cmplt_epi32_mask(_mm512_srli_epi32(c1, 8), vthr), one);
        const __m512i e2 = _mm512_maskz_mov_epi32(_mm512_cmplt_epi32_mask(_mm512_srli_epi32(c2, 8), vthr), one);
        const __m512i e3 = _mm512_maskz_mov_epi32(_mm512_cmplt_epi32_mask(_mm512_srli_epi32(c3, 8), vthr), one);
        // per 128-bit lane L: r_i = group 4L + i, words 0..3; then a 4 x 4 transpose of the lanes
        const __m512i a = _mm512_unpacklo_epi32(e0, e1), b = _mm512_unpackhi_epi32(e0, e1);
        const __m512i c = _mm512_unpacklo_epi32(e2, e3), d = _mm512_unpackhi_epi32(e2, e3);
        const __m512i r0 = _mm512_unpacklo_epi64(a, c), r1 = _mm512_unpackhi_epi64(a, c);
        const __m512i r2 = _mm512_unpacklo_epi64(b, d), r3 = _mm512_unpackhi_epi64(b, d);
        const __m512i t0 = _mm512_shuffle_i32x4(r0, r1, 0x44), t1 = _mm512_shuffle_i32x4(r2, r3, 0x44);
        const __m512i t2 = _mm512_shuffle_i32x4(r0, r1, 0xEE), t3 = _mm512_shuffle_i32x4(r2, r3, 0xEE);
        _mm512_storeu_si512(keep + j + 0, _mm512_shuffle_i32x4(t0, t1, 0x88));
        _mm512_storeu_si512(keep + j + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
        _mm512_storeu_si512(keep + j + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
        _mm512_storeu_si512(keep + j + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
    }
    return j;
}
#pragma GCC diagnostic pop
#endif

// keep[0 .. m) (each 0 or 1) as bits: element j is bit j & 31 of w[j / 32]; a last partial word's
// high bits are 0. The masks of a tile (i0 a multiple of TILE, so of 32) start at word i0 / 32.
inline void pack_bits(const uint32_t* keep, int m, uint32_t* w) {
    int b = 0;
#if defined(__AVX2__)
    for (; 32 * b + 32 <= m; ++b) {   // 8 lanes per movemask: bit 31 of keep << 31 is the lane's bit
        const __m256i* k = reinterpret_cast<const __m256i*>(keep + 32 * b);
        uint32_t v = 0;
        for (int q = 0; q < 4; ++q)
            v |= uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(k + q), 31))))
                 << (8 * q);
        w[b] = v;
    }
#endif
    for (; 32 * b < m; ++b) {
        const int e = std::min(32, m - 32 * b);
        uint32_t v = 0;
        for (int l = 0; l < e; ++l) v |= keep[32 * b + l] << l;
        w[b] = v;
    }
}

// The inverse of pack_bits: keep[j] = bit j of the words, for j < m.
inline void unpack_bits(const uint32_t* w, int m, uint32_t* keep) {
    for (int b = 0; 32 * b < m; ++b) {
        const uint32_t v = w[b];
        const int e = std::min(32, m - 32 * b);
        uint32_t* k = keep + 32 * b;
        if (e == 32)
            for (int l = 0; l < 32; ++l) k[l] = (v >> l) & 1u;   // a variable shift per lane (vpsrlvd)
        else
            for (int l = 0; l < e; ++l) k[l] = (v >> l) & 1u;
    }
}

// The distinct models of the queries, and each query's index into them (keys are computed once
// per model and tile, however many queries share the model).
inline std::vector<int64_t> distinct_models(const std::vector<int64_t>& qmodel, std::vector<int64_t>& slot) {
    std::vector<int64_t> models;
    slot.assign(qmodel.size(), 0);
    for (size_t q = 0; q < qmodel.size(); ++q) {
        auto it = std::find(models.begin(), models.end(), qmodel[q]);
        slot[q] = it - models.begin();
        if (it == models.end()) models.push_back(qmodel[q]);
    }
    return models;
}

// One block's tiles: f(mi, m, key) with the delta keys of models[mi] for each tile of m elements.
template <int DT, typename F>
inline void block_keys(const In& in, const std::vector<int64_t>& models, int64_t blk, float* b, float* d,
                       uint32_t* key, F&& f) {
    const int64_t s = blk * BLOCK, e = std::min(in.n, s + BLOCK);
    for (int64_t i0 = s; i0 < e; i0 += TILE) {
        const int m = int(std::min<int64_t>(TILE, e - i0));
        if (in.base) prefetch_tile<DT>(in.base, i0, m, in.n);
        const float* bt = in.base ? base_tile<DT>(in.base, i0, m, b) : nullptr;
        for (int64_t mi = 0; mi < int64_t(models.size()); ++mi) {
            prefetch_tile<DT>(in.xs[models[mi]], i0, m, in.n);
            model_keys<DT>(in, models[mi], i0, m, bt, d, key);
            f(mi, m, key);
        }
    }
}

// ------------------------------------------------------------------------------ masks
// The keep mask of one model's tile, shared by rescale_stats and merge: one thread's state (cut
// keys as int32, the running stable tie ranks of the current block) for every model.
template <int DT, int MODE, bool TIES>
struct Masker {
    const Plan& p;
    std::vector<Window> win;
    std::vector<int32_t> lo32, hi32;
    std::vector<uint32_t> keq_lo, keq_hi;
    std::vector<int64_t> r_lo, r_hi;
    alignas(64) uint32_t key[TILE];
    alignas(64) float u[TILE];

    Masker(const Plan& plan, int64_t K)
        : p(plan), win(static_cast<size_t>(K)), lo32(static_cast<size_t>(K)), hi32(static_cast<size_t>(K)),
          keq_lo(static_cast<size_t>(K)), keq_hi(static_cast<size_t>(K)), r_lo(static_cast<size_t>(K)),
          r_hi(static_cast<size_t>(K)) {
        for (int64_t t = 0; t < K; ++t) {
            win[t] = MODE == MODE_WINDOW ? window_of(p, t) : Window{};
            lo32[t] = clamp_key(win[t].key_lo);
            hi32[t] = clamp_key(win[t].key_hi);
            // an element equal to a cut key at rank 0 (no tie offsets: every rank is 0)
            keq_lo[t] = uint32_t((0 >= win[t].a) & (0 < win[t].b));
            keq_hi[t] = uint32_t((0 >= win[t].c) & (0 < win[t].e));
        }
    }

    void start_block(int64_t blk) {
        if (TIES)
            for (size_t t = 0; t < win.size(); ++t) {
                r_lo[t] = p.ties[(t * 2 + 0) * p.nblocks + blk];
                r_hi[t] = p.ties[(t * 2 + 1) * p.nblocks + blk];
            }
    }

    // keep[j] in {0, 1} for the deltas d of model t, elements i0 .. i0 + m (MODE != MODE_NONE);
    // window_keep (csrc/sparse_elem.h) element by element, with the ranks only walked in a tile
    // that holds a cut key.
    void keep(int64_t t, int64_t i0, int m, const float* d, uint32_t* keep) {
        if (MODE == MODE_RANDOM) {
            const float dens = p.density[t];
            int j0 = 0;
#if WW_AVX512
            j0 = random_keep_avx512(i0, m, p.seed, p.stream0 + uint32_t(t), dens, keep);
#endif
#if defined(__AVX2__)
            j0 += random_keep_avx2(i0 + j0, m - j0, p.seed, p.stream0 + uint32_t(t), dens, keep + j0);
#endif
            if (j0 < m) {
                uniform_tile(i0 + j0, m - j0, p.seed, p.stream0 + uint32_t(t), u);
                for (int j = j0; j < m; ++j) keep[j] = uint32_t(u[j - j0] < dens);
            }
            return;
        }
        keys_tile<DT>(d, key, m);
        const int32_t lo = lo32[t], hi = hi32[t];
        const uint32_t kl = keq_lo[t], kh = keq_hi[t];
        uint32_t n_lo = 0, n_hi = 0;
        for (int j = 0; j < m; ++j) {
            const int32_t k = int32_t(key[j]);
            const uint32_t el = uint32_t(k == lo), eh = uint32_t(k == hi);
            n_lo += el;
            n_hi += eh;
            const uint32_t in_range = uint32_t(k > lo) & uint32_t(k < hi);
            keep[j] = TIES ? in_range : (in_range | (el & kl) | (eh & kh));
        }
        if (TIES && (n_lo | n_hi)) {
            // The ranks of a cut key's lanes in this tile are r .. r + count - 1. When that run lies
            // wholly inside or wholly outside the keep window, every such lane is decided at once
            // (a 16-bit cut key can be a quarter of all elements: most tiles hold many); only a
            // tile the window's edge falls into walks its lanes one by one.
            const Window w = win[t];
            const int64_t rl = r_lo[t], rh = r_hi[t];
            const int in_lo = n_lo == 0 ? 0 : (rl >= w.a && rl + n_lo <= w.b) ? 1 : (rl + n_lo <= w.a || rl >= w.b) ? 0 : -1;
            const int in_hi = n_hi == 0 ? 0 : (rh >= w.c && rh + n_hi <= w.e) ? 1 : (rh + n_hi <= w.c || rh >= w.e) ? 0 : -1;
            if (in_lo >= 0 && in_hi >= 0) {
                if (in_lo | in_hi) {
                    const uint32_t ml = uint32_t(in_lo), mh = uint32_t(in_hi);
                    for (int j = 0; j < m; ++j) {
                        const int32_t k = int32_t(key[j]);
                        keep[j] |= (uint32_t(k == lo) & ml) | (uint32_t(k == hi) & mh);
                    }
                }
                r_lo[t] = rl + n_lo;
                r_hi[t] = rh + n_hi;
                return;
            }
        }
        if (TIES && (n_lo | n_hi)) {
            // visit only the lanes equal to a cut key, in element order (a 16-bit cut key is a tie
            // group of ~1% of the elements: most tiles hold a few): 64-lane bit masks, lowest bit first
            const Window w = win[t];
            int64_t rl = r_lo[t], rh = r_hi[t];
            for (int j0 = 0; j0 < m; j0 += 64) {
                const int mm = std::min(64, m - j0);
                uint64_t bits = 0;
                int j = 0;
#if defined(__AVX2__)
                const __m256i vl = _mm256_set1_epi32(lo), vh = _mm256_set1_epi32(hi);
                for (; j + 8 <= mm; j += 8) {
                    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + j0 + j));
                    const __m256i e = _mm256_or_si256(_mm256_cmpeq_epi32(k, vl), _mm256_cmpeq_epi32(k, vh));
                    bits |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(e)))) << j;
                }
#endif
                for (; j < mm; ++j) {
                    const int32_t k = int32_t(key[j0 + j]);
                    bits |= uint64_t((k == lo) | (k == hi)) << j;
                }
                while (bits) {
                    const int j = j0 + __builtin_ctzll(bits);
                    bits &= bits - 1;
                    const int64_t k = int64_t(key[j]);
                    keep[j] = uint32_t(window_keep(w, k, rl, rh));
                    rl += k == w.key_lo;
                    rh += k == w.key_hi;
                }
            }
            r_lo[t] = rl;
            r_hi[t] = rh;
        }
    }
};

}  // namespace sparse_cpu
