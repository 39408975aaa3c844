// Exhaustive check, on the CPU, that the integer fp32 -> fp16 / bf16 rounding of
// csrc/sparse_elem.h (the CPU build's code) is IEEE round-to-nearest-even for every non-NaN fp32
// bit pattern, i.e. what the device's cvt.rn.f16.f32 (and cvt.rn.bf16.f32) returns. The device
// build uses the hardware conversion for fp16, so this is the proof that the two agree.
//   g++ -O2 -std=c++17 -Icsrc benchmarks/check_convert.cpp -o /tmp/check_convert && /tmp/check_convert
// (x86-64, GCC >= 12: _Float16 casts are IEEE RNE; bf16 against an independent RNE written below.)
#include <cstdio>
#include <cstring>

#include "sparse_elem.h"

using namespace wweight::elem;

// IEEE RNE to bf16 from first principles: the two bf16 neighbours of f (truncation and one ulp
// up, inf past the largest finite), the nearer in exact double arithmetic, ties to even.
static uint16_t bf16_rne_ref(float f) {
    const uint32_t u = f32_bits(f);
    const uint32_t t = u & 0xFFFF0000u;
    if (t == u) return uint16_t(u >> 16);
    const uint32_t up = t + 0x10000u;               // same sign, one ulp larger magnitude (or inf)
    // past the largest finite the next value "would be" 2^128: that midpoint rounds to inf (IEEE)
    const bool to_inf = (up & 0x7FFFFFFFu) == 0x7F800000u;
    const double dt = double(bits_f32(t)), df = double(f);
    const double du = to_inf ? (df > 0 ? 0x1p128 : -0x1p128) : double(bits_f32(up));
    const double et = df > dt ? df - dt : dt - df, eu = df > du ? df - du : du - df;
    if (et < eu) return uint16_t(t >> 16);
    if (eu < et) return uint16_t(up >> 16);
    return uint16_t(((t >> 16) & 1u) ? up >> 16 : t >> 16);
}

int main() {
    unsigned long long bad16 = 0, badbf = 0, bad16back = 0;
    for (unsigned long long i = 0; i < (1ull << 32); ++i) {
        const uint32_t u = uint32_t(i);
        const float f = bits_f32(u);
        if (f != f) continue;                        // NaN: device code has its own exact rule
        _Float16 h = static_cast<_Float16>(f);
        uint16_t hb;
        std::memcpy(&hb, &h, 2);
        if (f32_to_f16(f) != hb) ++bad16;
        const uint16_t bb = bf16_rne_ref(f);
        if (f32_to_bf16(f) != bb) ++badbf;
        if (i < 65536) {                             // every fp16 pattern back to fp32
            _Float16 hh;
            const uint16_t x = uint16_t(i);
            std::memcpy(&hh, &x, 2);
            const float want = static_cast<float>(hh);
            const float got = f16_to_f32(x);
            if (want == want && f32_bits(got) != f32_bits(want)) ++bad16back;
        }
    }
    std::printf("non-NaN fp32 patterns: f32_to_f16 mismatches %llu, f32_to_bf16 mismatches %llu, "
                "f16_to_f32 mismatches %llu\n", bad16, badbf, bad16back);
    return (bad16 || badbf || bad16back) ? 1 : 0;
}
