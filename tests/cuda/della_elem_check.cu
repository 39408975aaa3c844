// Device-side compile check of csrc/della_elem.h (tests/test_della_fused.py::test_della_elem_compiles_for_sm90):
// the element logic of the fused DELLA path, as a CUDA DELLA kernel would call it (one thread per element of a
// row whose stable positions are known), for the two work dtypes. Not part of the extension.
#include "della_elem.h"

using namespace wweight::elem;

template <int DT, int WD>
__global__ void della_elem_check(const float* d, const long long* pos, long long m, float base_p, float eps,
                                 unsigned long long seed, unsigned int stream, float scale, float* out,
                                 double* norms) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= m) return;
    const DellaRow row = della_row<WD>(m, base_p, eps);
    float u[4];
    uniform4(i >> 2, seed, stream, u);
    const bool keep = u[i & 3] < della_prob<WD>(row, pos[i]);
    out[i] = della_apply<DT, WD>(d[i], keep, true, scale);
    CompSum s;
    s.add(fabs(double(d[i])));
    s.add(keep ? fabs(double(d[i])) : 0.0);
    norms[2 * i] = s.s;
    norms[2 * i + 1] = s.c;
}

template __global__ void della_elem_check<wweight::F32, wweight::F32>(const float*, const long long*, long long, float,
                                                                      float, unsigned long long, unsigned int, float,
                                                                      float*, double*);
template __global__ void della_elem_check<wweight::F16, wweight::F32>(const float*, const long long*, long long, float,
                                                                      float, unsigned long long, unsigned int, float,
                                                                      float*, double*);
template __global__ void della_elem_check<wweight::BF16, wweight::BF16>(const float*, const long long*, long long,
                                                                        float, float, unsigned long long, unsigned int,
                                                                        float, float*, double*);
