// The dtype codes of every kernel call in both extensions (wweight._cuda, wweight._cpu): the one
// table. Python's copy is wweight/_ext.py DTYPE_CODES; both modules export this enum as
// DTYPE_CODES and tests/test_layout.py checks that the two agree.
#pragma once

namespace wweight {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

}  // namespace wweight
