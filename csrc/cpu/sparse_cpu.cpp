// CPU (OpenMP) kernels of the sparse family: the four primitives of wweight/sparse/plan.py
// (digit_hist, tie_counts, rescale_stats, merge) over raw host pointers, one pass per primitive and
// no temporaries. The kernels are csrc/cpu/sparse_kernels.h, built three times: here for the
// baseline target, in sparse_cpu_avx2.cpp with -mavx2 and in sparse_cpu_avx512.cpp with AVX-512;
// the widest table the CPU runs is bound (same source, same bits). Element logic is shared with
// the CUDA kernels (csrc/sparse_elem.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "sparse_args.h"

namespace ww_base {
#include "sparse_kernels.h"
}

namespace py = pybind11;
using wweight_cpu::SparseIn;
using wweight_cpu::SparseKernels;
using wweight_cpu::SparsePlan;

const SparseKernels& wweight_cpu::sparse_kernels_base() {
    static const SparseKernels k = ww_base::sparse_cpu::table("baseline");
    return k;
}

namespace {

using ww_base::wweight::elem::uniform4;

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();   // (its cpuid checks include the OS's XCR0 state for the AVX-512 registers)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return false;
#endif
}

// A build by name, when this CPU can run it and the extension has it; else nullptr.
const SparseKernels* build_named(const std::string& name) {
    if (name == "baseline") return &wweight_cpu::sparse_kernels_base();
    if (name == "avx2" && cpu_has_avx2() && wweight_cpu::sparse_kernels_avx2().isa != nullptr)
        return &wweight_cpu::sparse_kernels_avx2();
    if (name == "avx512" && cpu_has_avx512() && wweight_cpu::sparse_kernels_avx512().isa != nullptr)
        return &wweight_cpu::sparse_kernels_avx512();
    return nullptr;
}

// The best table for this CPU: AVX-512, else AVX2 where cpuid says so (and the build has it), else
// the baseline. All three give the same bits.
const SparseKernels* best_kernels() {
    for (const char* name : {"avx512", "avx2"})
        if (const SparseKernels* k = build_named(name)) return k;
    return &wweight_cpu::sparse_kernels_base();
}

const SparseKernels*& current() {
    static const SparseKernels* k = best_kernels();
    return k;
}

const SparseKernels& kernels() { return *current(); }

// Pick a build by name ("baseline", "avx2", "avx512" or "auto"); returns the previous one's name.
// Tests run every build on the same inputs and compare the bits.
std::string use_isa(const std::string& name) {
    const std::string prev = kernels().isa;
    const SparseKernels* k = name == "auto" ? best_kernels() : build_named(name);
    if (k == nullptr)
        throw std::invalid_argument("isa: expected 'auto', 'baseline' or an ISA this CPU and build have "
                                    "('avx2', 'avx512'), got '" + name + "'");
    current() = k;
    return prev;
}

SparseIn make_in(const std::vector<uintptr_t>& xs, uintptr_t base, int64_t n) {
    SparseIn in;
    for (auto p : xs) in.xs.push_back(reinterpret_cast<const void*>(p));
    in.base = reinterpret_cast<const void*>(base);
    in.n = n;
    return in;
}

SparsePlan make_plan(int mode, uintptr_t kp, uintptr_t ties, int64_t n, std::vector<float> density, uint64_t seed,
                     uint32_t stream0, uintptr_t keep_bits) {
    const int64_t nblocks = (n + ww_base::sparse_cpu::BLOCK - 1) / ww_base::sparse_cpu::BLOCK;
    return SparsePlan{mode, reinterpret_cast<const int64_t*>(kp), reinterpret_cast<const int64_t*>(ties), nblocks,
                      std::move(density), seed, stream0,
                      mode == ww_base::wweight::elem::MODE_RANDOM ? reinterpret_cast<uint32_t*>(keep_bits) : nullptr,
                      (n + 31) / 32};
}

void digit_hist(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, std::vector<int64_t> qmodel,
                std::vector<int64_t> prefix, int shift, int nbits, int high_shift, bool has_prefix, uintptr_t out) {
    SparseIn in = make_in(xs, base, n);
    py::gil_scoped_release nogil;
    kernels().digit_hist(in, dt, qmodel, prefix, shift, nbits, high_shift, has_prefix, reinterpret_cast<int64_t*>(out));
}

void select_keys(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, std::vector<int64_t> qmodel,
                 std::vector<int64_t> ks, uintptr_t res, uintptr_t ties) {
    SparseIn in = make_in(xs, base, n);
    py::gil_scoped_release nogil;
    kernels().select(in, dt, qmodel, ks, reinterpret_cast<int64_t*>(res), reinterpret_cast<int64_t*>(ties));
}

void tie_counts(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, std::vector<int64_t> qmodel,
                std::vector<int64_t> qkey, uintptr_t out) {
    SparseIn in = make_in(xs, base, n);
    py::gil_scoped_release nogil;
    kernels().tie_counts(in, dt, qmodel, qkey, reinterpret_cast<int64_t*>(out));
}

void rescale_stats(std::vector<uintptr_t> xs, uintptr_t base, int dt, int64_t n, int mode, uintptr_t kp,
                   uintptr_t ties, std::vector<float> density, uint64_t seed, uint32_t stream0, int norm,
                   uintptr_t out, uintptr_t keep_bits) {
    SparseIn in = make_in(xs, base, n);
    SparsePlan p = make_plan(mode, kp, ties, n, density, seed, stream0, keep_bits);
    py::gil_scoped_release nogil;
    kernels().rescale_stats(in, dt, p, norm, reinterpret_cast<double*>(out));
}

void merge(std::vector<uintptr_t> xs, uintptr_t base, uintptr_t out, int dt, int64_t n, int mode, uintptr_t kp,
           uintptr_t ties, std::vector<float> density, uint64_t seed, uint32_t stream0, std::vector<float> weights,
           std::vector<float> scales, float lam, float divisor_nc, bool consensus, bool normalize,
           bool sparsify_only, bool round16, uintptr_t flags, uintptr_t keep_bits) {
    SparseIn in = make_in(xs, base, n);
    SparsePlan p = make_plan(mode, kp, ties, n, density, seed, stream0, keep_bits);
    py::gil_scoped_release nogil;
    kernels().merge(in, reinterpret_cast<void*>(out), p, dt, weights, scales, lam, divisor_nc, consensus, normalize,
                    sparsify_only, round16, reinterpret_cast<int32_t*>(flags));
}

// Philox uniforms for flat indices [start, start + n) of stream s (tests compare with the torch stream).
void philox_uniform(uint64_t seed, uint32_t stream, int64_t start, int64_t n, uintptr_t out) {
    float* o = reinterpret_cast<float*>(out);
    for (int64_t i = 0; i < n; ++i) {
        float u[4];
        int64_t idx = start + i;
        uniform4(idx >> 2, seed, stream, u);
        o[i] = u[idx & 3];
    }
}

}  // namespace

void register_sparse_cpu(py::module_& m) {
    m.def("sparse_digit_hist", &digit_hist);
    m.def("sparse_select", &select_keys);
    m.def("sparse_tie_counts", &tie_counts);
    m.def("sparse_rescale_stats", &rescale_stats,
          "DARE / DARE-TIES statistics; keep_bits != 0 (random mode): also write the drawn keep masks there");
    m.def("sparse_merge", &merge, "the fused merge; keep_bits != 0 (random mode): masks from rescale_stats");
    m.def("philox_uniform", &philox_uniform);
    m.def("sparse_isa", [] { return std::string(kernels().isa); },
          "which build of the sparse kernels runs: 'avx512', 'avx2' or 'baseline'");
    m.def("sparse_use_isa", &use_isa, "pick the build by name ('auto', 'baseline', 'avx2', 'avx512'); returns the previous one");
}
