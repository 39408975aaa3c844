// Fused DELLA (Deep et al. 2024; mergekit 0.1.5's della_magprune + GeneralizedTaskArithmeticMerge) on
// the CPU, OpenMP over rows. Two passes over the inputs, never a full-size float temporary:
//
//  1. della_masks: per row (ranked along dim 1, as the reference) and model, the stable magnitude
//     rank of every element by an LSD radix sort of (key, index) pairs (2 passes of 8/7 bits for
//     16-bit keys, 3 of 11/11/9 bits for fp32; an O(m^2) count for rows of <= 64), its keep
//     probability and the Philox draw -> one keep bit per element and model (K * n / 8 bytes), the
//     rescale norms per fixed group of rows (compensated float64 sums; thread-count independent),
//     and the NaN/Inf flags;
//  2. della_merge: deltas, keep bits, rescale, weights, TIES sign election, normalisation and
//     lambda per element (the arithmetic of sparse_cpu.cpp's merge), writing only the output.
//
// Element logic: csrc/della_elem.h (shared with a future CUDA kernel) and csrc/sparse_elem.h.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../della_elem.h"

namespace py = pybind11;
using namespace wweight::elem;

namespace {

// The work dtype of the DELLA arithmetic: mergekit upcasts fp16 to fp32, keeps bf16.
template <int DT> struct WorkDT { static constexpr int value = DT == BF16 ? BF16 : F32; };

struct Geometry {
    int64_t n, outer, m, inner;   // the tensor as (outer, m, inner); rows of m elements, stride inner
    int64_t lines() const { return outer * inner; }
    int64_t start(int64_t line) const { return (line / inner) * m * inner + line % inner; }
};

// Stable ascending positions of the m keys: pos[j] = rank (0-based) of element j.
struct Ranker {
    std::vector<uint64_t> a, b;
    std::vector<int64_t> idx;
    std::vector<int64_t> hist;

    void rank(const uint32_t* key, int64_t m, int key_bits, int64_t* pos) {
        if (m <= 64) {   // small rows: count smaller keys and equal keys at lower indices
            for (int64_t j = 0; j < m; ++j) {
                int64_t r = 0;
                const uint32_t kj = key[j];
                for (int64_t i = 0; i < m; ++i) r += (key[i] < kj) | ((key[i] == kj) & (i < j));
                pos[j] = r;
            }
            return;
        }
        if (m >= (int64_t(1) << 32)) {   // indices do not fit the packed pairs: a stable sort
            idx.resize(m);
            for (int64_t j = 0; j < m; ++j) idx[j] = j;
            std::stable_sort(idx.begin(), idx.end(), [&](int64_t x, int64_t y) { return key[x] < key[y]; });
            for (int64_t r = 0; r < m; ++r) pos[idx[r]] = r;
            return;
        }
        // LSD radix sort of (key << 32 | index): each pass is stable, so equal keys stay in index order
        static const int d16[][2] = {{0, 8}, {8, 7}};
        static const int d32[][2] = {{0, 11}, {11, 11}, {22, 9}};
        const int (*digits)[2] = key_bits == 15 ? d16 : d32;
        const int npass = key_bits == 15 ? 2 : 3;
        a.resize(m);
        b.resize(m);
        hist.assign(3 << 11, 0);   // every digit's histogram in one read (a pass does not change them)
        int64_t* h[3] = {hist.data(), hist.data() + 2048, hist.data() + 4096};
        for (int64_t j = 0; j < m; ++j) {
            const uint64_t k = key[j];
            a[j] = (k << 32) | uint64_t(j);
            for (int p = 0; p < npass; ++p) h[p][(k >> digits[p][0]) & ((1u << digits[p][1]) - 1)]++;
        }
        for (int p = 0; p < npass; ++p) {
            const int shift = 32 + digits[p][0], nb = 1 << digits[p][1];
            const uint64_t mask = uint64_t(nb - 1);
            int64_t* hp = h[p];
            if (hp[(a[0] >> shift) & mask] == m) continue;   // one digit value: the order stays
            int64_t acc = 0;
            for (int i = 0; i < nb; ++i) {
                const int64_t c = hp[i];
                hp[i] = acc;
                acc += c;
            }
            for (int64_t j = 0; j < m; ++j) b[hp[(a[j] >> shift) & mask]++] = a[j];
            a.swap(b);
        }
        for (int64_t r = 0; r < m; ++r) pos[a[r] & 0xFFFFFFFFu] = r;
    }
};

struct Scratch {   // per thread, sized on its first row (a thread without rows allocates nothing)
    std::vector<float> b, d, kv;
    std::vector<uint32_t> key;
    std::vector<int64_t> pos;
    Ranker ranker;
    void resize(int64_t m) {
        if (int64_t(b.size()) >= m) return;
        b.resize(m);
        d.resize(m);
        kv.resize(m);
        key.resize(m);
        pos.resize(m);
    }
};

constexpr int64_t kSumSpan = 4096;          // elements of a row per plain float64 partial of the norms
constexpr int64_t kMaxTable = int64_t(1) << 20;   // rows up to this long get a probability table

// The norms of one span of a row (|d| before, |d * keep| after): four plain float64 lanes (no serial
// dependency per element, still far below float32 rounding), then compensated across spans and rows.
template <int norm>
inline void span_norms(const float* d, const float* kv, int64_t n, CompSum& before, CompSum& after, double& maxb,
                       double& maxa) {
    if (norm == 3) {
        double x = maxb, y = maxa;
        for (int64_t j = 0; j < n; ++j) {
            x = std::max(x, std::fabs(double(d[j])));
            y = std::max(y, std::fabs(double(kv[j])));
        }
        maxb = x;
        maxa = y;
        return;
    }
    double b[4] = {0, 0, 0, 0}, a[4] = {0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int r = 0; r < 4; ++r) {
            const double v = std::fabs(double(d[j + r])), k = std::fabs(double(kv[j + r]));
            b[r] += norm == 2 ? v * v : v;
            a[r] += norm == 2 ? k * k : k;
        }
    for (; j < n; ++j) {
        const double v = std::fabs(double(d[j])), k = std::fabs(double(kv[j]));
        b[0] += norm == 2 ? v * v : v;
        a[0] += norm == 2 ? k * k : k;
    }
    before.add((b[0] + b[1]) + (b[2] + b[3]));
    after.add((a[0] + a[1]) + (a[2] + a[3]));
}

template <int DT, int norm>
void masks_impl(const std::vector<const void*>& xs, const void* base, const Geometry& g,
                const std::vector<int>& modes, const std::vector<float>& base_p, const std::vector<float>& eps,
                uint64_t seed, uint32_t stream0, int64_t group, uint64_t* bits, double* stats,
                int32_t* flags) {
    constexpr int WD = WorkDT<DT>::value;
    const int64_t K = int64_t(xs.size()), L = g.lines(), m = g.m, stride = g.inner;
    const int64_t nwords = (g.n + 63) / 64, nchunks = (L + group - 1) / group;
    const int key_bits = DT == F32 ? 31 : 15;
    std::vector<DellaRow> rows(K);
    for (int64_t t = 0; t < K; ++t) rows[t] = della_row<WD>(m, base_p[t], eps[t]);
    // the keep probability depends on the row position only: one table per model for every row
    std::vector<float> prob_tab;
    if (m <= kMaxTable) {
        prob_tab.resize(K * m);
        for (int64_t t = 0; t < K; ++t)
            for (int64_t r = 0; r < m; ++r) prob_tab[t * m + r] = della_prob<WD>(rows[t], r);
    }
#pragma omp parallel
    {
        Scratch s;
        std::vector<int32_t> bad(K + 1, 0);
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunks; ++c) {
            std::vector<CompSum> before(K), after(K);
            std::vector<double> maxb(K, 0.0), maxa(K, 0.0);
            s.resize(m);
            for (int64_t line = c * group; line < std::min(L, (c + 1) * group); ++line) {
                const int64_t s0 = g.start(line);
                int32_t badb = 0;
                for (int64_t j = 0; j < m; ++j) {
                    s.b[j] = base ? load_f32<DT>(base, s0 + j * stride) : 0.f;
                    badb |= !finite(s.b[j]);
                }
                bad[K] |= badb;
                for (int64_t t = 0; t < K; ++t) {
                    int32_t badx = 0;
                    for (int64_t j = 0; j < m; ++j) {
                        const float v = load_f32<DT>(xs[t], s0 + j * stride);
                        badx |= !finite(v);
                        s.d[j] = base ? rnd<DT>(v - s.b[j]) : v;
                    }
                    bad[t] |= badx;
                    if (modes[t] != DELLA_SAMPLE) continue;
                    for (int64_t j = 0; j < m; ++j) s.key[j] = key_of<DT>(s.d[j]);
                    s.ranker.rank(s.key.data(), m, key_bits, s.pos.data());
                    const DellaRow row = rows[t];
                    const float* ptab = prob_tab.empty() ? nullptr : prob_tab.data() + t * m;
                    uint64_t* tb = bits + t * nwords;
                    int64_t w_cur = -1;
                    uint64_t w_val = 0;
                    // Philox uniforms of the row's flat indices, in index order (one call per 4 indices)
                    int64_t q_last = -1;
                    float u4[4] = {0, 0, 0, 0};
                    for (int64_t j0 = 0; j0 < m; j0 += kSumSpan) {
                        const int64_t j1 = std::min(m, j0 + kSumSpan);
                        for (int64_t j = j0; j < j1; ++j) {
                            const float p = ptab ? ptab[s.pos[j]] : della_prob<WD>(row, s.pos[j]);
                            const int64_t gi = s0 + j * stride, w = gi >> 6;
                            if ((gi >> 2) != q_last) {
                                q_last = gi >> 2;
                                uniform4(q_last, seed, stream0 + uint32_t(t), u4);
                            }
                            const bool keep = u4[gi & 3] < p;
                            // a bit mask, not a select: GCC branches on `keep ? d : 0` and keep is a coin flip
                            if (norm) s.kv[j] = bits_f32(f32_bits(s.d[j]) & (0u - uint32_t(keep)));
                            if (w != w_cur) {
                                // rows share boundary words with their neighbours (other threads)
                                if (w_val) __atomic_fetch_or(tb + w_cur, w_val, __ATOMIC_RELAXED);
                                w_cur = w;
                                w_val = 0;
                            }
                            w_val |= uint64_t(keep) << (gi & 63);
                        }
                        if (norm)
                            span_norms<norm>(s.d.data() + j0, s.kv.data() + j0, j1 - j0, before[t], after[t], maxb[t],
                                             maxa[t]);
                    }
                    if (w_val) __atomic_fetch_or(tb + w_cur, w_val, __ATOMIC_RELAXED);
                }
            }
            for (int64_t t = 0; t < K; ++t) {
                double* o = stats + (t * nchunks + c) * 4;
                if (norm == 3) {
                    o[0] = maxb[t]; o[1] = 0.0; o[2] = maxa[t]; o[3] = 0.0;
                } else {
                    o[0] = before[t].s; o[1] = before[t].c; o[2] = after[t].s; o[3] = after[t].c;
                }
            }
        }
#pragma omp critical
        for (int64_t t = 0; t <= K; ++t) flags[t] |= bad[t];
    }
}

void della_masks(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, int64_t outer, int64_t m,
                 int64_t inner, std::vector<int> modes, std::vector<float> base_p, std::vector<float> eps,
                 uint64_t seed, uint32_t stream0, int norm, int64_t group, uintptr_t bits, uintptr_t stats,
                 uintptr_t flags) {
    const size_t K = xs.size();
    if (modes.size() != K || base_p.size() != K || eps.size() != K)
        throw std::invalid_argument("della_masks: modes, base_p and eps need one entry per model");
    if (n != outer * m * inner || m <= 0 || group <= 0)
        throw std::invalid_argument("della_masks: n must be outer * m * inner with m, group > 0");
    std::vector<const void*> x;
    for (auto p : xs) x.push_back(reinterpret_cast<const void*>(p));
    Geometry g{n, outer, m, inner};
    py::gil_scoped_release nogil;
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        auto run = [&](auto nt) {   // the norm as a template argument: no branch per element
            masks_impl<DT, decltype(nt)::value>(x, reinterpret_cast<const void*>(base), g, modes, base_p, eps, seed,
                                                stream0, group, reinterpret_cast<uint64_t*>(bits),
                                                reinterpret_cast<double*>(stats), reinterpret_cast<int32_t*>(flags));
        };
        switch (norm) {
            case 0: run(std::integral_constant<int, 0>{}); break;
            case 1: run(std::integral_constant<int, 1>{}); break;
            case 2: run(std::integral_constant<int, 2>{}); break;
            case 3: run(std::integral_constant<int, 3>{}); break;
            default: throw std::invalid_argument("della_masks: norm must be 0 (none), 1 (l1), 2 (l2) or 3 (linf)");
        }
    });
}

constexpr int64_t BLOCK = 1024;
constexpr int TILE = 64;

// The sums over the K models follow torch's order for the reference's `(K, n).sum(dim=0)` on CPU
// (aten/src/ATen/native/cpu/SumKernel.cpp, vectorized_outer_sum): output columns below `seq_end`
// (whole multiples of the 4-vector block; the host probes torch for it) add the K rows in order;
// the others go through row_sum, which splits the rows into 4 interleaved partial sums (row k into
// partial k % 4 for k < 4 * (K / 4), the rest into partial 0) and adds ((p0 + p1) + p2) + p3. For
// K <= 4 both orders are the same; the host sends K >= 16 (torch's cascade levels) to the reference.
constexpr int NP = 4;

template <int DT, bool CONSENSUS>
void merge_impl(const std::vector<const void*>& xs, const void* base, void* out, int64_t n, int64_t seq_end,
                const std::vector<int>& modes, const std::vector<int>& has_scale, const std::vector<float>& scales,
                const uint64_t* bits, const std::vector<float>& weights, float lam, float divisor_nc,
                bool normalize, bool sparsify_only) {
    constexpr int WD = WorkDT<DT>::value;
    const int64_t K = int64_t(xs.size()), nblocks = (n + BLOCK - 1) / BLOCK, nwords = (n + 63) / 64;
    const int64_t K4 = 4 * (K / 4);
    const bool apply_lambda = lam != 1.f;
#pragma omp parallel
    {
        alignas(64) float b[TILE], d[TILE];
        alignas(64) float total[NP][TILE], pos[NP][TILE], neg[NP][TILE], wpos[NP][TILE], wneg[NP][TILE];
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t s = blk * BLOCK, e = std::min(n, s + BLOCK);
            for (int64_t i0 = s; i0 < e; i0 += TILE) {   // i0 is a multiple of 64: one bit word per tile
                const int mt = int(std::min<int64_t>(TILE, e - i0));
                // elements [0, split) of the tile add in order, [split, mt) in row_sum's partials
                const int split = int(std::max<int64_t>(0, std::min<int64_t>(mt, seq_end - i0)));
                for (int j = 0; j < mt; ++j) b[j] = base ? load_f32<DT>(base, i0 + j) : 0.f;
                for (int g = 0; g < NP; ++g)
                    for (int j = 0; j < mt; ++j) total[g][j] = pos[g][j] = neg[g][j] = wpos[g][j] = wneg[g][j] = 0.f;
                for (int64_t t = 0; t < K; ++t) {
                    const void* x = xs[t];
                    for (int j = 0; j < mt; ++j) {
                        const float v = load_f32<DT>(x, i0 + j);
                        d[j] = base ? rnd<DT>(v - b[j]) : v;
                    }
                    if (modes[t] == DELLA_ZERO) {
                        for (int j = 0; j < mt; ++j) d[j] = 0.f;   // torch.zeros_like: +0
                    } else if (modes[t] == DELLA_SAMPLE) {
                        const uint64_t word = bits[t * nwords + (i0 >> 6)];
                        const bool hs = has_scale[t] != 0;
                        const float sc = scales[t];
                        for (int j = 0; j < mt; ++j) d[j] = della_apply<DT, WD>(d[j], (word >> j) & 1u, hs, sc);
                    }
                    if (sparsify_only) {
                        for (int j = 0; j < mt; ++j) total[0][j] = d[j];
                        continue;
                    }
                    const float w = weights[t];
                    const int gtail = t < K4 ? int(t % NP) : 0;
                    for (int part = 0; part < 2; ++part) {
                        const int jlo = part ? split : 0, jhi = part ? mt : split, g = part ? gtail : 0;
                        float *tot = total[g], *ps = pos[g], *ng = neg[g], *wp = wpos[g], *wn = wneg[g];
                        for (int j = jlo; j < jhi; ++j) {
                            const float wd = rnd<DT>(d[j] * w);
                            tot[j] += wd;
                            if (CONSENSUS) {   // bit masks, not branches (see sparse_cpu.cpp merge_impl)
                                const uint32_t mp = 0u - uint32_t(wd > 0.f), mn = 0u - uint32_t(wd < 0.f);
                                const uint32_t bw = f32_bits(wd), bww = f32_bits(w);
                                ps[j] += bits_f32(bw & mp);
                                ng[j] += bits_f32(bw & mn);
                                wp[j] += bits_f32(bww & mp);
                                wn[j] += bits_f32(bww & mn);
                            }
                        }
                    }
                }
                for (int j = 0; j < mt; ++j) {
                    float v;
                    if (sparsify_only) {
                        v = total[0][j];
                    } else {
                        // partials 1..3 are +0 for the in-order elements: adding them changes nothing
                        // (torch's sums start from +0, so they are never -0)
                        MergeAcc acc;
                        acc.total = ((total[0][j] + total[1][j]) + total[2][j]) + total[3][j];
                        acc.pos = ((pos[0][j] + pos[1][j]) + pos[2][j]) + pos[3][j];
                        acc.neg = ((neg[0][j] + neg[1][j]) + neg[2][j]) + neg[3][j];
                        acc.wpos = ((wpos[0][j] + wpos[1][j]) + wpos[2][j]) + wpos[3][j];
                        acc.wneg = ((wneg[0][j] + wneg[1][j]) + wneg[2][j]) + wneg[3][j];
                        v = finish<DT>(acc, b[j], CONSENSUS, normalize, apply_lambda, lam, divisor_nc);
                    }
                    store_f32<DT>(out, i0 + j, v);
                }
            }
        }
    }
}

void della_merge(std::vector<uintptr_t> xs, uintptr_t base, uintptr_t out, int dt, int64_t n, int64_t seq_end,
                 std::vector<int> modes, std::vector<int> has_scale, std::vector<float> scales, uintptr_t bits,
                 std::vector<float> weights, float lam, float divisor_nc, bool consensus, bool normalize,
                 bool sparsify_only) {
    const size_t K = xs.size();
    if (modes.size() != K || has_scale.size() != K || scales.size() != K || weights.size() != K)
        throw std::invalid_argument("della_merge: modes, has_scale, scales and weights need one entry per model");
    std::vector<const void*> x;
    for (auto p : xs) x.push_back(reinterpret_cast<const void*>(p));
    const void* b = reinterpret_cast<const void*>(base);
    void* o = reinterpret_cast<void*>(out);
    const uint64_t* bt = reinterpret_cast<const uint64_t*>(bits);
    py::gil_scoped_release nogil;
    dispatch_dt(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        if (consensus)
            merge_impl<DT, true>(x, b, o, n, seq_end, modes, has_scale, scales, bt, weights, lam, divisor_nc, normalize,
                                 sparsify_only);
        else
            merge_impl<DT, false>(x, b, o, n, seq_end, modes, has_scale, scales, bt, weights, lam, divisor_nc, normalize,
                                  sparsify_only);
    });
}

}  // namespace

void register_della_cpu(py::module_& m) {
    m.def("della_masks", &della_masks);
    m.def("della_merge", &della_merge);
}
