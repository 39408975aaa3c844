// The serial C++ model of the large-n CUDA auction (csrc/lap_auction.cu): wweight::lap::solve from
// csrc/lap_auction_elem.h run by one host thread. Same control flow, formulas and key packing as
// the kernel, so the tests (tests/test_lap_auction.py) check the kernel's solve on the CPU, against
// scipy and against the torch model round for round. Not a fast CPU solver (that is the LAPJV one).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "../lap_auction_elem.h"

namespace py = pybind11;
using namespace wweight::lap;

namespace {

struct SerialX {
    template <class F> void each(int64_t count, F f) {
        for (int64_t k = 0; k < count; ++k) f(k);
    }
    template <class F> void single(F f) { f(); }
    void sync() {}
    int load(const int* p) { return *p; }
    unsigned long long load_u64(const unsigned long long* p) { return *p; }
    void max_u64(unsigned long long* p, unsigned long long v) { if (v > *p) *p = v; }
    void min_u64(unsigned long long* p, unsigned long long v) { if (v < *p) *p = v; }
    void add(int* p, int v) { *p += v; }
    template <class P, class R, class F>
    void top2_each(int64_t count, P pred, R row_of, const double* sub, int len, F f) {
        for (int64_t k = 0; k < count; ++k) {
            if (!pred(k)) continue;
            const double* row = row_of(k);
            Top2 t = top2_init();
            for (int c = 0; c < len; ++c) top2_push(t, row[c] - sub[c], c);
            top2_finish(t);
            f(k, t);
        }
    }
};

void lap_auction_cpu(uintptr_t a, uintptr_t at, uintptr_t sched, uintptr_t price, uintptr_t pnew, uintptr_t pi,
                     uintptr_t col, uintptr_t owner, uintptr_t key, uintptr_t rkey, uintptr_t ctl, int n, int m,
                     int max_rounds) {
    if (n <= 0 || m < n || m > int(kLow) + 1) throw std::invalid_argument("lap_auction_cpu: need 0 < n <= m <= 65536");
    Args g{reinterpret_cast<const double*>(a), reinterpret_cast<const double*>(at),
           reinterpret_cast<const double*>(sched), reinterpret_cast<double*>(price),
           reinterpret_cast<double*>(pnew), reinterpret_cast<double*>(pi), reinterpret_cast<int*>(col),
           reinterpret_cast<int*>(owner), reinterpret_cast<unsigned long long*>(key),
           reinterpret_cast<unsigned long long*>(rkey), reinterpret_cast<Ctl*>(ctl), n, m, max_rounds};
    SerialX x;
    py::gil_scoped_release nogil;
    solve(x, g);
}

}  // namespace

void register_lap_auction_cpu(py::module_& m) {
    m.def("lap_auction_cpu", &lap_auction_cpu, "serial model of the CUDA auction kernel (one problem)");
    m.attr("LAP_AUCTION_CTL_BYTES") = int(sizeof(Ctl));
}
