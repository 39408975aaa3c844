// CUDA kernels of the quant op family (see wweight/quant.py for the public op and its reference).
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_quant(py::module_& m) {
}
