// CUDA kernels of the iso op family (see wweight/iso.py for the public op and its reference).
//
// Intentionally empty: isotropic merging is GEMMs plus small symmetric eigendecompositions, which
// cuBLAS / cuSOLVER (through torch) already run at peak, and the one memory-bound step (building the
// task vectors, their sum and a NaN/Inf count) is a fused Triton kernel (kernels/iso.py). A CUDA
// kernel here would have to register a self-test with wweight._dispatch.register_selftest.
#include <pybind11/pybind11.h>
namespace py = pybind11;

void register_iso(py::module_& m) {
    (void)m;
}
