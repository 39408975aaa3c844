// The sparse CPU kernels (csrc/cpu/sparse_kernels.h) built for AVX2: setup.py compiles this file
// with -mavx2 on x86-64 (never -mfma: -ffp-contract=off keeps every product and sum rounded on its
// own, so this build gives the baseline's bits). Bound only where cpuid reports AVX2
// (sparse_cpu.cpp); elsewhere the table is empty.
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

#if defined(__AVX2__)
namespace ww_avx2 {
#include "sparse_kernels.h"
}

const wweight_cpu::SparseKernels& wweight_cpu::sparse_kernels_avx2() {
    static const SparseKernels k = ww_avx2::sparse_cpu::table("avx2");
    return k;
}
#else
const wweight_cpu::SparseKernels& wweight_cpu::sparse_kernels_avx2() {
    static const SparseKernels k{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    return k;
}
#endif
