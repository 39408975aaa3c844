// Per-step logic of the exact linear-assignment solvers, shared by the C++ CPU solvers
// (csrc/cpu/lap_cpu.cpp: LAPJV and the serial model of the GPU kernel) and the CUDA kernel
// (csrc/lap.cu), so the CPU tests execute the very steps the GPU runs.
//
// Problem: minimise sum_i c[i, col[i]] over injective col, c (n, m) float64 with n <= m, +inf = a
// forbidden pair. Shortest augmenting paths (Jonker & Volgenant 1987, "A shortest augmenting
// path algorithm for dense and sparse linear assignment problems"; the rectangular, +inf-aware
// form of Crouse 2016, "On implementing 2D rectangular assignment algorithms", which scipy uses).
// Duals: u (rows), v (columns) with c_ij - u_i - v_j >= 0 for every finite entry, 0 on the
// assignment, v_j <= 0 and v_j = 0 on unassigned columns (the rectangular LP dual). Columns start
// at v = 0 and a column's price only ever drops (below), so the last two hold by construction.
#pragma once
#include <cstdint>
#include <limits>

#ifndef WW_HD
#if defined(__CUDACC__)
#define WW_HD __host__ __device__ __forceinline__
#else
#define WW_HD inline
#endif
#endif

namespace wweight {
namespace lap {

// status codes of a solve (== the backend contract's status)
enum Status : int { SOLVED = 0, INFEASIBLE = 1, GAVE_UP = 2 };

constexpr double kInf = std::numeric_limits<double>::infinity();

// Reduced cost of (i, j) on a path that reached row i at distance mu: mu + c_ij - u_i - v_j.
// Written as ((c - v) - u) + mu, one fixed order, so the CPU and GPU round alike (the CUDA build
// uses --fmad=false: no contraction either). c = +inf gives +inf (u, v, mu are finite).
WW_HD double reduced(double c, double u, double v, double mu) { return ((c - v) - u) + mu; }

// Relax column j from row i: a shorter path to j through i replaces the old one.
template <typename I>
WW_HD bool relax(double r, double& dj, I& predj, I i) {
    if (r < dj) {
        dj = r;
        predj = i;
        return true;
    }
    return false;
}

// The order in which Dijkstra settles columns: lower distance first; on equal distance a free
// column first (it ends the search: fewer steps on tied costs), then the lowest column index.
// tie = j for a free column, m + j for an assigned one. A total order on distinct columns, so a
// block-wide min-reduction in any shape picks the same column as a serial scan.
WW_HD bool key_less(double da, int64_t ta, double db, int64_t tb) { return da < db || (da == db && ta < tb); }
WW_HD int64_t tie_key(int64_t j, bool assigned, int64_t m) { return assigned ? m + j : j; }

// Dual update of a settled column j (distance dj <= mu, the sink's distance) and of the row
// assigned to it: the column's price drops by mu - dj >= 0, the row's potential rises by it, so
// (row, column) stays tight and every other reduced cost stays >= 0 (Dijkstra's potentials).
// Clamped at 0: a reduced cost that rounding made a hair negative must not raise a price (v <= 0 stays exact).
WW_HD double settle_delta(double dj, double mu) { return dj < mu ? mu - dj : 0.0; }

// Augment along the predecessor chain from the sink back to the free row f: each column on the
// path takes its predecessor row, and each row hands its old column to the next column back.
// rowsol: row -> column (-1 free), colsol: column -> row (-1 free).
template <typename I, typename R>
WW_HD void augment(const I* pred, R* rowsol, I* colsol, I f, I sink) {
    I j = sink;
    for (;;) {
        I i = pred[j];
        colsol[j] = i;
        I prev = static_cast<I>(rowsol[i]);
        rowsol[i] = j;
        if (i == f) break;
        j = prev;
    }
}

// The potential of an assigned row, implicit in LAPJV: u_i = c_{i, col_i} - v_{col_i}.
WW_HD double row_potential(double c_assigned, double v_assigned) { return c_assigned - v_assigned; }

}  // namespace lap
}  // namespace wweight
