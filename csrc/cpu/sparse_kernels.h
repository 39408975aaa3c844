// The sparse family's CPU kernels (no pybind11): included three times, by sparse_cpu.cpp for the
// baseline x86-64 / aarch64 target, by sparse_cpu_avx2.cpp compiled with -mavx2 and by
// sparse_cpu_avx512.cpp with AVX-512, each time inside its own namespace (ww_base, ww_avx2,
// ww_avx512) so the builds never share an out-of-line symbol. This file holds rescale_stats, merge
// and the entry-point table; sparse_tiles.h the tile helpers and masks, sparse_select.h the
// selection kernels.
// All are the same source, so all give the same bits: no FMA contraction (-ffp-contract=off,
// setup.py) and only IEEE add/mul/div, whose vector forms round exactly like the scalar ones.
//
// Layout of every pass: a thread owns whole blocks of BLOCK elements; inside a block it works on
// tiles of TILE elements, model by model. Per tile and model the delta, its magnitude key and the
// keep mask are computed in straight-line loops over small arrays (vectorised by the compiler);
// the stable-sort tie ranks, sequential by definition, are only walked lane by lane in a tile that
// a keep window's edge falls into (see Masker::keep).
//
// Expects <omp.h>, <algorithm>, <cstdint>, <cstring>, <stdexcept>, <string>, <type_traits>,
// <vector>, <cmath>, <functional> and "sparse_args.h" to be included before the enclosing namespace opens.
#include "sparse_select.h"   // sparse_tiles.h, then the select kernels
#include "sparse_merge16.h"  // the AVX-512 build's register-resident merge
#include "sparse_stats16.h"  // the AVX-512 build's lane-parallel DARE statistics

namespace sparse_cpu {

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
        // this thread's blocks under a static schedule: the partition (and so the order of the
        // float64 sums) that the bits depend on, whichever loop below walks them
        int64_t lo = 0, hi = 0;
        bool first = true;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            if (first) lo = blk;
            first = false;
            hi = blk + 1;
        }
        int64_t blk = lo;
#if WW_AVX512
        if (MODE == MODE_RANDOM && norm != 3) {   // whole groups of 16 full blocks, lane-parallel
            std::vector<Stats16Scratch> s16(1);
            for (; blk + SG <= hi && (blk + SG) * BLOCK <= n; blk += SG)
                stats_group16<DT>(in, p, norm, mk, blk, lb.data(), la.data(), s16[0]);
        }
#endif
        for (; blk < hi; ++blk) {
            const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
            mk.start_block(blk);
            std::fill(fb.begin(), fb.end(), 0.f);
            std::fill(fa.begin(), fa.end(), 0.f);
            for (int64_t i0 = s; i0 < e; i0 += TILE) {
                const int m = int(std::min<int64_t>(TILE, e - i0));
                if (in.base) prefetch_tile<DT>(in.base, i0, m, n);
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
                        prefetch_tile<DT>(in.xs[t], i0, m, n);
                        delta_tile<DT>(in.xs[t], i0, bt, m, d);
                        if (MODE == MODE_NONE) for (int j = 0; j < m; ++j) keep[j] = 1u;
                        else mk.keep(t, i0, m, d, keep);
                        if (MODE == MODE_RANDOM && p.keep_bits)   // for the merge (SparsePlan::keep_bits)
                            pack_bits(keep, m, p.keep_bits + t * p.words + (i0 >> 5));
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
#if WW_AVX512
    // whole 32-element groups of a tile go through the register-resident form (sparse_merge16.h)
    constexpr bool kFused = fused16_dtype(DT) && fused16_dtype(RD);
    bool finite_ws = true;   // merge_tile16 leaves a dropped lane's product out of the sums: +-0 only if finite
    for (int64_t t = 0; t < K; ++t) finite_ws = finite_ws && std::isfinite(wt[t]) && std::isfinite(sc[t]);
    const bool fused = kFused && !sparsify_only && (MODE != MODE_RANDOM || p.keep_bits) && finite_ws;
#else
    const bool fused = false;
#endif
#pragma omp parallel
    {
        Masker<DT, MODE, TIES> mk(p, K);
        std::vector<int32_t> bad(static_cast<size_t>(K + 1), 0);
        std::vector<uint32_t> badm(static_cast<size_t>(K + 1), 0u);
#if WW_AVX512
        std::vector<TieRun> runs(static_cast<size_t>(2 * K));
        std::vector<TieBlock> blocks(static_cast<size_t>(K), TieBlock{0, 0, false, 0, 0, 0, 0});
#endif
        alignas(64) float b[TILE], d[TILE], total[TILE], pos[TILE], neg[TILE], wpos[TILE], wneg[TILE];
        alignas(64) uint32_t keep[TILE];
        // elements i0 .. i0 + m of a tile in L1 arrays, one step over the tile at a time
        auto tile_loops = [&](int64_t i0, int m) {
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
                    if (MODE == MODE_RANDOM && p.keep_bits)   // the masks rescale_stats drew
                        unpack_bits(p.keep_bits + t * p.words + (i0 >> 5), m, keep);
                    else
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
                return;
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
        };
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
            mk.start_block(blk);
#if WW_AVX512
            if (MODE == MODE_WINDOW && fused)
                for (int64_t t = 0; t < K; ++t)
                    blocks[t] = tie_block<DT, TIES>(p, mk.win[t], mk.lo32[t], mk.hi32[t], t, blk);
#endif
            for (int64_t i0 = s; i0 < e; i0 += TILE) {
                const int m = int(std::min<int64_t>(TILE, e - i0));
                if (has_base) prefetch_tile<DT>(in.base, i0, m, n);
                for (int64_t t = 0; t < K; ++t) prefetch_tile<DT>(in.xs[t], i0, m, n);
                const int m32 = fused ? m & ~31 : 0;
#if WW_AVX512
                if constexpr (kFused)
                    if (m32)
                        merge_tile16<DT, RD, MODE, TIES, CONSENSUS>(in, out, p, mk, wt, sc, lam, divisor_nc, normalize,
                                                                    i0, m32, badm.data(), runs.data(), blocks.data());
#endif
                if (m32 < m) tile_loops(i0 + m32, m - m32);
            }
        }
        for (int64_t t = 0; t <= K; ++t) bad[t] |= int32_t(badm[t] != 0u);
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
