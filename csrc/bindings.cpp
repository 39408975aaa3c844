// One pybind11 module, wweight._cuda, for every op family that has CUDA kernels (sparse, quant;
// iso and permute run on cuBLAS / cuSOLVER through torch). Each family's .cu file defines its
// register_* function; kernels take raw device pointers (uintptr_t) plus the CUDA
// stream as an integer, so the build needs neither a CUDA torch nor torch's C++ headers.
#include <pybind11/pybind11.h>

#include "constants.h"

namespace py = pybind11;

void register_sparse(py::module_& m);
void register_quant(py::module_& m);

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "wweight CUDA kernels (raw-pointer pybind11 bindings)";
    wweight::export_constants(m);
    register_sparse(m);
    register_quant(m);
}
