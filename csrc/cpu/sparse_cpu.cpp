// CPU (OpenMP) kernels of the sparse family: the four primitives of wweight/sparse/plan.py
// (digit_hist, tie_counts, rescale_stats, merge) over raw host pointers. One pass per
// primitive, no temporaries: the torch path needs a dozen chunked ops (and K deltas per chunk)
// for the same work. Element logic is shared with the CUDA kernels (csrc/sparse_elem.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../sparse_elem.h"

namespace py = pybind11;
using namespace wweight::elem;

namespace {

constexpr int64_t BLOCK = kBlock;  // tie offsets are per block (csrc/sparse_elem.h)

struct In {
    std::vector<const void*> xs;
    const void* base;
    int64_t n;
};

In make_in(const std::vector<uintptr_t>& xs, uintptr_t base, int64_t n) {
    In in;
    for (auto p : xs) in.xs.push_back(reinterpret_cast<const void*>(p));
    in.base = reinterpret_cast<const void*>(base);
    in.n = n;
    return in;
}

template <int DT>
inline float delta(const In& in, int64_t t, int64_t i) {
    float x = load_f32<DT>(in.xs[t], i);
    return in.base ? rnd<DT>(x - load_f32<DT>(in.base, i)) : x;
}

struct Plan {
    int mode;
    const int64_t* kp;      // (K, 6)
    const int64_t* ties;    // (K, 2, nblocks) or null
    int64_t nblocks;
    std::vector<float> density;
    uint64_t seed;
    uint32_t stream0;
    Window window(int64_t t) const {
        const int64_t* r = kp + 6 * t;
        return Window{r[0], r[1], r[2], r[3], r[4], r[5]};
    }
};

// Walks one BLOCK of model t, calling f(i, d, keep) with stable tie ranks and Philox uniforms.
template <int DT, typename F>
inline void walk_block(const In& in, const Plan& p, int64_t t, int64_t blk, F&& f) {
    const int64_t s = blk * BLOCK, e = std::min(in.n, s + BLOCK);
    Window w{};
    int64_t r_lo = 0, r_hi = 0;
    if (p.mode == MODE_WINDOW) {
        w = p.window(t);
        if (p.ties) {
            r_lo = p.ties[(t * 2 + 0) * p.nblocks + blk];
            r_hi = p.ties[(t * 2 + 1) * p.nblocks + blk];
        }
    }
    float u[4] = {0, 0, 0, 0};
    for (int64_t i = s; i < e; ++i) {
        float d = delta<DT>(in, t, i);
        bool keep = true;
        if (p.mode == MODE_WINDOW) {
            int64_t key = key_of<DT>(d);
            keep = window_keep(w, key, p.ties ? r_lo : 0, p.ties ? r_hi : 0);
            r_lo += key == w.key_lo;
            r_hi += key == w.key_hi;
        } else if (p.mode == MODE_RANDOM) {
            if ((i & 3) == 0 || i == s) uniform4(i >> 2, p.seed, p.stream0 + uint32_t(t), u);
            keep = u[i & 3] < p.density[t];
        }
        f(i, d, keep);
    }
}

Plan make_plan(int mode, uintptr_t kp, uintptr_t ties, int64_t nblocks, std::vector<float> density,
               uint64_t seed, uint32_t stream0) {
    return Plan{mode, reinterpret_cast<const int64_t*>(kp), reinterpret_cast<const int64_t*>(ties), nblocks,
                std::move(density), seed, stream0};
}

void digit_hist(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, std::vector<int64_t> qmodel,
                std::vector<int64_t> prefix, int shift, int nbits, int high_shift, bool has_prefix, uintptr_t out) {
    In in = make_in(xs, base, n);
    const int64_t Q = int64_t(qmodel.size()), NB = int64_t(1) << nbits, mask = NB - 1;
    int64_t* hist = reinterpret_cast<int64_t*>(out);
    py::gil_scoped_release nogil;
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
#pragma omp parallel
        {
            std::vector<int64_t> local(Q * NB, 0);
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < (n + BLOCK - 1) / BLOCK; ++blk) {
                const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
                for (int64_t q = 0; q < Q; ++q) {
                    const int64_t t = qmodel[q], pre = prefix[q] >> high_shift;
                    int64_t* h = local.data() + q * NB;
                    for (int64_t i = s; i < e; ++i) {
                        int64_t key = key_of<DT>(delta<DT>(in, t, i));
                        if (has_prefix && (key >> high_shift) != pre) continue;
                        h[(key >> shift) & mask]++;
                    }
                }
            }
#pragma omp critical
            for (int64_t j = 0; j < Q * NB; ++j) hist[j] += local[j];
        }
    });
}

void tie_counts(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, std::vector<int64_t> qmodel,
                std::vector<int64_t> qkey, uintptr_t out) {
    In in = make_in(xs, base, n);
    const int64_t nblocks = (n + BLOCK - 1) / BLOCK, Q = int64_t(qmodel.size());
    int64_t* o = reinterpret_cast<int64_t*>(out);
    py::gil_scoped_release nogil;
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
#pragma omp parallel for schedule(static) collapse(2)
        for (int64_t q = 0; q < Q; ++q)
            for (int64_t blk = 0; blk < nblocks; ++blk) {
                const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
                int64_t c = 0;
                for (int64_t i = s; i < e; ++i) c += key_of<DT>(delta<DT>(in, qmodel[q], i)) == qkey[q];
                o[q * nblocks + blk] = c;
            }
    });
}

void rescale_stats(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, int mode, uintptr_t kp,
                   uintptr_t ties, std::vector<float> density, uint64_t seed, uint32_t stream0, int norm,
                   uintptr_t out) {
    In in = make_in(xs, base, n);
    const int64_t nblocks = (n + BLOCK - 1) / BLOCK, K = int64_t(xs.size());
    Plan p = make_plan(mode, kp, ties, nblocks, density, seed, stream0);
    double* o = reinterpret_cast<double*>(out);
    py::gil_scoped_release nogil;
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        for (int64_t t = 0; t < K; ++t) {
            // per-thread partials summed in thread order: deterministic for a given thread count
            std::vector<double> pb(omp_get_max_threads(), 0.0), pa(omp_get_max_threads(), 0.0);
#pragma omp parallel
            {
                double lb = 0, la = 0;
#pragma omp for schedule(static)
                for (int64_t blk = 0; blk < nblocks; ++blk) {
                    // fp32 per block (like the GPU kernels), fp64 across blocks
                    float b = 0.f, a = 0.f;
                    walk_block<DT>(in, p, t, blk, [&](int64_t, float d, bool keep) {
                        float v = std::fabs(d);
                        if (norm == 1) { b += v; a += keep ? v : 0.f; }
                        else if (norm == 2) { b += v * v; a += keep ? v * v : 0.f; }
                        else { b = std::max(b, v); a = std::max(a, keep ? v : 0.f); }
                    });
                    if (norm == 3) { lb = std::max(lb, double(b)); la = std::max(la, double(a)); }
                    else { lb += b; la += a; }
                }
                pb[omp_get_thread_num()] = lb;
                pa[omp_get_thread_num()] = la;
            }
            double before = 0, after = 0;
            for (size_t j = 0; j < pb.size(); ++j) {
                if (norm == 3) { before = std::max(before, pb[j]); after = std::max(after, pa[j]); }
                else { before += pb[j]; after += pa[j]; }
            }
            o[2 * t] = before;
            o[2 * t + 1] = after;
        }
    });
}

// Tiles of TILE consecutive elements: for each model the tile is loaded, masked and accumulated
// in short fixed-stride loops the compiler vectorises; per-element state lives in small arrays.
// Tie ranks (sequential by definition) are the only scalar loop.
constexpr int TILE = 64;

template <int DT, int RD, int MODE, bool TIES, bool CONSENSUS>
void merge_impl(const In& in, void* out, const Plan& p, const std::vector<float>& weights,
                const std::vector<float>& scales, float lam, float divisor_nc, bool normalize,
                bool sparsify_only, int32_t* flags) {
    const int64_t K = int64_t(in.xs.size()), n = in.n, nblocks = (n + BLOCK - 1) / BLOCK;
    const bool apply_lambda = lam != 1.f;
    const void* const* xs = in.xs.data();
    const float* wt = weights.data();
    const float* sc = scales.data();
    const bool has_base = in.base != nullptr;
#pragma omp parallel
    {
        std::vector<Window> win(K);
        std::vector<int64_t> r_lo(K), r_hi(K);
        std::vector<int32_t> bad(K + 1, 0);
        alignas(64) float b[TILE], d[TILE], u[TILE], total[TILE], pos[TILE], neg[TILE], wpos[TILE], wneg[TILE];
        for (int64_t t = 0; t < K; ++t) win[t] = MODE == MODE_WINDOW ? p.window(t) : Window{};
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
            if (TIES)
                for (int64_t t = 0; t < K; ++t) {
                    r_lo[t] = p.ties[(t * 2 + 0) * p.nblocks + blk];
                    r_hi[t] = p.ties[(t * 2 + 1) * p.nblocks + blk];
                }
            for (int64_t i0 = s; i0 < e; i0 += TILE) {
                const int m = int(std::min<int64_t>(TILE, e - i0));
                int32_t badb = 0;
                for (int j = 0; j < m; ++j) {
                    b[j] = has_base ? load_f32<DT>(in.base, i0 + j) : 0.f;
                    badb |= !finite(b[j]);
                    total[j] = pos[j] = neg[j] = wpos[j] = wneg[j] = 0.f;
                }
                bad[K] |= badb;
                for (int64_t t = 0; t < K; ++t) {
                    const void* x = xs[t];
                    int32_t badx = 0;
                    for (int j = 0; j < m; ++j) {
                        const float v = load_f32<DT>(x, i0 + j);
                        badx |= !finite(v);
                        d[j] = has_base ? rnd<DT>(v - b[j]) : v;
                    }
                    bad[t] |= badx;
                    if (MODE == MODE_WINDOW) {
                        const Window w = win[t];
                        const float st = sc[t];
                        if (TIES) {
                            int64_t rl = r_lo[t], rh = r_hi[t];
                            for (int j = 0; j < m; ++j) {
                                const int64_t key = key_of<DT>(d[j]);
                                const bool keep = window_keep(w, key, rl, rh);
                                rl += key == w.key_lo;
                                rh += key == w.key_hi;
                                d[j] = rnd<RD>((keep ? d[j] : 0.f) * st);
                            }
                            r_lo[t] = rl;
                            r_hi[t] = rh;
                        } else {
                            for (int j = 0; j < m; ++j) {
                                const bool keep = window_keep(w, key_of<DT>(d[j]), 0, 0);
                                d[j] = rnd<RD>((keep ? d[j] : 0.f) * st);
                            }
                        }
                    } else if (MODE == MODE_RANDOM) {
                        // i0 is a multiple of 4: one Philox call per 4 elements
                        for (int j = 0; j < m; j += 4) uniform4((i0 + j) >> 2, p.seed, p.stream0 + uint32_t(t), &u[j]);
                        const float dens = p.density[t], st = sc[t];
                        for (int j = 0; j < m; ++j) d[j] = rnd<RD>((u[j] < dens ? d[j] : 0.f) * st);
                    }
                    if (sparsify_only) {
                        for (int j = 0; j < m; ++j) total[j] = d[j];
                        continue;
                    }
                    const float w = wt[t];
                    for (int j = 0; j < m; ++j) {
                        const float wd = rnd<RD>(d[j] * w);
                        total[j] += wd;
                        if (CONSENSUS) {
                            // bit masks, not selects: GCC turns `c ? a : 0` into branches here and the sign of
                            // wd is a coin flip (10x slower). Adding +0 leaves every sum exact.
                            const uint32_t mp = 0u - uint32_t(wd > 0.f), mn = 0u - uint32_t(wd < 0.f);
                            const uint32_t bw = f32_bits(wd), bww = f32_bits(w);
                            pos[j] += bits_f32(bw & mp);
                            neg[j] += bits_f32(bw & mn);
                            wpos[j] += bits_f32(bww & mp);
                            wneg[j] += bits_f32(bww & mn);
                        }
                    }
                }
                for (int j = 0; j < m; ++j) {
                    float v;
                    if (sparsify_only) {
                        v = total[j];
                    } else {
                        MergeAcc acc;
                        acc.total = total[j];
                        acc.pos = pos[j];
                        acc.neg = neg[j];
                        acc.wpos = wpos[j];
                        acc.wneg = wneg[j];
                        v = finish<RD>(acc, b[j], CONSENSUS, normalize, apply_lambda, lam, divisor_nc);
                    }
                    store_f32<DT>(out, i0 + j, v);
                }
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

void merge(std::vector<uintptr_t> xs, uintptr_t base, uintptr_t out, int dt, int64_t n, int mode, uintptr_t kp,
           uintptr_t ties, std::vector<float> density, uint64_t seed, uint32_t stream0, std::vector<float> weights,
           std::vector<float> scales, float lam, float divisor_nc, bool consensus, bool normalize,
           bool sparsify_only, bool round16, uintptr_t flags) {
    In in = make_in(xs, base, n);
    Plan p = make_plan(mode, kp, ties, (n + BLOCK - 1) / BLOCK, density, seed, stream0);
    int32_t* f = reinterpret_cast<int32_t*>(flags);
    void* o = reinterpret_cast<void*>(out);
    py::gil_scoped_release nogil;
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

// Philox uniforms for flat indices [start, start + n) of stream s (tests compare with the torch stream).
void philox_uniform(uint64_t seed, uint32_t stream, int64_t start, int64_t n, uintptr_t out) {
    float* o = reinterpret_cast<float*>(out);
    for (int64_t i = 0; i < n; ++i) {
        float u[4];
        int64_t idx = start + i;
        uniform4(idx >> 2, seed, stream, u);
        o[i] = u[idx & 3];
    }
}

}  // namespace

void register_sparse_cpu(py::module_& m) {
    m.def("sparse_digit_hist", &digit_hist);
    m.def("sparse_tie_counts", &tie_counts);
    m.def("sparse_rescale_stats", &rescale_stats);
    m.def("sparse_merge", &merge);
    m.def("philox_uniform", &philox_uniform);
}
