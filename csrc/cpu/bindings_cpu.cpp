// wweight._cpu: C++/OpenMP CPU kernels over raw host pointers (built by setup.py with the host
// compiler; optional: without it the vectorised-torch path runs). Each family adds register_*_cpu.
#include <pybind11/pybind11.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../constants.h"

namespace py = pybind11;

void register_sparse_cpu(py::module_& m);
void register_della_cpu(py::module_& m);
void register_lap_auction_cpu(py::module_& m);
void register_lap_cpu(py::module_& m);
void register_quant_cpu(py::module_& m);

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "wweight CPU kernels (C++/OpenMP, raw-pointer pybind11 bindings)";
    wweight::export_constants(m);
    register_sparse_cpu(m);
    register_della_cpu(m);
    register_lap_auction_cpu(m);
    register_lap_cpu(m);
    register_quant_cpu(m);
    // madvise(MADV_HUGEPAGE) on the 2 MB-aligned inside of [ptr, ptr + nbytes): a fresh output then
    // faults in 2 MB pages (wweight/_ext.py empty_like). Returns whether the advice was taken.
    m.def("advise_huge_pages", [](uintptr_t ptr, uint64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        const uintptr_t huge = uintptr_t(1) << 21;
        const uintptr_t lo = (ptr + huge - 1) & ~(huge - 1), hi = (ptr + nbytes) & ~(huge - 1);
        return hi > lo && madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
        (void)ptr;
        (void)nbytes;
        return false;
#endif
    });
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
