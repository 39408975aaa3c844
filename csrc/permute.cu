// CUDA kernels of the permute op family (see wweight/permute.py for the public op and its reference).
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_permute(py::module_& m) {
}
