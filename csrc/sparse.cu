// CUDA kernels of the sparse op family (see wweight/sparse.py for the public op and its reference).
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_sparse(py::module_& m) {
}
