// The AVX-512 build's rescale statistics of DARE's random masks (csrc/cpu/sparse_kernels.h
// rescale_stats_impl), 16 blocks at a time, one block per vector lane.
// The statistics are, per model and block, two float32 sums (of |d| or d^2, before and after the
// mask) in element order: each is a chain of dependent adds that no reassociation may shorten
// (the bits are the contract). rescale_stats_impl runs the 8 chains of 4 models as scalar adds, 4
// cycles per element at 2 adds a cycle, which was ~9 of the 32 ms of the bf16 statistics pass (16M
// x 4; 23 ms with the sums stubbed out, ad hoc). Here 16 consecutive blocks of one thread are
// walked side by side, SUB elements of each at a time: the values of the 16 blocks are made as
// before (delta, Philox keep mask, magnitude) into L1 arrays, a 16 x 16 transpose (64 shuffles)
// turns 16 elements of 16 blocks into 16 vectors whose lane l is block l, and each block's chain
// becomes lane l of one vector add per element: same adds, same order, same bits. The kept sum is
// a masked add (the mask bit of lane l is the element's keep bit): skipping the add of +0 that
// the scalar code makes is exact, since a sum of values >= +0 (or NaN) never holds -0.
// Used for MODE_RANDOM (the Masker keeps no per-block state there; a TIES window's tie ranks run
// through each block in order) on a thread's whole groups of 16 full blocks; the thread's other
// blocks go through the scalar loop, in block order after the groups.
// Included by sparse_kernels.h inside the build's namespace, after sparse_tiles.h.
#pragma once

#if WW_AVX512
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace sparse_cpu {

constexpr int SG = 16;    // blocks per group: one per lane
constexpr int SUB = 128;  // elements of each block per step: 4 models x 16 blocks x 128 floats = 32 KB of L1
static_assert(BLOCK % SUB == 0 && SUB % 32 == 0, "steps must not straddle blocks or keep words");

inline __m512 lo_pd16(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
inline __m512 hi_pd16(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}

// r[k] lane l <- r[l] lane k (4 rounds of 16 two-source shuffles)
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        r[4 * i + 0] = lo_pd16(t[4 * i + 0], t[4 * i + 2]);
        r[4 * i + 1] = hi_pd16(t[4 * i + 0], t[4 * i + 2]);
        r[4 * i + 2] = lo_pd16(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = hi_pd16(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

// Prefetch (to L2) of x[s, s + SUB) of the dtype, clipped to n.
template <int DT>
inline void prefetch_sub(const void* x, int64_t s, int64_t n) {
    constexpr int64_t ES = DT == F32 ? 4 : 2;
    const int64_t e = std::min<int64_t>(n, s + SUB);
    const char* p = static_cast<const char*>(x);
    for (int64_t o = s * ES; o < e * ES; o += 64) __builtin_prefetch(p + o, 0, 2);
}

// Scratch of one thread: per model of a group of <= 4, 16 blocks x SUB values and their keep words
// (transposed: word w of block l at [w][l], so one load gives a vector's 16 lanes).
struct Stats16Scratch {
    alignas(64) float x[4][SG][SUB];
    alignas(64) uint32_t kw[4][SUB / 32][SG];
    alignas(64) float b[SUB], d[SUB];
    alignas(64) uint32_t keep[SUB];
    alignas(64) float fb[SG], fa[SG];
};

// Blocks g0 .. g0 + 15 (all full) of rescale_stats_impl: adds each model's float32 block sums to
// lb[t] / la[t] in block order, and writes the keep bits for the merge (SparsePlan::keep_bits).
template <int DT, typename MK>
void stats_group16(const In& in, const Plan& p, int norm, MK& mk, int64_t g0, double* lb, double* la,
                   Stats16Scratch& s) {
    const int64_t n = in.n, K = int64_t(in.xs.size());
    for (int64_t t0 = 0; t0 < K; t0 += 4) {
        const int g = int(std::min<int64_t>(4, K - t0));
        __m512 B[4], A[4];
        for (int gi = 0; gi < 4; ++gi) B[gi] = A[gi] = _mm512_setzero_ps();
        for (int64_t o = 0; o < BLOCK; o += SUB) {
            for (int l = 0; l < SG; ++l) {
                const int64_t i0 = (g0 + l) * BLOCK + o;
                // the next step of this block, or the next group's first step, 16 steps ahead
                const int64_t nx = o + SUB < BLOCK ? i0 + SUB : (g0 + SG + l) * BLOCK;
                if (in.base) prefetch_sub<DT>(in.base, nx, n);
                const float* bt = in.base ? base_tile<DT>(in.base, i0, SUB, s.b) : nullptr;
                for (int gi = 0; gi < g; ++gi) {
                    const int64_t t = t0 + gi;
                    prefetch_sub<DT>(in.xs[t], nx, n);
                    delta_tile<DT>(in.xs[t], i0, bt, SUB, s.d);
                    mk.keep(t, i0, SUB, s.d, s.keep);
                    uint32_t w[SUB / 32];
                    pack_bits(s.keep, SUB, w);
                    for (int q = 0; q < SUB / 32; ++q) s.kw[gi][q][l] = w[q];
                    if (p.keep_bits) std::memcpy(p.keep_bits + t * p.words + (i0 >> 5), w, sizeof(w));
                    float* xg = s.x[gi][l];
                    for (int j = 0; j < SUB; ++j) {
                        const float v = std::fabs(s.d[j]);
                        xg[j] = norm == 2 ? v * v : v;
                    }
                }
            }
            for (int gi = 0; gi < g; ++gi) {
                for (int j0 = 0; j0 < SUB; j0 += 16) {
                    __m512 r[16];
                    for (int l = 0; l < SG; ++l) r[l] = _mm512_load_ps(s.x[gi][l] + j0);
                    transpose16(r);
                    const __m512i words = _mm512_load_si512(s.kw[gi][j0 / 32]);
                    const int sh = j0 & 31;
                    __m512 b = B[gi], a = A[gi];
                    for (int k = 0; k < 16; ++k) {   // element o + j0 + k of each block, in order
                        const __mmask16 kept = _mm512_test_epi32_mask(words, _mm512_set1_epi32(int(1u << (sh + k))));
                        b = _mm512_add_ps(b, r[k]);
                        a = _mm512_mask_add_ps(a, kept, a, r[k]);
                    }
                    B[gi] = b;
                    A[gi] = a;
                }
            }
        }
        for (int gi = 0; gi < g; ++gi) {
            _mm512_store_ps(s.fb, B[gi]);
            _mm512_store_ps(s.fa, A[gi]);
            for (int l = 0; l < SG; ++l) {   // the float64 sums across blocks, in block order
                lb[t0 + gi] += double(s.fb[l]);
                la[t0 + gi] += double(s.fa[l]);
            }
        }
    }
}

}  // namespace sparse_cpu
#pragma GCC diagnostic pop
#endif
