// The AVX-512 build's merge of a tile (csrc/cpu/sparse_kernels.h merge_impl), 16 elements at a
// time with every accumulator in a register. The tile loops of merge_impl go through L1 arrays:
// each step over the K models loads and stores the delta, the keep mask and the five sums of
// mergekit's sign election (total, pos, neg, wpos, wneg), and the bf16 roundings are separate
// loops (bf16 TIES merge pass, 16M x 4: 26-28 ms there, 19 ms here, 16.7 ms with the masked adds,
// 4-instruction rounding, one-AND keys and one-instruction non-finite test below; DARE 23 -> 15-17
// ms). Here one 16-lane chunk of the output is finished before the next starts: per model one load, the delta, its key
// and keep mask as a k-register, and the sums in zmm registers; then the election, division,
// lambda, base and the store. Same operations in the same order on every element, each product,
// sum and rounding the one of merge_impl (no FMA: -ffp-contract=off), so the same bits; the
// bf16 rounding is mergekit's integer round-to-nearest-even (sparse_elem.h f32_to_bf16), not
// vcvtneps2bf16 (which flushes subnormals). Two products are skipped where they are exact
// identities: (d * 1) for a scale or weight of exactly 1 (d is already rounded to the working
// dtype, so rnd(d * 1) == d for every finite d, signed zeros included; a non-finite input makes
// the op raise, so no output made from one is returned).
// Used for float32 and bfloat16 data (fp16's rounding stays in merge_impl's loops) on whole
// groups of 32 elements, so a DARE keep mask is half of one 32-bit word of the plan's keep_bits.
// Included by sparse_kernels.h inside the build's namespace, after sparse_tiles.h.
#pragma once

#if WW_AVX512
// GCC 12's false -Wmaybe-uninitialized on its own AVX-512 intrinsics (see sparse_tiles.h random_keep_avx512)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace sparse_cpu {

constexpr bool fused16_dtype(int dt) { return dt == F32 || dt == BF16; }

template <int DT>
inline __m512 load16(const void* p, int64_t i) {
    if (DT == F32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// rnd<RD> (csrc/sparse_elem.h) on 16 lanes: identity for float32; bfloat16 keeps the upper half
// of u + 0x7FFF + ((u >> 16) & 1), the integer round to nearest even of f32_to_bf16 (the low bit
// of the upper half as a lane mask: 4 instructions, not 5)
template <int RD>
inline __m512 rnd16(__m512 v) {
    if (RD == F32) return v;
    const __m512i u = _mm512_castps_si512(v);
    const __mmask16 odd = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000));
    __m512i r = _mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF));
    r = _mm512_mask_add_epi32(r, odd, r, _mm512_set1_epi32(1));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u))));
}

inline uint32_t nonfinite16(__m512 v) {
    const __m512i e = _mm512_set1_epi32(0x7F800000);
    return _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), e), e);
}

// NaN or +-inf lanes in one instruction (vfpclassps: QNaN 0x01 | +inf 0x08 | -inf 0x10 | SNaN 0x80),
// the same lanes as nonfinite16
inline __mmask16 nonfinite_class16(__m512 v) { return _mm512_fpclass_ps_mask(v, 0x99); }

// store_tile<DT> (sparse_tiles.h) of 16 lanes
template <int DT>
inline void store16(void* out, int64_t i, __m512 v) {
    if (DT == F32) {
        _mm512_storeu_ps(static_cast<float*>(out) + i, v);
    } else {   // the upper half of the rounded value
        const __m512i r = _mm512_castps_si512(rnd16<BF16>(v));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
}

// keys_tile<DT> of 16 lanes in the key scale of this file: the magnitude bits of the delta. A
// bfloat16 delta is rounded (its low 16 bits are 0), so its key is kept in place, key << 16, one
// AND instead of a shift and an AND; key_scale maps the plan's keys and cuts to that scale.
template <int DT>
inline __m512i key16(__m512 d) {
    const __m512i u = _mm512_castps_si512(d);
    return _mm512_and_si512(u, _mm512_set1_epi32(DT == F32 ? 0x7FFFFFFF : 0x7FFF0000));
}

// A cut c of 16-bit keys in the scale of key16: for every 16-bit key k, k < c, k > c and k == c
// keep their truth values for (k << 16) against key_scale(c). Cuts range over [-2, INT32_MAX]
// (clamp_key, tie_block's lo - 1 and hi + 1); k << 16 is at most 0x7FFF0000.
template <int DT>
inline int32_t key_scale(int32_t c) {
    if (DT == F32) return c;
    return c > 0x7FFF ? INT32_MAX : int32_t(int64_t(c) * 65536);
}

// The stable tie ranks of one model's two cut keys (TIES windows) over a tile: the rank of the next
// element equal to the key, and the next rank at which its keep decision flips (the window's
// start or end). A chunk whose run of equal lanes ends before that edge keeps all of them or none,
// in a few scalar instructions and no unpredictable branch (a 16-bit cut key can be a tenth of all
// elements: most chunks hold some); only the chunk an edge falls into walks its lanes.
struct TieRun {
    int64_t rank, edge;
    uint32_t in;   // 0xFFFF inside the window, else 0
    void set(int64_t r, int64_t a, int64_t b) {
        rank = r;
        edge = r < a ? a : r < b ? b : INT64_MAX;
        in = (r >= a && r < b) ? 0xFFFFu : 0u;
    }
};

// A TIES window's cuts over one block (kBlock elements) of one model. The plan's tie offsets give the
// ranks of a cut key's first and one-past-last element of the block (the next block's offset), so a
// block whose ranks lie wholly inside or outside both windows keeps all its ties or none: then the
// mask is one pair of compares, k > lo - 1 (or k > lo) and k < hi + 1 (or k < hi), and the ranks
// need not be counted. Only blocks that a window edge falls into, and the last block (no next
// offset), count them (TieRun). Every window has at most two edges per cut, so on 16M elements
// (16384 blocks) at most 4 blocks per model count. Needs lo < hi (else the ranges overlap) and a
// hi + 1 that fits (the clamped BIG key). A cut whose window ignores ranks ([0, 0) or [0, BIG),
// plan.py _window) has zero offsets and is one-sided in every block.
struct TieBlock {
    int32_t lo, hi;   // the one-sided bounds (16-bit keys: the plan's scale)
    bool one_side;
    int32_t klo, khi, wlo, whi;   // lo, hi and the Masker's lo32, hi32 of the model in key16's scale
};

template <int DT>
inline TieBlock scaled_block(TieBlock tb, int32_t lo32, int32_t hi32) {
    tb.klo = key_scale<DT>(tb.lo);
    tb.khi = key_scale<DT>(tb.hi);
    tb.wlo = key_scale<DT>(lo32);
    tb.whi = key_scale<DT>(hi32);
    return tb;
}

// blk's TieBlock of model t; a window without ties (Breadcrumbs) is never one-sided: its cut keys
// are kept or dropped by keq_lo / keq_hi
template <int DT, bool TIES>
inline TieBlock tie_block(const Plan& p, const Window& w, int32_t lo32, int32_t hi32, int64_t t, int64_t blk) {
    const TieBlock two{lo32, hi32, false, 0, 0, 0, 0};
    if (!TIES || blk + 1 >= p.nblocks || lo32 >= hi32) return scaled_block<DT>(two, lo32, hi32);
    const int64_t* rl = p.ties + (t * 2 + 0) * p.nblocks + blk;
    const int64_t* rh = p.ties + (t * 2 + 1) * p.nblocks + blk;
    auto side = [](int64_t r0, int64_t r1, int64_t a, int64_t b) { return r1 <= a || r0 >= b || (r0 >= a && r1 <= b); };
    if (!side(rl[0], rl[1], w.a, w.b) || !side(rh[0], rh[1], w.c, w.e)) return scaled_block<DT>(two, lo32, hi32);
    const bool in_lo = rl[0] >= w.a && rl[0] < w.b, in_hi = rh[0] >= w.c && rh[0] < w.e;
    if (in_hi && hi32 == INT32_MAX) return scaled_block<DT>(two, lo32, hi32);
    return scaled_block<DT>(TieBlock{lo32 - int32_t(in_lo), hi32 + int32_t(in_hi), true, 0, 0, 0, 0}, lo32, hi32);
}

// The walk of Masker::keep over the lanes el | eh of one chunk (keys in key), in element order.
inline uint32_t tie_walk16(const Window& w, TieRun& lo, TieRun& hi, uint32_t el, uint32_t eh, const int32_t* key) {
    int64_t rl = lo.rank, rh = hi.rank;
    uint32_t keep = 0, bits = el | eh;
    while (bits) {
        const int j = __builtin_ctz(bits);
        bits &= bits - 1;
        const int64_t k = int64_t(key[j]);
        keep |= uint32_t(window_keep(w, k, rl, rh)) << j;
        rl += k == w.key_lo;
        rh += k == w.key_hi;
    }
    lo.set(rl, w.a, w.b);
    hi.set(rh, w.c, w.e);
    return keep;
}

// The keep bits of one model's 16 keys k (key16's scale) in a window mode (Masker::keep on 16 lanes).
template <int DT, bool TIES, typename M>
inline uint32_t window_keep16(M& mk, int64_t t, __m512i k, TieRun* runs, const TieBlock* blocks) {
    const TieBlock& tb = blocks[t];
    if (TIES && tb.one_side) {   // the block's ties all kept or all dropped: no ranks
        const __m512i lo = _mm512_set1_epi32(tb.klo), hi = _mm512_set1_epi32(tb.khi);
        return _mm512_mask_cmplt_epi32_mask(_mm512_cmpgt_epi32_mask(k, lo), k, hi);
    }
    const __m512i lo = _mm512_set1_epi32(tb.wlo), hi = _mm512_set1_epi32(tb.whi);
    const uint32_t in = _mm512_mask_cmplt_epi32_mask(_mm512_cmpgt_epi32_mask(k, lo), k, hi);
    const uint32_t el = _mm512_cmpeq_epi32_mask(k, lo), eh = _mm512_cmpeq_epi32_mask(k, hi);
    if (!TIES) return in | (mk.keq_lo[t] ? el : 0u) | (mk.keq_hi[t] ? eh : 0u);
    TieRun &lr = runs[2 * t], &hr = runs[2 * t + 1];
    const int64_t rl = lr.rank + __builtin_popcount(el), rh = hr.rank + __builtin_popcount(eh);
    if (rl <= lr.edge && rh <= hr.edge) {   // the chunk's equal lanes end before either edge
        lr.rank = rl;
        hr.rank = rh;
        return in | (el & lr.in) | (eh & hr.in);
    }
    alignas(64) int32_t key[16];   // the plan's scale, as window_keep compares
    _mm512_store_si512(key, DT == F32 ? k : _mm512_srli_epi32(k, 16));
    return in | tie_walk16(mk.win[t], lr, hr, el, eh, key);
}

// Elements i0 .. i0 + m of one tile (m a multiple of 32), in element order per model, so the
// Masker's tie ranks advance exactly as in merge_impl's loops. badm[t] / badm[K]: the OR of the
// non-finite lane masks of model t / the base. DARE (MODE_RANDOM) reads the plan's keep_bits.
// Needs finite weights and scales (merge_impl checks): then a dropped lane's product is +-0, which
// leaves every sum as it is (no sum is ever -0: each starts at +0, and x + y is -0 only when both
// are), so the sums take the kept lanes by masked adds instead of adding masked values.
template <int DT, int RD, int MODE, bool TIES, bool CONSENSUS>
inline void merge_tile16(const In& in, void* out, const Plan& p, Masker<DT, MODE, TIES>& mk, const float* wt,
                         const float* sc, float lam, float divisor_nc, bool normalize, int64_t i0, int m,
                         uint32_t* badm, TieRun* runs, const TieBlock* blocks) {
    const int64_t K = int64_t(in.xs.size());
    if (TIES)   // the Masker's ranks in, at the end out again (merge_impl's loops may take the tile's tail)
        for (int64_t t = 0; t < K; ++t) {
            const Window& w = mk.win[t];
            runs[2 * t].set(mk.r_lo[t], w.a, w.b);
            runs[2 * t + 1].set(mk.r_hi[t], w.c, w.e);
        }
    const bool has_base = in.base != nullptr, apply_lambda = lam != 1.f;
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
    __mmask16 bad = 0;   // any non-finite input lane of the tile; which one is found again below
    for (int j = 0; j < m; j += 16) {
        const int64_t i = i0 + j;
        __m512 b = zero;
        if (has_base) {
            b = load16<DT>(in.base, i);
            bad |= nonfinite_class16(b);
        }
        __m512 total = zero, pos = zero, neg = zero, wpos = zero, wneg = zero;
        for (int64_t t = 0; t < K; ++t) {
            const __m512 v = load16<DT>(in.xs[t], i);
            bad |= nonfinite_class16(v);
            __m512 wd = has_base ? rnd16<DT>(_mm512_sub_ps(v, b)) : v;
            __mmask16 keep = 0xFFFF;
            if (MODE != MODE_NONE) {
                if (MODE == MODE_RANDOM)
                    keep = __mmask16((p.keep_bits[t * p.words + (i >> 5)] >> (i & 31)) & 0xFFFFu);
                else
                    keep = __mmask16(window_keep16<DT, TIES>(mk, t, key16<DT>(wd), runs, blocks));
                // rnd(d * scale) on every lane: a dropped lane's is +-0 and is not added
                if (sc[t] != 1.f) wd = rnd16<RD>(_mm512_mul_ps(wd, _mm512_set1_ps(sc[t])));
            }
            const float w = wt[t];
            const __m512 vw = _mm512_set1_ps(w);
            if (w != 1.f) wd = rnd16<RD>(_mm512_mul_ps(wd, vw));
            total = _mm512_mask_add_ps(total, keep, total, wd);
            if (CONSENSUS) {   // the kept lanes of each sign
                const __mmask16 mp = _mm512_mask_cmp_ps_mask(keep, wd, zero, _CMP_GT_OQ);
                const __mmask16 mn = _mm512_mask_cmp_ps_mask(keep, wd, zero, _CMP_LT_OQ);
                pos = _mm512_mask_add_ps(pos, mp, pos, wd);
                neg = _mm512_mask_add_ps(neg, mn, neg, wd);
                wpos = _mm512_mask_add_ps(wpos, mp, wpos, vw);
                wneg = _mm512_mask_add_ps(wneg, mn, wneg, vw);
            }
        }
        __m512 mixed, div;
        if (CONSENSUS) {   // total >= 0 is false for NaN, as in C++
            const __mmask16 up = _mm512_cmp_ps_mask(total, zero, _CMP_GE_OQ);
            mixed = rnd16<RD>(_mm512_mask_blend_ps(up, neg, pos));
            const __m512 dv = rnd16<RD>(_mm512_mask_blend_ps(up, wneg, wpos));
            div = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(dv, zero, _CMP_EQ_OQ), dv, one);
        } else {
            mixed = rnd16<RD>(total);
            div = _mm512_set1_ps(divisor_nc);
        }
        if (normalize) mixed = rnd16<RD>(_mm512_div_ps(mixed, div));
        if (apply_lambda) mixed = rnd16<RD>(_mm512_mul_ps(mixed, _mm512_set1_ps(lam)));
        store16<DT>(out, i, _mm512_add_ps(b, mixed));   // b is +0 without a base: 0.f + mixed
    }
    if (bad)   // rare: which inputs hold the non-finite lanes
        for (int j = 0; j < m; j += 16) {
            if (has_base) badm[K] |= nonfinite16(load16<DT>(in.base, i0 + j));
            for (int64_t t = 0; t < K; ++t) badm[t] |= nonfinite16(load16<DT>(in.xs[t], i0 + j));
        }
    if (TIES)
        for (int64_t t = 0; t < K; ++t) {
            mk.r_lo[t] = runs[2 * t].rank;
            mk.r_hi[t] = runs[2 * t + 1].rank;
        }
}

}  // namespace sparse_cpu
#pragma GCC diagnostic pop
#endif
