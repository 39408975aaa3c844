// The large-n auction LAP solver, written once for both builds: the CUDA cooperative kernel
// (csrc/lap_auction.cu, X = the grid) and the serial C++ model in the CPU extension
// (csrc/cpu/lap_auction_cpu.cpp, X = one host thread), so CI runs this very control flow and these
// very formulas on the CPU and checks them against scipy and against the torch model
// (wweight/backends/torch/permute.py, whose docstring has the algorithm and why it is exact).
//
// X supplies the parallel pieces: each(count, f) runs f(k) for every k < count (grid-strided on the
// GPU), single(f) runs f once, sync() is a grid-wide barrier, load(p) a fresh read, the atomics, and
// top2_each(count, pred, row, sub, len, f): for every k < count with pred(k), the top-2 of
// row(k)[t] - sub[t] over t < len (ties to the lowest t), then f(k, top2) once. Every step between
// two syncs is race-free or commutative (atomicMax keys, idempotent flags), so the serial order of the
// CPU model gives the GPU's result bit for bit (float64, no FMA contraction: --fmad=false).
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define WW_LAP_HD __host__ __device__ __forceinline__
#else
#define WW_LAP_HD inline
#endif

namespace wweight {
namespace lap {

constexpr unsigned long long kLow = 0xFFFFull;   // == permute.py ROW_BITS = 16
constexpr double kTheta = 8.0;                   // == permute.py THETA
constexpr int kCheckEvery = 16;                  // == permute.py CHECK_EVERY

// Scalars the solver keeps in memory (one per problem, zeroed by the caller). The glue reads the
// int32 words 8..11 (phases, rounds, reverse_rounds, status).
struct Ctl {
    unsigned long long pmin_bits;   // lowest assigned price (non-negative doubles order as their bits)
    unsigned long long pmax_bits;   // highest price at phase start
    int nfree;                      // unassigned rows in the forward phase
    int over;                       // a price passed the bound in this phase
    int active[2];                  // a reverse round had a qualifying column (parity-indexed)
    int phases, rounds, reverse_rounds, status;
};

struct Args {
    const double* a;          // (n, m) shifted benefits, max 0, -inf forbidden
    const double* at;         // (m, n) its transpose (read only when n < m)
    const double* sched;      // eps0, eps_try, cap (permute.schedule)
    double* price;            // (m) in: 0, out: final prices
    double* pnew;             // (m) reverse offers
    double* pi;               // (n) reverse profits
    int* col;                 // (n)
    int* owner;               // (m)
    unsigned long long* key;  // (m) forward bids, 0 between rounds
    unsigned long long* rkey; // (n) reverse offers, 0 between rounds
    Ctl* ctl;
    int n, m, max_rounds;
};

WW_LAP_HD unsigned long long dbits(double v) {
    unsigned long long u;
    memcpy(&u, &v, sizeof u);
    return u;
}
WW_LAP_HD double from_bits(unsigned long long u) {
    double v;
    memcpy(&v, &u, sizeof v);
    return v;
}
// key of a positive value and an index: its top 47 bits, then the lowest index (permute.pack_key)
WW_LAP_HD unsigned long long key_of(double val, int idx) { return (dbits(val) & ~kLow) | (kLow - unsigned(idx)); }
WW_LAP_HD double key_value(unsigned long long k) { return from_bits(k & ~kLow); }
WW_LAP_HD int key_index(unsigned long long k) { return int(kLow - (k & kLow)); }

struct Top2 {
    double v1, v2;
    int j1;
};
constexpr int kNoIndex = 0x7fffffff;

// one more candidate, seen in increasing index order (keeps the first maximum)
WW_LAP_HD void top2_push(Top2& t, double v, int k) {
    if (v > t.v1) { t.v2 = t.v1; t.v1 = v; t.j1 = k; }
    else if (v > t.v2) t.v2 = v;
}
// two partial top-2s: best ties to the lower index, second = max over everything else
WW_LAP_HD Top2 top2_merge(Top2 x, Top2 y) {
    const bool take_y = y.v1 > x.v1 || (y.v1 == x.v1 && y.j1 < x.j1);
    Top2 r;
    if (take_y) { r.v1 = y.v1; r.j1 = y.j1; r.v2 = fmax(y.v2, x.v1); }
    else        { r.v1 = x.v1; r.j1 = x.j1; r.v2 = fmax(x.v2, y.v1); }
    return r;
}
WW_LAP_HD Top2 top2_init() { return Top2{-INFINITY, -INFINITY, kNoIndex}; }
WW_LAP_HD void top2_finish(Top2& t) { if (t.j1 == kNoIndex) t.j1 = 0; }   // all -inf: argmax's index 0

WW_LAP_HD double next_eps(double eps, double eps_try) {
    const double e = eps / kTheta;
    return eps > eps_try ? fmax(e, eps_try) : e;
}

// The whole solve of one problem. Ctl::status: 0 done (the caller certifies), 2 out of rounds,
// 3 a price passed the infeasibility bound.
template <class X>
WW_LAP_HD void solve(X& x, const Args& g) {
    const int n = g.n, m = g.m;
    Ctl* ctl = g.ctl;
    const double eps_try = g.sched[1], cap = g.sched[2];
    double eps = g.sched[0];
    for (;;) {
        // ---------------- forward phase: everyone unassigned, prices kept
        x.single([&] { ctl->nfree = n; ctl->over = 0; ctl->pmax_bits = 0; ctl->pmin_bits = ~0ull; ctl->phases++; });
        x.each(n, [&](int64_t i) { g.col[i] = -1; });
        x.each(m, [&](int64_t j) { g.owner[j] = -1; });
        x.sync();
        x.each(m, [&](int64_t j) { x.max_u64(&ctl->pmax_bits, dbits(g.price[j])); });
        x.sync();
        const double bound = from_bits(x.load_u64(&ctl->pmax_bits)) + double(2 * int64_t(n) + 2) * (2 * cap + eps);
        int st = 0;
        for (int rnd = 0;; ++rnd) {
            if (rnd == g.max_rounds) { st = x.load(&ctl->nfree) ? 2 : 0; break; }
            if (rnd % kCheckEvery == kCheckEvery - 1 && x.load(&ctl->over)) { st = 3; break; }
            if (x.load(&ctl->nfree) == 0) break;
            x.single([&] { ctl->rounds++; });
            // bid: every unassigned row, one key per row into its best column
            x.top2_each(n, [&](int64_t i) { return g.col[i] < 0; },
                        [&](int64_t i) { return g.a + i * int64_t(m); }, g.price, m,
                        [&](int64_t i, const Top2& t) {
                            const double d = t.v1 - t.v2;          // +inf: one finite entry
                            const double inc = (d == INFINITY ? cap : d) + eps;
                            x.max_u64(&g.key[t.j1], key_of(inc, int(i)));
                        });
            x.sync();
            // assign: every column with a bid
            x.each(m, [&](int64_t j) {
                const unsigned long long k = g.key[j];
                if (!k) return;
                g.key[j] = 0;
                const int w = key_index(k);
                const int prev = g.owner[j];
                if (prev >= 0) g.col[prev] = -1;
                else x.add(&ctl->nfree, -1);
                g.owner[j] = w;
                g.col[w] = int(j);
                const double p = g.price[j] + key_value(k);
                g.price[j] = p;
                if (p > bound) ctl->over = 1;
            });
            x.sync();
        }
        if (st == 0 && n < m) {
            // ---------------- reverse rounds: unassigned columns priced above lam lower their price
            x.each(m, [&](int64_t j) { if (g.owner[j] >= 0) x.min_u64(&ctl->pmin_bits, dbits(g.price[j])); });
            x.each(n, [&](int64_t i) {
                const int c = g.col[i];
                g.pi[i] = g.a[i * int64_t(m) + c] - g.price[c];
            });
            x.single([&] { ctl->active[0] = 0; ctl->active[1] = 0; });
            x.sync();
            const double lam = from_bits(x.load_u64(&ctl->pmin_bits));
            for (int rr = 0;; ++rr) {
                if (rr == g.max_rounds) { st = 2; break; }
                const int par = rr & 1;
                x.top2_each(m, [&](int64_t j) { return g.owner[j] < 0 && g.price[j] > lam; },
                            [&](int64_t j) { return g.at + j * int64_t(n); }, g.pi, n,
                            [&](int64_t j, const Top2& t) {
                                ctl->active[par] = 1;
                                if (t.v1 - eps <= lam) {
                                    g.price[j] = lam;                  // settles unassigned at lam
                                } else {
                                    const double pn = fmax(lam, t.v2 - eps);
                                    g.pnew[j] = pn;
                                    x.max_u64(&g.rkey[t.j1], key_of(t.v1 - pn, int(j)));
                                }
                            });
                x.single([&] { ctl->active[par ^ 1] = 0; });
                x.sync();
                if (!x.load(&ctl->active[par])) break;
                x.single([&] { ctl->reverse_rounds++; });
                x.each(n, [&](int64_t i) {
                    const unsigned long long k = g.rkey[i];
                    if (!k) return;
                    g.rkey[i] = 0;
                    const int j = key_index(k);
                    g.owner[g.col[i]] = -1;
                    g.owner[j] = int(i);
                    g.col[i] = j;
                    const double p = g.pnew[j];
                    g.price[j] = p;
                    g.pi[i] = g.a[i * int64_t(m) + j] - p;
                });
                x.sync();
            }
        }
        if (st != 0 || eps <= eps_try * (1 + 1e-12)) {
            x.single([&] { ctl->status = st; });
            return;
        }
        eps = next_eps(eps, eps_try);
        x.sync();                       // the next phase's ctl reset waits for every reader
    }
}

}  // namespace lap
}  // namespace wweight
