// The sparse CPU kernels' arguments and entry points, in plain std types: the baseline, AVX2 and
// AVX-512 builds (sparse_cpu.cpp, sparse_cpu_avx2.cpp, sparse_cpu_avx512.cpp) of
// csrc/cpu/sparse_kernels.h each fill one SparseKernels table; sparse_cpu.cpp binds the widest
// table the CPU supports.
#pragma once
#include <cstdint>
#include <vector>

// 1 where this translation unit is compiled for the AVX-512 subsets the AVX-512 build uses (F, BW,
// VL, DQ; setup.py), else 0: the one test every 512-bit code path is guarded by.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define WW_AVX512 1
#else
#define WW_AVX512 0
#endif

namespace wweight_cpu {

struct SparseIn {
    std::vector<const void*> xs;   // the K inputs
    const void* base;              // or null: the inputs are the deltas
    int64_t n;
};

struct SparsePlan {
    int mode;
    const int64_t* kp;      // (K, 6): key_lo, key_hi, a, b, c, e (wweight/sparse/plan.py)
    const int64_t* ties;    // (K, 2, nblocks) or null
    int64_t nblocks;
    std::vector<float> density;
    uint64_t seed;
    uint32_t stream0;
    // MODE_RANDOM: (K, words) keep bits (element i of model t = bit i & 31 of word t * words + i / 32)
    // or null. rescale_stats writes the masks it draws there and merge reads them back, so a DARE
    // merge draws its Philox masks once, not once per pass (the draw is most of either pass).
    uint32_t* keep_bits;
    int64_t words;
};

using I64s = std::vector<int64_t>;
using F32s = std::vector<float>;

struct SparseKernels {
    const char* isa;
    void (*digit_hist)(const SparseIn&, int dt, const I64s& qmodel, const I64s& prefix, int shift, int nbits,
                       int high_shift, bool has_prefix, int64_t* hist);
    void (*tie_counts)(const SparseIn&, int dt, const I64s& qmodel, const I64s& qkey, int64_t* out);
    void (*rescale_stats)(const SparseIn&, int dt, const SparsePlan&, int norm, double* out);
    void (*merge)(const SparseIn&, void* out, const SparsePlan&, int dt, const F32s& weights, const F32s& scales,
                  float lam, float divisor_nc, bool consensus, bool normalize, bool sparsify_only, bool round16,
                  int32_t* flags);
    // exact k-th largest key per query, (Q, 4) rows (key, count_gt, count_eq, resolved) and the
    // (Q, nblocks) per-block counts of the key; resolved = 0: the caller runs the radix passes
    void (*select)(const SparseIn&, int dt, const I64s& qmodel, const I64s& ks, int64_t* res, int64_t* ties);
};

const SparseKernels& sparse_kernels_base();
const SparseKernels& sparse_kernels_avx2();   // sparse_cpu_avx2.cpp: the same source built with -mavx2
const SparseKernels& sparse_kernels_avx512();   // sparse_cpu_avx512.cpp: built with -mavx512{f,bw,vl,dq}

}  // namespace wweight_cpu
