// Constants both extension modules (wweight._cuda, wweight._cpu) export, so that
// tests/test_build.py can check them against their Python copies (wweight/_ext.py DTYPE_CODES,
// wweight/sparse/plan.py BLOCK).
#pragma once
#include <pybind11/pybind11.h>

#include "dtype.h"
#include "sparse_elem.h"

namespace wweight {

inline void export_constants(pybind11::module_& m) {
    pybind11::dict codes;
    codes["float32"] = int(F32);
    codes["float16"] = int(F16);
    codes["bfloat16"] = int(BF16);
    codes["float64"] = int(F64);
    m.attr("DTYPE_CODES") = codes;
    m.attr("SPARSE_BLOCK") = elem::kBlock;
}

}  // namespace wweight
