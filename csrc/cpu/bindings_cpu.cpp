// wweight._cpu: C++/OpenMP CPU kernels over raw host pointers (built by setup.py with the host
// compiler; optional: without it the vectorised-torch path runs). Each family adds register_*_cpu.
#include <pybind11/pybind11.h>

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
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
