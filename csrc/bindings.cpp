// One pybind11 module, wweight._cuda, for every op family that has CUDA kernels (sparse, quant;
// iso and permute run on cuBLAS / cuSOLVER through torch). Each family's .cu file defines its
// register_* function; kernels take raw device pointers (uintptr_t) plus the CUDA
// stream as an integer, so the build needs neither a CUDA torch nor torch's C++ headers.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "constants.h"

namespace py = pybind11;

void register_sparse(py::module_& m);
void register_quant(py::module_& m);
void register_lap_auction(py::module_& m);
void register_lap(py::module_& m);

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "wweight CUDA kernels (raw-pointer pybind11 bindings)";
    wweight::export_constants(m);
    // the CUDA runtime this module was compiled and linked against (1000 * major + 10 * minor), and
    // the driver's: wweight._ext compares them with torch.version.cuda at import
    m.attr("CUDA_RUNTIME_VERSION") = CUDART_VERSION;
    m.def("cuda_driver_version", []() {
        int v = 0;
        return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;  // 0: no driver installed
    }, "the installed driver's CUDA version (0 without a driver)");
    register_sparse(m);
    register_quant(m);
    register_lap_auction(m);
    register_lap(m);
}
