// Constants both extension modules (wweight._cuda, wweight._cpu) export, so that
// tests/test_layout.py can check them against their Python copies (wweight/_ext.py DTYPE_CODES,
// wweight/sparse/plan.py BLOCK and MODE_*).
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
    pybind11::dict modes;
    modes["MODE_NONE"] = int(elem::MODE_NONE);
    modes["MODE_WINDOW"] = int(elem::MODE_WINDOW);
    modes["MODE_RANDOM"] = int(elem::MODE_RANDOM);
    m.attr("SPARSE_MODES") = modes;
}

}  // namespace wweight
