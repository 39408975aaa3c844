// CPU (OpenMP) exact linear-assignment solvers over raw host pointers, batched (B, n, m), n <= m,
// float64, +inf = forbidden pair (contract: wweight/backends/__init__.py, ``permute``).
//
// * lap_solve: Jonker & Volgenant (1987) LAPJV. Square problems: column reduction, reduction
//   transfer, two passes of augmenting row reduction (ARR), then shortest augmenting paths
//   (Dijkstra with JV's scan of the "todo" columns at the current minimum distance, lazy column
//   prices, implicit row potentials u_i = c_{i,col_i} - v_{col_i}) for the rows still free.
//   Rectangular n < m: JV's column reduction assumes every column gets a row, so it is skipped;
//   prices start at v = 0 (exact for the rectangular dual, where unassigned columns keep v = 0)
//   and ARR + SAP run from there (ARR only lowers prices of the columns it assigns).
// * lap_solve_block_model: the CUDA kernel's algorithm (csrc/lap.cu) run serially -- row-minimum
//   greedy start, then one Dijkstra step per settled column with a "block-wide" argmin over
//   ``threads`` column slices -- so CI checks the GPU algorithm against scipy without a GPU.
// Both use the per-step logic of csrc/lap_elem.h (the CUDA kernel's too). One problem per OpenMP
// thread (schedule(dynamic)); a single problem runs on one thread.
#include <pybind11/pybind11.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../lap_elem.h"

namespace py = pybind11;
using namespace wweight::lap;

namespace {

// counters per problem (stats[b, k]): rows augmented by Dijkstra, ARR steps, settled columns
enum { ST_AUGMENT = 0, ST_ARR = 1, ST_STEPS = 2, ST_N = 3 };

struct Work {
    std::vector<int64_t> colsol, pred, collist, freerows, matches;
    std::vector<double> d;
    void size(int64_t n, int64_t m) {
        colsol.assign(m, -1);
        pred.resize(m);
        collist.resize(m);
        d.resize(m);
        freerows.resize(n);
        matches.assign(n, 0);
    }
};

// ---- LAPJV ------------------------------------------------------------------------------------

// Column reduction + reduction transfer (square only). Returns the number of free rows (in w.freerows)
// or -1 when a column has no finite entry (no assignment can cover it: infeasible).
int64_t column_reduction(const double* c, int64_t n, int64_t* rowsol, double* v, Work& w) {
    std::vector<int64_t> imin(n, 0);
    for (int64_t j = 0; j < n; ++j) v[j] = kInf;
    for (int64_t i = 0; i < n; ++i) {  // row-major sweep: cache-friendly at large n
        const double* ci = c + i * n;
        for (int64_t j = 0; j < n; ++j)
            if (ci[j] < v[j]) {   // strict: lowest row on ties
                v[j] = ci[j];
                imin[j] = i;
            }
    }
    for (int64_t j = n - 1; j >= 0; --j) {  // JV's order: a row keeps the cheapest of its columns
        if (v[j] == kInf) return -1;
        int64_t i = imin[j];
        if (++w.matches[i] == 1) {
            rowsol[i] = j;
            w.colsol[j] = i;
        } else if (v[j] < v[rowsol[i]]) {
            w.colsol[rowsol[i]] = -1;
            rowsol[i] = j;
            w.colsol[j] = i;
        }
    }
    int64_t nfree = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (w.matches[i] == 0) {
            w.freerows[nfree++] = i;
        } else if (w.matches[i] == 1) {  // transfer: u_i becomes the row's second-best reduced cost
            const double* ci = c + i * n;
            int64_t j1 = rowsol[i];
            double mn = kInf;
            for (int64_t j = 0; j < n; ++j)
                if (j != j1) mn = std::min(mn, ci[j] - v[j]);
            if (mn < kInf) v[j1] -= mn;
        }
    }
    return nfree;
}

// Augmenting row reduction: each free row takes its cheapest column, lowering that column's price
// to the row's second-best reduced cost, and the row it displaces becomes free. Two passes (JV);
// a step budget keeps float64 near-ties (tiny price drops) from cycling long: what is left goes
// to the shortest-path stage, which is exact regardless.
int64_t augmenting_row_reduction(const double* c, int64_t m, int64_t nfree, int64_t* rowsol, double* v, Work& w,
                                 int64_t* st, bool& infeasible) {
    int64_t budget = 4 * (nfree + m);
    for (int pass = 0; pass < 2 && nfree > 0; ++pass) {
        int64_t k = 0, prv = nfree;
        nfree = 0;
        while (k < prv) {
            int64_t i = w.freerows[k++];
            if (--budget < 0) {
                w.freerows[nfree++] = i;
                continue;
            }
            st[ST_ARR]++;
            const double* ci = c + i * m;
            double umin = kInf, usub = kInf;
            int64_t j1 = -1, j2 = -1;
            for (int64_t j = 0; j < m; ++j) {
                double h = ci[j] - v[j];
                if (h < usub) {
                    if (h >= umin) {
                        usub = h;
                        j2 = j;
                    } else {
                        usub = umin;
                        umin = h;
                        j2 = j1;
                        j1 = j;
                    }
                }
            }
            if (j1 < 0) {  // a row with no finite entry
                infeasible = true;
                return 0;
            }
            int64_t i0 = w.colsol[j1];
            if (usub == kInf) {  // one finite entry: no price to lower; displace nobody
                if (i0 >= 0) {
                    w.freerows[nfree++] = i;
                    continue;
                }
            } else if (umin < usub) {
                v[j1] -= usub - umin;
            } else if (i0 >= 0) {  // tie: take the second column instead
                j1 = j2;
                i0 = w.colsol[j1];
                if (i0 >= 0) {  // both taken at equal cost: displacing only moves the tie (constant / tied
                    w.freerows[nfree++] = i;  // costs churn through the budget); the shortest path settles it
                    continue;
                }
            }
            if (i0 >= 0) rowsol[i0] = -1;
            rowsol[i] = j1;
            w.colsol[j1] = i;
            if (i0 >= 0) {
                if (umin < usub) w.freerows[--k] = i0;  // JV: retry the displaced row at once
                else w.freerows[nfree++] = i0;
            }
        }
    }
    return nfree;
}

// Shortest augmenting path from free row f (JV's dense SAP). Returns false if no finite path exists.
bool sap_row(const double* c, int64_t m, int64_t f, int64_t* rowsol, double* v, Work& w, int64_t* st) {
    int64_t* collist = w.collist.data();
    int64_t* pred = w.pred.data();
    int64_t* colsol = w.colsol.data();
    double* d = w.d.data();
    const double* cf = c + f * m;
    for (int64_t j = 0; j < m; ++j) {
        d[j] = reduced(cf[j], 0.0, v[j], 0.0);
        pred[j] = f;
        collist[j] = j;
    }
    int64_t low = 0, up = 0, last = 0, sink = -1;
    double mn = 0.0;
    while (sink < 0) {
        if (up == low) {  // collect the unsettled columns at the new minimum distance ("todo")
            last = low;
            mn = d[collist[up++]];
            for (int64_t k = up; k < m; ++k) {
                int64_t j = collist[k];
                double h = d[j];
                if (h <= mn) {
                    if (h < mn) {
                        up = low;
                        mn = h;
                    }
                    collist[k] = collist[up];
                    collist[up++] = j;
                }
            }
            if (mn == kInf) return false;
            for (int64_t k = low; k < up; ++k)
                if (colsol[collist[k]] < 0) {
                    sink = collist[k];
                    break;
                }
            if (sink >= 0) break;
        }
        int64_t j1 = collist[low++];  // settle one todo column, relax from its row
        st[ST_STEPS]++;
        int64_t i = colsol[j1];
        const double* ci = c + i * m;
        double ui = row_potential(ci[j1], v[j1]);
        for (int64_t k = up; k < m; ++k) {
            int64_t j = collist[k];
            double r = reduced(ci[j], ui, v[j], mn);
            if (relax(r, d[j], pred[j], i) && r == mn) {
                if (colsol[j] < 0) {
                    sink = j;
                    break;
                }
                collist[k] = collist[up];
                collist[up++] = j;
            }
        }
    }
    for (int64_t k = 0; k < last; ++k) {  // lazy price update of the settled columns
        int64_t j = collist[k];
        v[j] -= settle_delta(d[j], mn);
    }
    augment(pred, rowsol, colsol, f, sink);
    st[ST_AUGMENT]++;
    return true;
}

int jv_solve(const double* c, int64_t n, int64_t m, int64_t* rowsol, double* u, double* v, Work& w, int64_t* st) {
    w.size(n, m);
    for (int64_t i = 0; i < n; ++i) rowsol[i] = -1;
    int64_t nfree;
    if (n == m) {
        nfree = column_reduction(c, n, rowsol, v, w);
        if (nfree < 0) return INFEASIBLE;
    } else {
        for (int64_t j = 0; j < m; ++j) v[j] = 0.0;
        for (int64_t i = 0; i < n; ++i) w.freerows[i] = i;
        nfree = n;
    }
    bool infeasible = false;
    nfree = augmenting_row_reduction(c, m, nfree, rowsol, v, w, st, infeasible);
    if (infeasible) return INFEASIBLE;
    for (int64_t k = 0; k < nfree; ++k)
        if (!sap_row(c, m, w.freerows[k], rowsol, v, w, st)) return INFEASIBLE;
    // square: shift prices so that v <= 0 (u_i + v_j is unchanged; every column is assigned)
    double vmax = 0.0;
    if (n == m)
        for (int64_t j = 0; j < m; ++j) vmax = std::max(vmax, v[j]);
    for (int64_t j = 0; j < m; ++j) v[j] -= vmax;
    for (int64_t i = 0; i < n; ++i) u[i] = row_potential(c[i * m + rowsol[i]], v[rowsol[i]]);
    return SOLVED;
}

// ---- the CUDA kernel's algorithm, "threads" iterated serially -----------------------------------

// argmin over columns by key_less, as the kernel's block reduction: each thread t scans its slice
// j = t, t + T, ...; then the T partial minima are reduced (key_less is a total order, so the result
// does not depend on the reduction's shape -- the kernel's tree gives the same column).
template <typename F>
void block_argmin(int64_t m, int T, F&& key, double& dmin, int64_t& tmin) {
    dmin = kInf;
    tmin = INT64_MAX;
    for (int t = 0; t < T; ++t) {
        double bd = kInf;
        int64_t bt = INT64_MAX;
        for (int64_t j = t; j < m; j += T) {
            double dj;
            int64_t tj;
            if (key(j, dj, tj) && key_less(dj, tj, bd, bt)) {
                bd = dj;
                bt = tj;
            }
        }
        if (key_less(bd, bt, dmin, tmin)) {
            dmin = bd;
            tmin = bt;
        }
    }
}

int block_model_solve(const double* c, int64_t n, int64_t m, int64_t* rowsol, double* u, double* v, int T,
                      int64_t* st) {
    std::vector<double> d(m);
    std::vector<int32_t> pred(m), colsol(m, -1);
    std::vector<uint8_t> done(m);
    for (int64_t j = 0; j < m; ++j) v[j] = 0.0;
    for (int64_t i = 0; i < n; ++i) {  // start: u_i = row minimum, greedy row-order assignment (v = 0)
        rowsol[i] = -1;
        const double* ci = c + i * m;
        double dmin;
        int64_t jmin;
        block_argmin(m, T, [&](int64_t j, double& dj, int64_t& tj) { dj = ci[j]; tj = j; return true; }, dmin, jmin);
        if (dmin == kInf) return INFEASIBLE;
        u[i] = dmin;
        if (colsol[jmin] < 0) {
            colsol[jmin] = int32_t(i);
            rowsol[i] = jmin;
        }
    }
    for (int64_t f = 0; f < n; ++f) {
        if (rowsol[f] >= 0) continue;
        std::fill(d.begin(), d.end(), kInf);
        std::fill(done.begin(), done.end(), 0);
        int32_t i = int32_t(f);
        double mu = 0.0, ui = u[f];
        int64_t sink = -1;
        for (;;) {
            const double* ci = c + int64_t(i) * m;
            double dmin;
            int64_t tmin;
            block_argmin(m, T, [&](int64_t j, double& dj, int64_t& tj) {
                if (done[j]) return false;
                relax(reduced(ci[j], ui, v[j], mu), d[j], pred[j], i);
                dj = d[j];
                tj = tie_key(j, colsol[j] >= 0, m);
                return true;
            }, dmin, tmin);
            if (dmin == kInf) return INFEASIBLE;
            st[ST_STEPS]++;
            int64_t j = tmin >= m ? tmin - m : tmin;
            done[j] = 1;
            mu = dmin;
            if (colsol[j] < 0) {
                sink = j;
                break;
            }
            i = colsol[j];
            ui = u[i];
        }
        for (int64_t j = 0; j < m; ++j)
            if (done[j] && j != sink) {
                double delta = settle_delta(d[j], mu);
                v[j] -= delta;
                u[colsol[j]] += delta;
            }
        u[f] += mu;
        augment(pred.data(), rowsol, colsol.data(), int32_t(f), int32_t(sink));
        st[ST_AUGMENT]++;
    }
    return SOLVED;
}

// ---- bindings ---------------------------------------------------------------------------------

void check_shape(int64_t B, int64_t n, int64_t m) {
    if (B < 0 || n < 0 || m < 0) throw std::invalid_argument("lap: B, n, m must be >= 0");
    if (n > m) throw std::invalid_argument("lap: cost must have n <= m rows (transpose first), got n=" +
                                           std::to_string(n) + " > m=" + std::to_string(m));
}

template <typename Solve>
void run_batch(uintptr_t cost, int64_t B, int64_t n, int64_t m, uintptr_t col, uintptr_t u, uintptr_t v,
               uintptr_t status, uintptr_t stats, int threads, Solve&& solve) {
    check_shape(B, n, m);
    if (threads < 0) throw std::invalid_argument("lap: threads must be >= 0 (0: the OpenMP default)");
    const int nt = threads > 0 ? threads : omp_get_max_threads();
    const double* c = reinterpret_cast<const double*>(cost);
    int64_t* cl = reinterpret_cast<int64_t*>(col);
    double* uu = reinterpret_cast<double*>(u);
    double* vv = reinterpret_cast<double*>(v);
    int32_t* ss = reinterpret_cast<int32_t*>(status);
    int64_t* st = reinterpret_cast<int64_t*>(stats);
    py::gil_scoped_release nogil;
#pragma omp parallel if (B > 1) num_threads(nt)
    {
        Work w;
#pragma omp for schedule(dynamic)
        for (int64_t b = 0; b < B; ++b) {
            // counters in a local copy: neighbouring problems' rows of ``stats`` share cache lines, and
            // threads bumping them in the inner loops would false-share on every step
            int64_t sb[ST_N] = {0, 0, 0};
            if (n == 0) {
                for (int64_t j = 0; j < m; ++j) vv[b * m + j] = 0.0;
                ss[b] = SOLVED;
            } else {
                ss[b] = solve(c + b * n * m, n, m, cl + b * n, uu + b * n, vv + b * m, w, sb);
            }
            for (int k = 0; k < ST_N; ++k) st[b * ST_N + k] = sb[k];
        }
    }
}

void lap_solve(uintptr_t cost, int64_t B, int64_t n, int64_t m, uintptr_t col, uintptr_t u, uintptr_t v,
               uintptr_t status, uintptr_t stats, int threads) {
    run_batch(cost, B, n, m, col, u, v, status, stats, threads,
              [](const double* c, int64_t n, int64_t m, int64_t* r, double* u, double* v, Work& w, int64_t* st) {
                  return jv_solve(c, n, m, r, u, v, w, st);
              });
}

void lap_solve_block_model(uintptr_t cost, int64_t B, int64_t n, int64_t m, uintptr_t col, uintptr_t u,
                           uintptr_t v, uintptr_t status, uintptr_t stats, int block_threads, int threads) {
    if (block_threads < 1) throw std::invalid_argument("lap_solve_block_model: block_threads must be >= 1");
    if (m >= (int64_t(1) << 30)) throw std::invalid_argument("lap_solve_block_model: m must be < 2**30");
    run_batch(cost, B, n, m, col, u, v, status, stats, threads,
              [block_threads](const double* c, int64_t n, int64_t m, int64_t* r, double* u, double* v, Work&,
                              int64_t* st) { return block_model_solve(c, n, m, r, u, v, block_threads, st); });
}

}  // namespace

void register_lap_cpu(py::module_& m) {
    m.def("lap_solve", &lap_solve,
          "LAPJV on a (B, n, m) float64 batch, n <= m: (cost, B, n, m, col, u, v, status, stats) raw pointers, "
          "then OpenMP threads (0: default)");
    m.def("lap_solve_block_model", &lap_solve_block_model,
          "the CUDA kernel's SAP run serially: lap_solve's arguments, then the block's thread count, then OpenMP "
          "threads");
    m.attr("LAP_STATS") = py::make_tuple("augmentations", "arr_steps", "dijkstra_steps");
}
