// CUDA kernels of the iso op family (see wweight/iso.py for the public op and its reference).
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_iso(py::module_& m) {
}
