// The selection kernels of the sparse CPU family (csrc/cpu/sparse_kernels.h): the radix
// primitives digit_hist and tie_counts, and the one-pass bracketed select that usually replaces
// them. Included by sparse_kernels.h inside the build's namespace, after sparse_tiles.h.
#pragma once
#include "sparse_tiles.h"

namespace sparse_cpu {

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

// ------------------------------------------------------------------------------ select
// Exact k-th largest key of every query in (usually) one pass over the inputs, with the per-block
// tie counts of the found key as a by-product: the same answers as wweight/sparse/plan.py
// radix_select + tie_counts, which take 2-3 passes and one more for the tie counts.
//   1. A sample (up to 4096 runs of 8 consecutive elements per model) brackets each query's key:
//      [k_lo, k_hi] = the sample's keys at ranks k/n * S -/+ (5 sigma + 32).
//   2. One pass counts, per query, the elements above k_hi (a vectorised compare) and keeps every
//      element inside the bracket as a candidate (key, block), by branch-free compaction; a
//      16-bit bracket of few keys is instead counted per block and key (no candidates).
//   3. If above < k <= above + candidates, the k-th key is a candidate: a histogram of the
//      candidates and an nth_element over one of its buckets give it, its counts and its
//      per-block tie counts. Otherwise (the sample missed: very skewed data) or when the
//      candidates overflow their cap (huge tie groups), the query is left to the radix passes
//      (resolved = 0): still exact, at 1-3 more passes.
#if defined(__AVX2__)
// Bit l of the result: lane l of k satisfies k - lo <= width (unsigned); vlo = lo in every lane,
// vw = bracket_width8(width) (width ^ 0x80000000: the unsigned compare as a signed one).
inline uint32_t bracket_mask8(__m256i k, __m256i vlo, __m256i vw) {
    const __m256i sign = _mm256_set1_epi32(int(0x80000000u));
    const __m256i t = _mm256_xor_si256(_mm256_sub_epi32(k, vlo), sign);
    return ~uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(t, vw)))) & 0xFFu;
}

inline __m256i bracket_width8(uint32_t width) { return _mm256_set1_epi32(int(width ^ 0x80000000u)); }
#endif

#if WW_AVX512
// Bit l of the result: lane l of k satisfies k - lo <= width (unsigned), 16 lanes (vlo, vw: lo and
// width in every lane; AVX-512 has the unsigned compare).
inline __mmask16 bracket_mask16(__m512i k, __m512i vlo, __m512i vw) {
    return _mm512_cmple_epu32_mask(_mm512_sub_epi32(k, vlo), vw);
}
#endif

// Appends the keys of key[0 .. m) with key - lo <= width (unsigned) to out; returns how many.
// out must have room for m more. Same keys in the same order on every build; the AVX2 build
// compacts 8 lanes at a time (compare, movemask, a permutation from a 256-entry table), the
// AVX-512 build 16 (compare into a mask, vpcompressd). That took the threshold pass from 25-27 to
// 23-25 ms (fp32), 24-25 to 21-23 ms (bf16) and Breadcrumbs' two-sided one from 35-39 to 28-30 ms
// (16M x 4, alternating builds, min-median of 20 calls).
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
#if WW_AVX512
    {   // 16 lanes: an unsigned compare into a mask and a register compress (a compress straight to
        // memory is slow on some cores), then a full-width store at out + nc
        const __m512i vlo16 = _mm512_set1_epi32(int(lo)), vw16 = _mm512_set1_epi32(int(width));
        for (; j + 16 <= m; j += 16) {
            const __m512i k = _mm512_loadu_si512(key + j);
            const __mmask16 in = bracket_mask16(k, vlo16, vw16);
            _mm512_storeu_si512(out + nc, _mm512_maskz_compress_epi32(in, k));
            nc += __builtin_popcount(unsigned(in));
        }
    }
#endif
    const __m256i vlo = _mm256_set1_epi32(int(lo)), vw = bracket_width8(width);
    for (; j + 8 <= m; j += 8) {
        const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + j));
        const int in_mask = int(bracket_mask8(k, vlo, vw));
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
    std::vector<double> inside(Q);   // the sample's fraction inside the bracket
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
        int64_t in = 0;
        for (const uint32_t k : sk) in += k - klo[q] <= khi[q] - klo[q];
        inside[q] = double(in) / double(S);
    }
    // ---- 2. the pass: candidates in block order per thread, with a count per block (their blocks)
    // A bracket of few keys (16-bit dtypes) is counted per block and key instead (uint16: a block
    // holds kBlock <= 65535 elements), no candidates kept. While the sample puts < 1/4 of the
    // elements inside: by incrementing the count of each lane inside (< SCATTER keys; a bf16
    // bracket of ~17 keys holds ~7% of the elements, and compacting them as candidates made the
    // pass 2-3x slower); else, < NARROW keys, with one vector compare per key (the cut may be one
    // tie group holding most elements: increments of one count would be a serial chain). The
    // counts take n * W / 512 bytes (<= n / 8).
    constexpr uint32_t NARROW = 16, SCATTER = 64;
    static_assert(BLOCK <= 65535, "per-block counts are uint16");
    std::vector<uint8_t> narrow(Q, 0);   // 0: candidates, 1: vector compares, 2: scatter
    std::vector<std::vector<uint16_t>> narrow_counts(Q);
    for (int64_t q = 0; q < Q; ++q)
        if (khi[q] != 0xFFFFFFFFu && khi[q] - klo[q] < SCATTER) {
            narrow[q] = inside[q] < 0.25 ? 2 : khi[q] - klo[q] < NARROW ? 1 : 0;
            if (narrow[q]) narrow_counts[q].assign(size_t(nblocks) * (khi[q] - klo[q] + 1), 0);
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
        alignas(64) uint32_t key[TILE], inside[TILE];
        // scatter counts of the current block, 4 interleaved copies per query (see below)
        std::vector<uint32_t> c4(size_t(Q) * 4 * SCATTER, 0u);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            block_keys<DT>(in, models, blk, b, d, key, [&](int64_t mi, int m, const uint32_t* key) {
                    for (int64_t q = 0; q < Q; ++q) {
                        if (slot[q] != mi) continue;
                        const uint32_t lo = klo[q], hi = khi[q];
                        uint32_t up = 0;
                        for (int j = 0; j < m; ++j) up += uint32_t(key[j] > hi);
                        my_above[q] += up;
                        if (narrow[q] == 1) {
                            // a bracket of < NARROW keys (16-bit dtypes: the cut is one big tie group):
                            // count each key per block with vector compares, keep no candidates
                            uint16_t* bc = narrow_counts[q].data() + size_t(blk) * (hi - lo + 1);
                            for (uint32_t v = 0; v <= hi - lo; ++v) {
                                uint32_t c = 0;
                                const uint32_t kv = lo + v;
                                for (int j = 0; j < m; ++j) c += uint32_t(key[j] == kv);
                                bc[v] = uint16_t(bc[v] + c);
                            }
                            continue;
                        }
                        if (narrow[q] == 2) {
                            // < SCATTER keys: one increment per lane inside the bracket.
                            // The lanes inside are compacted first (the tile's keys in element order), then
                            // counted in a loop of known length: a walk of 64-lane bit masks ended in a
                            // mispredicted branch per mask. Consecutive lanes go to 4 copies of the counts, so
                            // a run of one key (the cut's tie group) is 4 chains of increments, not one;
                            // the copies are summed into the block's counts after its last tile.
                            const int nc = compact_bracket(key, m, lo, hi - lo, inside);
                            uint32_t* c = c4.data() + size_t(q) * 4 * SCATTER;
                            int i = 0;
                            for (; i + 4 <= nc; i += 4) {
                                ++c[inside[i] - lo];
                                ++c[SCATTER + inside[i + 1] - lo];
                                ++c[2 * SCATTER + inside[i + 2] - lo];
                                ++c[3 * SCATTER + inside[i + 3] - lo];
                            }
                            for (; i < nc; ++i) ++c[inside[i] - lo];
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
            for (int64_t q = 0; q < Q; ++q) {
                if (narrow[q] != 2) continue;
                const uint32_t W = khi[q] - klo[q] + 1;
                uint16_t* bc = narrow_counts[q].data() + size_t(blk) * W;
                uint32_t* c = c4.data() + size_t(q) * 4 * SCATTER;
                for (uint32_t v = 0; v < W; ++v) {
                    bc[v] = uint16_t(c[v] + c[SCATTER + v] + c[2 * SCATTER + v] + c[3 * SCATTER + v]);
                    c[v] = c[SCATTER + v] = c[2 * SCATTER + v] = c[3 * SCATTER + v] = 0u;
                }
            }
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
            const uint16_t* bc = narrow_counts[q].data();
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
            // a wide bracket (fp32 keys, ~2% of n candidates): a 2^12-bucket histogram of
            // (key - lo) >> shift (L1-resident counts) finds the bucket of the answer, and an
            // nth_element over that bucket's candidates alone gives it: two streaming passes over
            // the candidates instead of an nth_element over all of them (measured: 8% of a TIES
            // plan's CPU time went to that nth_element)
            constexpr uint32_t HB = 12;
            int shift = 0;
            while ((width >> shift) >= (1u << HB)) ++shift;
            const uint32_t nb = (width >> shift) + 1;
            std::vector<int64_t> cnt(nb, 0);
            for (int th = 0; th < nth; ++th)
                for (const uint32_t k : cands[th][q]) ++cnt[(k - lo) >> shift];
            int64_t seen = 0;
            int64_t v = int64_t(nb) - 1;
            for (; v > 0; --v) {
                if (seen + cnt[size_t(v)] >= k_rem) break;
                seen += cnt[size_t(v)];
            }
            std::vector<uint32_t> bucket;
            bucket.reserve(size_t(cnt[size_t(v)]));
            for (int th = 0; th < nth; ++th)
                for (const uint32_t k : cands[th][q])
                    if (((k - lo) >> shift) == uint32_t(v)) bucket.push_back(k);
            const int64_t r = k_rem - seen;   // 1-based descending rank inside the bucket
            std::nth_element(bucket.begin(), bucket.begin() + (r - 1), bucket.end(), std::greater<uint32_t>());
            found = bucket[size_t(r - 1)];
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

}  // namespace sparse_cpu
