// The sparse family's CPU kernels (no pybind11): included twice, once by sparse_cpu.cpp for the
// baseline x86-64 / aarch64 target and once by sparse_cpu_avx2.cpp compiled with -mavx2, each
// time inside its own namespace (WW_ISA) so the two builds never share an out-of-line symbol.
// Both are the same source, so both give the same bits: no FMA contraction (-ffp-contract=off,
// setup.py) and only IEEE add/mul/div, whose vector forms round exactly like the scalar ones.
//
// Layout of every pass: a thread owns whole blocks of BLOCK elements; inside a block it works on
// tiles of TILE elements, model by model. Per tile and model the delta, its magnitude key and the
// keep mask are computed in straight-line loops over small arrays (vectorised by the compiler);
// the stable-sort tie ranks, sequential by definition, are only walked for a tile that holds an
// element equal to a cut key (rare: the windows are exact, see wweight/sparse/plan.py).
//
// Expects <omp.h>, <algorithm>, <cstdint>, <cstring>, <stdexcept>, <string>, <type_traits>,
// <vector>, <cmath>, <functional> and "sparse_args.h" to be included before the enclosing namespace opens.
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
            for (int g = 0; g < 8; ++g) {
                lo8[g] = uint32_t(q0 + uint64_t(g));
                hi8[g] = uint32_t((q0 + uint64_t(g)) >> 32);
            }
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
        const float* bt = in.base ? base_tile<DT>(in.base, i0, m, b) : nullptr;
        for (int64_t mi = 0; mi < int64_t(models.size()); ++mi) {
            model_keys<DT>(in, models[mi], i0, m, bt, d, key);
            f(mi, m, key);
        }
    }
}

// ------------------------------------------------------------------------------ digit_hist
// Histogram of digit (key >> shift) & mask of each query's model, over the elements whose high
// key bits match the query's prefix. Keys are computed once per model and tile, however many
// queries share the model; per-thread uint32 counts (a thread's share of one call is < 2^32
// elements per flush), summed into the int64 output.
template <int DT>
void digit_hist(const In& in, const std::vector<int64_t>& qmodel, const std::vector<int64_t>& prefix, int shift,
                int nbits, int high_shift, bool has_prefix, int64_t* hist) {
    const int64_t n = in.n, Q = int64_t(qmodel.size()), NB = int64_t(1) << nbits, nblocks = (n + BLOCK - 1) / BLOCK;
    const uint32_t mask = uint32_t(NB - 1);
    // models in use, and for each query its model slot; queries with no prefix on one model share a table
    std::vector<int64_t> slot, table(Q);
    const std::vector<int64_t> models = distinct_models(qmodel, slot);
    for (int64_t q = 0; q < Q; ++q) {
        table[q] = q;
        if (!has_prefix)
            for (int64_t r = 0; r < q; ++r)
                if (qmodel[r] == qmodel[q]) { table[q] = table[r]; break; }
    }
    constexpr int64_t FLUSH = int64_t(1) << 30;   // elements per thread between uint32 flushes
#pragma omp parallel
    {
        std::vector<uint32_t> local(size_t(Q * NB), 0);
        std::vector<int64_t> wide;
        int64_t since = 0;
        alignas(64) float b[TILE], d[TILE];
        alignas(64) uint32_t key[TILE];
        auto flush = [&]() {
            if (wide.empty()) wide.assign(size_t(Q * NB), 0);
            for (int64_t j = 0; j < Q * NB; ++j) { wide[j] += local[j]; local[j] = 0; }
            since = 0;
        };
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
            block_keys<DT>(in, models, blk, b, d, key, [&](int64_t mi, int m, const uint32_t* key) {
                    for (int64_t q = 0; q < Q; ++q) {
                        if (slot[q] != mi || table[q] != q) continue;
                        uint32_t* h = local.data() + q * NB;
                        if (has_prefix) {
                            const uint32_t pre = uint32_t(prefix[q] >> high_shift);
                            for (int j = 0; j < m; ++j)
                                if ((key[j] >> high_shift) == pre) h[(key[j] >> shift) & mask]++;
                        } else {
                            for (int j = 0; j < m; ++j) h[(key[j] >> shift) & mask]++;
                        }
                    }
            });
            since += e - s;
            if (since >= FLUSH) flush();
        }
        if (!wide.empty()) flush();
#pragma omp critical
        {
            for (int64_t q = 0; q < Q; ++q) {
                int64_t* o = hist + q * NB;
                const int64_t tq = table[q];
                if (!wide.empty())
                    for (int64_t j = 0; j < NB; ++j) o[j] += wide[tq * NB + j];
                else
                    for (int64_t j = 0; j < NB; ++j) o[j] += local[tq * NB + j];
            }
        }
    }
}

// ------------------------------------------------------------------------------ tie_counts
// Per block: how many elements of each query's model have key == qkey.
template <int DT>
void tie_counts(const In& in, const std::vector<int64_t>& qmodel, const std::vector<int64_t>& qkey, int64_t* o) {
    const int64_t n = in.n, nblocks = (n + BLOCK - 1) / BLOCK, Q = int64_t(qmodel.size());
#pragma omp parallel
    {
        alignas(64) float b[TILE], d[TILE];
        alignas(64) uint32_t key[TILE];
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
            for (int64_t q = 0; q < Q; ++q) o[q * nblocks + blk] = 0;
            for (int64_t i0 = s; i0 < e; i0 += TILE) {
                const int m = int(std::min<int64_t>(TILE, e - i0));
                const float* bt = in.base ? base_tile<DT>(in.base, i0, m, b) : nullptr;
                int64_t last = -1;
                for (int64_t q = 0; q < Q; ++q) {
                    if (qmodel[q] != last) model_keys<DT>(in, qmodel[q], i0, m, bt, d, key);
                    last = qmodel[q];
                    const uint32_t k = uint32_t(qkey[q]);
                    uint32_t c = 0;
                    for (int j = 0; j < m; ++j) c += key[j] == k;
                    o[q * nblocks + blk] += c;
                }
            }
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
#if defined(__AVX2__)
            j0 = random_keep_avx2(i0, m, p.seed, p.stream0 + uint32_t(t), dens, keep);
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

// ------------------------------------------------------------------------------ select
// Exact k-th largest key of every query in (usually) one pass over the inputs, with the per-block
// tie counts of the found key as a by-product: the same answers as wweight/sparse/plan.py
// radix_select + tie_counts, which take 2-3 passes and one more for the tie counts.
//   1. A sample (up to 4096 runs of 8 consecutive elements per model) brackets each query's key:
//      [k_lo, k_hi] = the sample's keys at ranks k/n * S -/+ (5 sigma + 32).
//   2. One pass counts, per query, the elements above k_hi (a vectorised compare) and keeps every
//      element inside the bracket as a candidate (key, block), by branch-free compaction.
//   3. If above < k <= above + candidates, the k-th key is a candidate: an nth_element over the
//      candidates gives it, its counts and its per-block tie counts. Otherwise (the sample missed:
//      very skewed data) or when the candidates overflow their cap (huge tie groups), the query is
//      left to the radix passes (resolved = 0): still exact, at 1-3 more passes.
// Appends the keys of key[0 .. m) with key - lo <= width (unsigned) to out; returns how many.
// out must have room for m more. Same keys in the same order on every build; the AVX2 build
// compacts 8 lanes at a time (compare, movemask, a permutation from a 256-entry table).
inline int compact_bracket(const uint32_t* key, int m, uint32_t lo, uint32_t width, uint32_t* out) {
    int nc = 0, j = 0;
#if defined(__AVX2__)
    static const auto lut = [] {
        std::vector<uint32_t> t(256 * 8, 0);
        for (int mask = 0; mask < 256; ++mask) {
            int c = 0;
            for (int l = 0; l < 8; ++l)
                if (mask & (1 << l)) t[mask * 8 + c++] = uint32_t(l);
        }
        return t;
    }();
    const __m256i vlo = _mm256_set1_epi32(int(lo)), sign = _mm256_set1_epi32(int(0x80000000u));
    const __m256i vw = _mm256_xor_si256(_mm256_set1_epi32(int(width)), sign);
    for (; j + 8 <= m; j += 8) {
        const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + j));
        const __m256i t = _mm256_xor_si256(_mm256_sub_epi32(k, vlo), sign);
        const int out_mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(t, vw)));
        const int in_mask = ~out_mask & 0xFF;
        const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut.data() + in_mask * 8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + nc), _mm256_permutevar8x32_epi32(k, perm));
        nc += __builtin_popcount(unsigned(in_mask));
    }
#endif
    for (; j < m; ++j) {   // branch-free: every key written, the count only advanced for a candidate
        out[nc] = key[j];
        nc += int(key[j] - lo <= width);
    }
    return nc;
}

template <int DT>
void select_keys(const In& in, const std::vector<int64_t>& qmodel, const std::vector<int64_t>& ks, int64_t* res,
                 int64_t* ties) {
    const int64_t n = in.n, Q = int64_t(qmodel.size()), nblocks = (n + BLOCK - 1) / BLOCK;
    for (int64_t q = 0; q < Q; ++q) res[4 * q + 3] = 0;
    if (n == 0 || nblocks >= (int64_t(1) << 32)) return;
    std::vector<int64_t> slot;
    const std::vector<int64_t> models = distinct_models(qmodel, slot);
    const int64_t M = int64_t(models.size());
    // ---- 1. sample and bracket
    constexpr int RUN = 8;
    // about 1 element in 32 of a small tensor, at most 4096 runs: the two nth_elements of the
    // bracket stay well below the pass's time
    const int64_t runs = std::max<int64_t>(1, std::min<int64_t>({int64_t(4096), n / RUN, std::max<int64_t>(64, n / 256)}));
    std::vector<std::vector<uint32_t>> sample(M);
#pragma omp parallel for schedule(static)
    for (int64_t mi = 0; mi < M; ++mi) {
        std::vector<uint32_t>& sk = sample[mi];
        alignas(64) float b[RUN], d[RUN];
        alignas(64) uint32_t key[RUN];
        for (int64_t r = 0; r < runs; ++r) {
            const int64_t i0 = runs == 1 ? 0 : r * (n - std::min<int64_t>(n, RUN)) / (runs - 1);
            const int m = int(std::min<int64_t>(RUN, n - i0));
            const float* bt = in.base ? base_tile<DT>(in.base, i0, m, b) : nullptr;
            model_keys<DT>(in, models[mi], i0, m, bt, d, key);
            sk.insert(sk.end(), key, key + m);
        }
    }
    std::vector<uint32_t> klo(Q), khi(Q);
    std::vector<int64_t> cap(Q);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t q = 0; q < Q; ++q) {
        std::vector<uint32_t> sk = sample[slot[q]];
        const int64_t S = int64_t(sk.size());
        const double pk = double(ks[q]) / double(n), mu = pk * double(S);
        const double margin = 5.0 * std::sqrt(double(S) * pk * (1.0 - pk)) + 32.0;
        // descending rank r (0 = largest) is ascending position S - 1 - r
        const int64_t r_hi = std::max<int64_t>(0, int64_t(mu - margin));
        const int64_t r_lo = std::min<int64_t>(S - 1, int64_t(mu + margin));
        std::nth_element(sk.begin(), sk.begin() + (S - 1 - r_lo), sk.end());
        klo[q] = sk[S - 1 - r_lo];
        std::nth_element(sk.begin(), sk.begin() + (S - 1 - r_hi), sk.end());
        khi[q] = r_hi == 0 ? 0xFFFFFFFFu : sk[S - 1 - r_hi];   // the top of the sample: no upper bound
        // the bracket holds about (r_lo - r_hi) / S of the elements; 4x that (and >= 64K) before giving up
        cap[q] = std::max<int64_t>(int64_t(1) << 16, int64_t(4.0 * double(r_lo - r_hi + 1) / double(S) * double(n)));
    }
    // ---- 2. the pass: candidates in block order per thread, with a count per block (their blocks)
    constexpr uint32_t NARROW = 16;
    std::vector<uint8_t> narrow(Q, 0);
    std::vector<std::vector<uint32_t>> narrow_counts(Q);
    for (int64_t q = 0; q < Q; ++q)
        if (khi[q] != 0xFFFFFFFFu && khi[q] - klo[q] < NARROW) {
            narrow[q] = 1;
            narrow_counts[q].assign(size_t(nblocks) * (khi[q] - klo[q] + 1), 0);
        }
    const int nth = omp_get_max_threads();
    std::vector<std::vector<std::vector<uint32_t>>> cands(nth, std::vector<std::vector<uint32_t>>(Q));
    std::vector<uint32_t> per_block(size_t(Q * nblocks), 0);
    std::vector<int64_t> above(Q, 0);
    std::vector<uint8_t> overflow(Q, 0);
#pragma omp parallel num_threads(nth)
    {
        std::vector<std::vector<uint32_t>>& mine = cands[omp_get_thread_num()];
        std::vector<int64_t> used(Q, 0), my_above(Q, 0);
        std::vector<uint8_t> full(Q, 0);
        alignas(64) float b[TILE], d[TILE];
        alignas(64) uint32_t key[TILE];
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            block_keys<DT>(in, models, blk, b, d, key, [&](int64_t mi, int m, const uint32_t* key) {
                    for (int64_t q = 0; q < Q; ++q) {
                        if (slot[q] != mi) continue;
                        const uint32_t lo = klo[q], hi = khi[q];
                        uint32_t up = 0;
                        for (int j = 0; j < m; ++j) up += uint32_t(key[j] > hi);
                        my_above[q] += up;
                        if (narrow[q]) {
                            // a bracket of <= NARROW keys (16-bit dtypes: the cut is one big tie group):
                            // count each key per block with vector compares, keep no candidates
                            uint32_t* bc = narrow_counts[q].data() + size_t(blk) * (hi - lo + 1);
                            for (uint32_t v = 0; v <= hi - lo; ++v) {
                                uint32_t c = 0;
                                const uint32_t kv = lo + v;
                                for (int j = 0; j < m; ++j) c += uint32_t(key[j] == kv);
                                bc[v] += c;
                            }
                            continue;
                        }
                        if (full[q]) continue;                       // overflowed: the radix passes answer q
                        std::vector<uint32_t>& c = mine[q];
                        if (used[q] + m > int64_t(c.size())) {
                            if (used[q] > cap[q]) { full[q] = 1; continue; }
                            c.resize(std::max<size_t>(size_t(used[q] + TILE), 2 * c.size()));
                        }
                        const int nc = compact_bracket(key, m, lo, hi - lo, c.data() + used[q]);
                        used[q] += nc;
                        per_block[size_t(q * nblocks + blk)] += uint32_t(nc);
                    }
            });
        }
        for (int64_t q = 0; q < Q; ++q) mine[q].resize(size_t(used[q]));
#pragma omp critical
        for (int64_t q = 0; q < Q; ++q) {
            above[q] += my_above[q];
            if (full[q]) overflow[q] = 1;
        }
    }
    // ---- 3. answer each query: res rows (key, count_gt, count_eq, resolved); queries in parallel
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t q = 0; q < Q; ++q) {
        if (narrow[q]) {
            const uint32_t W = khi[q] - klo[q] + 1;
            const uint32_t* bc = narrow_counts[q].data();
            std::vector<int64_t> h(W, 0);
            for (int64_t blk = 0; blk < nblocks; ++blk)
                for (uint32_t v = 0; v < W; ++v) h[v] += bc[size_t(blk) * W + v];
            if (above[q] >= ks[q]) continue;         // the k-th lies above the bracket
            int64_t seen = above[q], v = int64_t(W) - 1;
            for (; v >= 0; --v) {
                if (seen + h[size_t(v)] >= ks[q]) break;
                seen += h[size_t(v)];
            }
            if (v < 0) continue;                     // the k-th lies below the bracket
            int64_t* tq = ties + q * nblocks;
            for (int64_t blk = 0; blk < nblocks; ++blk) tq[blk] = bc[size_t(blk) * W + size_t(v)];
            int64_t* r = res + 4 * q;
            r[0] = klo[q] + uint32_t(v);
            r[1] = seen;
            r[2] = h[size_t(v)];
            r[3] = 1;
            continue;
        }
        if (overflow[q]) continue;
        int64_t total = 0;
        for (int th = 0; th < nth; ++th) total += int64_t(cands[th][q].size());
        const int64_t k_rem = ks[q] - above[q];      // rank of the answer among the candidates
        if (k_rem < 1 || k_rem > total) continue;   // not in the bracket
        const uint32_t lo = klo[q], width = khi[q] - klo[q];
        uint32_t found;
        if (width < (1u << 16)) {
            // a narrow bracket (16-bit keys): count the keys, walk down from the top
            std::vector<int64_t> cnt(size_t(width) + 1, 0);
            for (int th = 0; th < nth; ++th)
                for (const uint32_t k : cands[th][q]) ++cnt[k - lo];
            int64_t seen = 0;
            int64_t v = int64_t(width);
            for (; v > 0; --v) {
                if (seen + cnt[size_t(v)] >= k_rem) break;
                seen += cnt[size_t(v)];
            }
            found = lo + uint32_t(v);
        } else {
            std::vector<uint32_t> all;
            all.reserve(size_t(total));
            for (int th = 0; th < nth; ++th) all.insert(all.end(), cands[th][q].begin(), cands[th][q].end());
            std::nth_element(all.begin(), all.begin() + (k_rem - 1), all.end(), std::greater<uint32_t>());
            found = all[k_rem - 1];
        }
        int64_t gt = above[q], eq = 0;
        int64_t* tq = ties + q * nblocks;
        std::fill(tq, tq + nblocks, 0);
        // the candidates of each thread lie in block order, per_block[] of them per block; the
        // threads' block ranges follow each other in thread order (static schedule)
        const uint32_t* pb = per_block.data() + size_t(q * nblocks);
        int64_t blk = 0;
        for (int th = 0; th < nth; ++th) {
            const uint32_t* c = cands[th][q].data();
            const int64_t nc = int64_t(cands[th][q].size());
            for (int64_t i = 0; i < nc;) {
                while (pb[blk] == 0) ++blk;
                const int64_t e = i + pb[blk];
                int64_t g = 0, h = 0;
                for (; i < e; ++i) {
                    g += c[i] > found;
                    h += c[i] == found;
                }
                gt += g;
                eq += h;
                tq[blk] = h;
                ++blk;
            }
        }
        int64_t* r = res + 4 * q;
        r[0] = found;
        r[1] = gt;
        r[2] = eq;
        r[3] = 1;
    }
}

// ------------------------------------------------------------------------------ rescale_stats
// Per model: sum (l1: |d|, l2: d^2) or max (linf) of the deltas before and after the mask, in
// float32 over each block in element order and in float64 across a thread's blocks in order, the
// threads' partials summed in thread order (the same blocks per thread as a static schedule of
// one model at a time gives). The float32 chains of up to 4 models run interleaved: one model's
// sum is a chain of dependent adds, 4 of them keep the adders busy.
template <int DT, int MODE, bool TIES>
void rescale_stats_impl(const In& in, const Plan& p, int norm, double* o) {
    const int64_t n = in.n, nblocks = (n + BLOCK - 1) / BLOCK, K = int64_t(in.xs.size());
    const int nth = omp_get_max_threads();
    std::vector<double> pb(size_t(nth) * K, 0.0), pa(size_t(nth) * K, 0.0);
#pragma omp parallel num_threads(nth)
    {
        Masker<DT, MODE, TIES> mk(p, K);
        std::vector<double> lb(static_cast<size_t>(K), 0.0), la(static_cast<size_t>(K), 0.0);
        std::vector<float> vb(static_cast<size_t>(4 * TILE)), va(static_cast<size_t>(4 * TILE));
        std::vector<float> fb(static_cast<size_t>(K)), fa(static_cast<size_t>(K));
        alignas(64) float b[TILE], d[TILE];
        alignas(64) uint32_t keep[TILE];
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
            mk.start_block(blk);
            std::fill(fb.begin(), fb.end(), 0.f);
            std::fill(fa.begin(), fa.end(), 0.f);
            for (int64_t i0 = s; i0 < e; i0 += TILE) {
                const int m = int(std::min<int64_t>(TILE, e - i0));
                const float* bt = in.base ? base_tile<DT>(in.base, i0, m, b) : nullptr;
                for (int64_t t0 = 0; t0 < K; t0 += 4) {
                    const int g = int(std::min<int64_t>(4, K - t0));
                    for (int gi = 0; gi < 4; ++gi) {
                        float* vbg = vb.data() + gi * TILE;
                        float* vag = va.data() + gi * TILE;
                        if (gi >= g) {   // padding lanes: zeros, never stored
                            std::fill(vbg, vbg + m, 0.f);
                            std::fill(vag, vag + m, 0.f);
                            continue;
                        }
                        const int64_t t = t0 + gi;
                        delta_tile<DT>(in.xs[t], i0, bt, m, d);
                        if (MODE == MODE_NONE) for (int j = 0; j < m; ++j) keep[j] = 1u;
                        else mk.keep(t, i0, m, d, keep);
                        for (int j = 0; j < m; ++j) {
                            const float v = std::fabs(d[j]);
                            const float x = norm == 2 ? v * v : v;
                            vbg[j] = x;
                            vag[j] = bits_f32(f32_bits(x) & (0u - keep[j]));   // keep ? x : +0
                        }
                    }
                    float b0 = fb[t0], b1 = g > 1 ? fb[t0 + 1] : 0.f, b2 = g > 2 ? fb[t0 + 2] : 0.f,
                          b3 = g > 3 ? fb[t0 + 3] : 0.f;
                    float a0 = fa[t0], a1 = g > 1 ? fa[t0 + 1] : 0.f, a2 = g > 2 ? fa[t0 + 2] : 0.f,
                          a3 = g > 3 ? fa[t0 + 3] : 0.f;
                    const float *v0 = vb.data(), *v1 = v0 + TILE, *v2 = v1 + TILE, *v3 = v2 + TILE;
                    const float *w0 = va.data(), *w1 = w0 + TILE, *w2 = w1 + TILE, *w3 = w2 + TILE;
                    if (norm == 3) {
                        for (int j = 0; j < m; ++j) {
                            b0 = std::max(b0, v0[j]); b1 = std::max(b1, v1[j]);
                            b2 = std::max(b2, v2[j]); b3 = std::max(b3, v3[j]);
                            a0 = std::max(a0, w0[j]); a1 = std::max(a1, w1[j]);
                            a2 = std::max(a2, w2[j]); a3 = std::max(a3, w3[j]);
                        }
                    } else {
                        for (int j = 0; j < m; ++j) {
                            b0 += v0[j]; b1 += v1[j]; b2 += v2[j]; b3 += v3[j];
                            a0 += w0[j]; a1 += w1[j]; a2 += w2[j]; a3 += w3[j];
                        }
                    }
                    fb[t0] = b0; fa[t0] = a0;
                    if (g > 1) { fb[t0 + 1] = b1; fa[t0 + 1] = a1; }
                    if (g > 2) { fb[t0 + 2] = b2; fa[t0 + 2] = a2; }
                    if (g > 3) { fb[t0 + 3] = b3; fa[t0 + 3] = a3; }
                }
            }
            for (int64_t t = 0; t < K; ++t) {
                if (norm == 3) { lb[t] = std::max(lb[t], double(fb[t])); la[t] = std::max(la[t], double(fa[t])); }
                else { lb[t] += fb[t]; la[t] += fa[t]; }
            }
        }
        const int me = omp_get_thread_num();
        for (int64_t t = 0; t < K; ++t) {
            pb[size_t(me) * K + t] = lb[t];
            pa[size_t(me) * K + t] = la[t];
        }
    }
    for (int64_t t = 0; t < K; ++t) {
        double before = 0, after = 0;
        for (int j = 0; j < nth; ++j) {
            const double xb = pb[size_t(j) * K + t], xa = pa[size_t(j) * K + t];
            if (norm == 3) { before = std::max(before, xb); after = std::max(after, xa); }
            else { before += xb; after += xa; }
        }
        o[2 * t] = before;
        o[2 * t + 1] = after;
    }
}

template <int DT>
void rescale_stats(const In& in, const Plan& p, int norm, double* o) {
    if (p.mode == MODE_WINDOW && p.ties) rescale_stats_impl<DT, MODE_WINDOW, true>(in, p, norm, o);
    else if (p.mode == MODE_WINDOW) rescale_stats_impl<DT, MODE_WINDOW, false>(in, p, norm, o);
    else if (p.mode == MODE_RANDOM) rescale_stats_impl<DT, MODE_RANDOM, false>(in, p, norm, o);
    else rescale_stats_impl<DT, MODE_NONE, false>(in, p, norm, o);
}

// ------------------------------------------------------------------------------ merge
// mergekit's masked, rescaled, weighted, sign-elected sum (csrc/sparse_elem.h MergeAcc / finish),
// every element in the same operation order as before this kernel was tiled: the output bits are
// those of the scalar loop.
template <int DT, int RD, int MODE, bool TIES, bool CONSENSUS>
void merge_impl(const In& in, void* out, const Plan& p, const std::vector<float>& weights,
                const std::vector<float>& scales, float lam, float divisor_nc, bool normalize,
                bool sparsify_only, int32_t* flags) {
    const int64_t K = int64_t(in.xs.size()), n = in.n, nblocks = (n + BLOCK - 1) / BLOCK;
    const bool apply_lambda = lam != 1.f;
    const float* wt = weights.data();
    const float* sc = scales.data();
    const bool has_base = in.base != nullptr;
#pragma omp parallel
    {
        Masker<DT, MODE, TIES> mk(p, K);
        std::vector<int32_t> bad(static_cast<size_t>(K + 1), 0);
        alignas(64) float b[TILE], d[TILE], total[TILE], pos[TILE], neg[TILE], wpos[TILE], wneg[TILE];
        alignas(64) uint32_t keep[TILE];
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
            mk.start_block(blk);
            for (int64_t i0 = s; i0 < e; i0 += TILE) {
                const int m = int(std::min<int64_t>(TILE, e - i0));
                const float* bt = nullptr;
                if (has_base) {
                    bt = base_tile<DT>(in.base, i0, m, b);
                    uint32_t bb = 0;
                    for (int j = 0; j < m; ++j) bb |= nonfinite(bt[j]);
                    bad[K] |= int32_t(bb);
                }
                for (int j = 0; j < m; ++j) total[j] = pos[j] = neg[j] = wpos[j] = wneg[j] = 0.f;
                for (int64_t t = 0; t < K; ++t) {
                    bad[t] |= int32_t(delta_tile<DT>(in.xs[t], i0, bt, m, d));
                    if (MODE != MODE_NONE) {
                        // (keep ? d : +0) * scale, rounded: the masked delta as mergekit forms it
                        mk.keep(t, i0, m, d, keep);
                        const float st = sc[t];
                        for (int j = 0; j < m; ++j) d[j] = rnd<RD>(bits_f32(f32_bits(d[j]) & (0u - keep[j])) * st);
                    }
                    if (sparsify_only) {
                        for (int j = 0; j < m; ++j) total[j] = d[j];
                        continue;
                    }
                    const float w = wt[t];
                    const uint32_t bww = f32_bits(w);
                    for (int j = 0; j < m; ++j) {
                        const float wd = rnd<RD>(d[j] * w);
                        total[j] += wd;
                        if (CONSENSUS) {
                            // bit masks, not selects: the sign of wd is a coin flip. Adding +0 leaves every sum exact.
                            const uint32_t mp = 0u - uint32_t(wd > 0.f), mn = 0u - uint32_t(wd < 0.f);
                            const uint32_t bw = f32_bits(wd);
                            pos[j] += bits_f32(bw & mp);
                            neg[j] += bits_f32(bw & mn);
                            wpos[j] += bits_f32(bww & mp);
                            wneg[j] += bits_f32(bww & mn);
                        }
                    }
                }
                if (sparsify_only) {
                    store_tile<DT>(out, i0, m, total);
                    continue;
                }
                // finish (csrc/sparse_elem.h) step by step over the tile, so each step vectorises:
                // the elected (or plain) sum and divisor, the division, lambda, + base, the store
                float* mixed = total;
                float* div = pos;
                if (CONSENSUS) {
                    for (int j = 0; j < m; ++j) {
                        const bool up = total[j] >= 0.f;
                        const float mx = rnd<RD>(up ? pos[j] : neg[j]);
                        const float dv = rnd<RD>(up ? wpos[j] : wneg[j]);
                        mixed[j] = mx;
                        div[j] = dv == 0.f ? 1.f : dv;
                    }
                } else {
                    for (int j = 0; j < m; ++j) {
                        mixed[j] = rnd<RD>(total[j]);
                        div[j] = divisor_nc;
                    }
                }
                if (normalize)
                    for (int j = 0; j < m; ++j) mixed[j] = rnd<RD>(mixed[j] / div[j]);
                if (apply_lambda)
                    for (int j = 0; j < m; ++j) mixed[j] = rnd<RD>(mixed[j] * lam);
                if (has_base)
                    for (int j = 0; j < m; ++j) mixed[j] = bt[j] + mixed[j];
                else
                    for (int j = 0; j < m; ++j) mixed[j] = 0.f + mixed[j];
                store_tile<DT>(out, i0, m, mixed);
            }
        }
#pragma omp critical
        for (int64_t t = 0; t <= K; ++t) flags[t] |= bad[t];
    }
}

template <int DT, int RD, bool CONSENSUS>
void merge_modes_c(const In& in, void* out, const Plan& p, const std::vector<float>& w, const std::vector<float>& sc,
                   float lam, float div, bool normalize, bool sparsify_only, int32_t* f) {
    if (p.mode == MODE_WINDOW && p.ties)
        merge_impl<DT, RD, MODE_WINDOW, true, CONSENSUS>(in, out, p, w, sc, lam, div, normalize, sparsify_only, f);
    else if (p.mode == MODE_WINDOW)
        merge_impl<DT, RD, MODE_WINDOW, false, CONSENSUS>(in, out, p, w, sc, lam, div, normalize, sparsify_only, f);
    else if (p.mode == MODE_RANDOM)
        merge_impl<DT, RD, MODE_RANDOM, false, CONSENSUS>(in, out, p, w, sc, lam, div, normalize, sparsify_only, f);
    else
        merge_impl<DT, RD, MODE_NONE, false, CONSENSUS>(in, out, p, w, sc, lam, div, normalize, sparsify_only, f);
}

template <int DT, int RD>
void merge_modes(const In& in, void* out, const Plan& p, const std::vector<float>& w, const std::vector<float>& sc,
                 float lam, float div, bool consensus, bool normalize, bool sparsify_only, int32_t* f) {
    if (consensus)
        merge_modes_c<DT, RD, true>(in, out, p, w, sc, lam, div, normalize, sparsify_only, f);
    else
        merge_modes_c<DT, RD, false>(in, out, p, w, sc, lam, div, normalize, sparsify_only, f);
}

// ------------------------------------------------------------------------------ entry points
// One set per ISA build; sparse_cpu.cpp picks the set at run time (cpuid) and binds it.
inline void run_digit_hist(const In& in, int dt, const std::vector<int64_t>& qmodel, const std::vector<int64_t>& prefix,
                           int shift, int nbits, int high_shift, bool has_prefix, int64_t* hist) {
    dispatch_dt(dt, [&](auto tag) {
        digit_hist<decltype(tag)::value>(in, qmodel, prefix, shift, nbits, high_shift, has_prefix, hist);
    });
}

inline void run_select(const In& in, int dt, const std::vector<int64_t>& qmodel, const std::vector<int64_t>& ks,
                       int64_t* res, int64_t* ties) {
    dispatch_dt(dt, [&](auto tag) { select_keys<decltype(tag)::value>(in, qmodel, ks, res, ties); });
}

inline void run_tie_counts(const In& in, int dt, const std::vector<int64_t>& qmodel, const std::vector<int64_t>& qkey,
                           int64_t* out) {
    dispatch_dt(dt, [&](auto tag) { tie_counts<decltype(tag)::value>(in, qmodel, qkey, out); });
}

inline void run_rescale_stats(const In& in, int dt, const Plan& p, int norm, double* out) {
    dispatch_dt(dt, [&](auto tag) { rescale_stats<decltype(tag)::value>(in, p, norm, out); });
}

inline void run_merge(const In& in, void* o, const Plan& p, int dt, const std::vector<float>& weights,
                      const std::vector<float>& scales, float lam, float divisor_nc, bool consensus, bool normalize,
                      bool sparsify_only, bool round16, int32_t* f) {
    if (!round16 || dt == F32) {
        dispatch_dt(dt, [&](auto tag) {
            constexpr int DT = decltype(tag)::value;
            merge_modes<DT, F32>(in, o, p, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only, f);
        });
    } else if (dt == F16) {
        merge_modes<F16, F16>(in, o, p, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only, f);
    } else {
        merge_modes<BF16, BF16>(in, o, p, weights, scales, lam, divisor_nc, consensus, normalize, sparsify_only, f);
    }
}

inline ::wweight_cpu::SparseKernels table(const char* isa) {
    return ::wweight_cpu::SparseKernels{isa, &run_digit_hist, &run_tie_counts, &run_rescale_stats, &run_merge, &run_select};
}

}  // namespace sparse_cpu
