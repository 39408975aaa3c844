// The sparse CPU kernels (csrc/cpu/sparse_kernels.h) built for AVX-512 (F, BW, VL, DQ): setup.py
// compiles this file with those flags and -mprefer-vector-width=512 on x86-64. -ffp-contract=off,
// as for every build, keeps each product and sum rounded on its own, so this build gives the
// baseline's bits (tests/test_sparse_cpu_select.py compares the three builds). The compiler's
// vectorisation of the tile loops widens, which took the merge pass from 33-36 to 25-29 ms (16M x 4,
// a Xeon with AVX-512, alternating builds). Two hand-written loops have 512-bit forms: the Philox
// keep masks (sparse_tiles.h random_keep_avx512: DARE's fp32 statistics pass 59-77 -> 42-45 ms) and
// the select's bracket compaction (sparse_select.h compact_bracket); the other explicit intrinsics
// stay 256-bit. Bound only where cpuid reports all four (sparse_cpu.cpp); elsewhere the table is empty.
#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "sparse_args.h"

#if WW_AVX512
namespace ww_avx512 {
#include "sparse_kernels.h"
}

const wweight_cpu::SparseKernels& wweight_cpu::sparse_kernels_avx512() {
    static const SparseKernels k = ww_avx512::sparse_cpu::table("avx512");
    return k;
}
#else
const wweight_cpu::SparseKernels& wweight_cpu::sparse_kernels_avx512() {
    static const SparseKernels k{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    return k;
}
#endif
