// CPU (OpenMP) kernels of the quant family: blockwise RTN quantize (block statistics of the
// non-outlier elements, stored scale / zero, codes, big-endian bit packing) and dequantize, over
// raw host pointers. Glue: wweight/backends/cpu/quant.py; semantics: wweight/reference/quant.py;
// element formulas shared with the CUDA build: csrc/quant_elem.h.
//
// quant_quantize: one pass per cache-resident tile. A tile is a whole number of blocks and of
// groups of 8 codes (lcm(block_size, 8) elements, grown to ~16K elements), so tiles never share an
// output byte or a block; per block of the tile the statistics, the stored scale / zero and the
// codes follow each other while the block is in L1, then the tile's codes are packed. Blocks too
// large for that (lcm > kTileMax) take two passes: per-chunk statistics, then codes.
// quant_dequantize: per tile, the packed bytes are unpacked with shifts into a code buffer and
// turned into values block segment by block segment (plain loops the compiler vectorises).
//
// Bits: every result equals the torch backend's (and the reference's): float32 arithmetic with one
// rounding per operation (contraction off below, no fast-math), round half to even, the scale
// rounded to its storage dtype before the codes use it. NaN among a block's kept elements makes
// its statistics NaN (torch's amin / amax propagate it), which wweight.quantize detects.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <pybind11/pybind11.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../quant_elem.h"
#include "../sparse_elem.h"

namespace py = pybind11;
using namespace wweight::elem;
using namespace wweight::quant_elem;

namespace {

constexpr int64_t kTile = 16384;      // elements per tile (64 KiB of float32): stays in L2
constexpr int64_t kTileMax = 65536;   // largest lcm(block_size, 8) the one-pass path takes
constexpr int64_t kSerial = 1 << 16;  // below this many elements: no OpenMP fork
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Stats {
    float lo = kInf, hi = -kInf, amax = 0.f;
    bool nan = false;
    void merge(const Stats& o) {
        lo = o.lo < lo ? o.lo : lo;
        hi = o.hi > hi ? o.hi : hi;
        amax = o.amax > amax ? o.amax : amax;
        nan |= o.nan;
    }
};

// Elements [a, a + len) of x as float32: x itself for float32, else converted into buf.
template <int DT>
inline const float* as_f32(const void* x, int64_t a, int64_t len, float* buf) {
    if constexpr (DT == F32) {
        (void)len;
        (void)buf;
        return static_cast<const float*>(x) + a;
    } else {
        const uint16_t* h = static_cast<const uint16_t*>(x) + a;
        for (int64_t i = 0; i < len; ++i) {
            if constexpr (DT == BF16) {
                buf[i] = bf16_to_f32(h[i]);
            } else {
                buf[i] = f16_to_f32(h[i]);
            }
        }
        return buf;
    }
}

// Min / max (asymmetric) or absmax (symmetric) of v[0, len), outliers (|v| >= thr when excl, or
// m[i] != 0) left out. NaN is tracked apart (a compare drops it). x < lo ? x : lo is exactly
// SSE's minps (and x > hi ? x : hi maxps), so the vector loop below and the scalar tail agree on
// every input; compilers do not vectorise these reductions themselves (NaN semantics).
template <bool SYM>
inline void stats_one(float x, bool out, float& lo, float& hi, float& am, int& nan) {
    const float a = std::fabs(x);
    if constexpr (SYM) {
        const float xa = out ? 0.f : a;
        am = xa > am ? xa : am;
    } else {
        const float xl = out ? kInf : x, xh = out ? -kInf : x;
        lo = xl < lo ? xl : lo;
        hi = xh > hi ? xh : hi;
    }
    nan |= (!out) & (x != x);
}

template <bool SYM>
void stats_add(const float* v, int64_t len, const uint8_t* m, bool excl, float thr, Stats& st) {
    float lo = st.lo, hi = st.hi, am = st.amax;
    int nan = 0;
    int64_t i = 0;
#if defined(__SSE2__)
    {
        __m128 vlo = _mm_set1_ps(lo), vhi = _mm_set1_ps(hi), vam = _mm_set1_ps(am), vnan = _mm_setzero_ps();
        const __m128 absm = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
        const __m128 vthr = _mm_set1_ps(thr), vinf = _mm_set1_ps(kInf), vninf = _mm_set1_ps(-kInf);
        const __m128i zi = _mm_setzero_si128();
        const bool any_out = excl || m != nullptr;
        for (; i + 4 <= len; i += 4) {
            const __m128 x = _mm_loadu_ps(v + i);
            const __m128 a = _mm_and_ps(x, absm);
            __m128 out = _mm_setzero_ps();
            if (any_out) {
                if (excl) out = _mm_cmpge_ps(a, vthr);
                if (m != nullptr) {
                    int32_t m4;
                    std::memcpy(&m4, m + i, 4);
                    __m128i mi = _mm_unpacklo_epi8(_mm_cvtsi32_si128(m4), zi);
                    mi = _mm_unpacklo_epi16(mi, zi);
                    // lanes whose byte is nonzero: not (== 0)
                    out = _mm_or_ps(out, _mm_andnot_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(mi, zi)),
                                                       _mm_castsi128_ps(_mm_set1_epi32(-1))));
                }
            }
            if constexpr (SYM) {
                vam = _mm_max_ps(_mm_andnot_ps(out, a), vam);
            } else {
                vlo = _mm_min_ps(_mm_or_ps(_mm_and_ps(out, vinf), _mm_andnot_ps(out, x)), vlo);
                vhi = _mm_max_ps(_mm_or_ps(_mm_and_ps(out, vninf), _mm_andnot_ps(out, x)), vhi);
            }
            vnan = _mm_or_ps(vnan, _mm_andnot_ps(out, _mm_cmpunord_ps(x, x)));
        }
        float l4[4], h4[4], a4[4];
        _mm_storeu_ps(l4, vlo);
        _mm_storeu_ps(h4, vhi);
        _mm_storeu_ps(a4, vam);
        for (int k = 0; k < 4; ++k) {
            lo = l4[k] < lo ? l4[k] : lo;
            hi = h4[k] > hi ? h4[k] : hi;
            am = a4[k] > am ? a4[k] : am;
        }
        nan |= _mm_movemask_ps(vnan) != 0;
    }
#endif
    for (; i < len; ++i) {
        const bool out = (excl && std::fabs(v[i]) >= thr) || (m != nullptr && m[i] != 0);
        stats_one<SYM>(v[i], out, lo, hi, am, nan);
    }
    st.lo = lo;
    st.hi = hi;
    st.amax = am;
    st.nan |= nan != 0;
}

// Stored scale / zero of a block (rounded to storage dtype S, written to scale[b] / zero[b]);
// returns their float32 values in s, z.
template <int S>
void store_scale(Stats st, int bits, bool sym, float clip, void* scale, void* zero, int64_t b, float& s, float& z) {
    if (st.nan) st.lo = st.hi = st.amax = NAN;
    block_scale(st.lo, st.hi, st.amax, bits, sym, clip, s, z);
    store_f32<S>(scale, b, s);
    s = load_f32<S>(scale, b);
    if (!sym) {
        store_f32<S>(zero, b, z);
        z = load_f32<S>(zero, b);
    }
}

// Codes of v[0, len) for one block's stored (s, z): code_of (csrc/quant_elem.h) with the block
// constants hoisted, so the loop is straight-line.
void code_segment(const float* v, int64_t len, float s, float z, bool sym, int bits, uint8_t* c) {
    if (!(s > 0.f)) {  // scale 0 (or NaN): the zero code
        std::memset(c, sym ? 1 << (bits - 1) : 0, (size_t)len);
        return;
    }
    if (sym) {
        const float half = (float)(1 << (bits - 1));
        for (int64_t i = 0; i < len; ++i) {
            const float q = clamp_nan_lo(fdiv(v[i], s), -half, half - 1.f);
            c[i] = (uint8_t)(int)(rint_small(q) + half);
        }
    } else {
        const float top = (float)((1 << bits) - 1);
        for (int64_t i = 0; i < len; ++i) {
            const float q = clamp_nan_lo(fdiv(fsub(v[i], z), s), 0.f, top);
            c[i] = (uint8_t)(int)rint_small(q);
        }
    }
}

// len codes (a multiple of 8) -> len * bits / 8 bytes of the big-endian bitstream.
void pack(const uint8_t* c, int64_t len, int bits, uint8_t* out) {
    if (bits == 8) {
        std::memcpy(out, c, (size_t)len);
    } else if (bits == 4) {
        for (int64_t j = 0; j < len / 2; ++j) out[j] = (uint8_t)((c[2 * j] << 4) | c[2 * j + 1]);
    } else if (bits == 2) {
        for (int64_t j = 0; j < len / 4; ++j)
            out[j] = (uint8_t)((c[4 * j] << 6) | (c[4 * j + 1] << 4) | (c[4 * j + 2] << 2) | c[4 * j + 3]);
    } else {
        for (int64_t g = 0; g < len / 8; ++g) {
            uint64_t w = 0;
            for (int j = 0; j < 8; ++j) w |= (uint64_t)c[8 * g + j] << (bits * (7 - j));
            for (int j = 0; j < bits; ++j) out[g * bits + j] = (uint8_t)(w >> (8 * (bits - 1 - j)));
        }
    }
}

// Inverse of pack: len codes (a multiple of 8) from len * bits / 8 bytes.
void unpack(const uint8_t* p, int64_t len, int bits, uint8_t* c) {
    if (bits == 8) {
        std::memcpy(c, p, (size_t)len);
    } else if (bits == 4) {
        for (int64_t j = 0; j < len / 2; ++j) {
            c[2 * j] = p[j] >> 4;
            c[2 * j + 1] = p[j] & 15;
        }
    } else if (bits == 2) {
        for (int64_t j = 0; j < len / 4; ++j) {
            const uint8_t b = p[j];
            c[4 * j] = b >> 6;
            c[4 * j + 1] = (b >> 4) & 3;
            c[4 * j + 2] = (b >> 2) & 3;
            c[4 * j + 3] = b & 3;
        }
    } else {
        const uint64_t mask = (1u << bits) - 1;
        for (int64_t g = 0; g < len / 8; ++g) {
            uint64_t w = 0;
            for (int j = 0; j < bits; ++j) w |= (uint64_t)p[g * bits + j] << (8 * (bits - 1 - j));
            for (int j = 0; j < 8; ++j) c[8 * g + j] = (uint8_t)((w >> (bits * (7 - j))) & mask);
        }
    }
}

int64_t lcm8(int64_t bs) {
    int64_t a = bs, b = 8;
    while (b) {
        const int64_t t = a % b;
        a = b;
        b = t;
    }
    return bs / a * 8;
}

// Codes of the tile [e0, e1) (e0 a multiple of 8) with per-block (s, z) from sz(b), packed.
template <int DT, typename SZ>
void code_tile(const void* x, int64_t e0, int64_t e1, int64_t bs, bool sym, int bits, SZ&& sz, float* fbuf,
               uint8_t* cbuf, uint8_t* out) {
    for (int64_t a = e0; a < e1;) {
        const int64_t b = a / bs, e = std::min(e1, (b + 1) * bs);
        float s, z;
        sz(b, s, z);
        code_segment(as_f32<DT>(x, a, e - a, fbuf), e - a, s, z, sym, bits, cbuf + (a - e0));
        a = e;
    }
    const int64_t len = (e1 - e0 + 7) / 8 * 8;
    std::memset(cbuf + (e1 - e0), 0, (size_t)(len - (e1 - e0)));  // padding: zero codes
    pack(cbuf, len, bits, out + e0 / 8 * bits);
}

template <int DT, int S, bool SYM>
void quantize_impl(const void* x, const uint8_t* mask, float thr, bool excl, int bits, int64_t bs, float clip,
                   void* scale, void* zero, uint8_t* out, int64_t n) {
    const int64_t nb = (n + bs - 1) / bs;
    const int64_t unit = lcm8(bs);
    if (unit <= kTileMax) {
        // one pass: tiles of whole blocks and whole groups
        const int64_t tile = std::max(unit, kTile / unit * unit);
        const int64_t nt = (n + tile - 1) / tile;
#pragma omp parallel if (n > kSerial)
        {
            std::vector<float> fbuf(DT == F32 ? 0 : (size_t)tile);
            std::vector<uint8_t> cbuf((size_t)tile + 8);
            std::vector<float> ts, tz;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < nt; ++t) {
                const int64_t e0 = t * tile, e1 = std::min(n, e0 + tile);
                const int64_t b0 = e0 / bs, b1 = (e1 + bs - 1) / bs;
                ts.resize((size_t)(b1 - b0));
                tz.resize((size_t)(b1 - b0));
                for (int64_t a = e0; a < e1;) {
                    const int64_t b = a / bs, e = std::min(e1, (b + 1) * bs);  // a == b * bs here
                    const float* v = as_f32<DT>(x, a, e - a, fbuf.data());
                    Stats st;
                    stats_add<SYM>(v, e - a, mask ? mask + a : nullptr, excl, thr, st);
                    float s, z;
                    store_scale<S>(st, bits, SYM, clip, scale, zero, b, s, z);
                    ts[(size_t)(b - b0)] = s;
                    tz[(size_t)(b - b0)] = z;
                    // codes now, while the block is in L1
                    code_segment(v, e - a, s, z, SYM, bits, cbuf.data() + (a - e0));
                    a = e;
                }
                const int64_t len = (e1 - e0 + 7) / 8 * 8;
                std::memset(cbuf.data() + (e1 - e0), 0, (size_t)(len - (e1 - e0)));
                pack(cbuf.data(), len, bits, out + e0 / 8 * bits);
            }
        }
        return;
    }
    // large blocks: per-(block, chunk) statistics, then the codes
    const int64_t ncb = (bs + kTile - 1) / kTile;
    std::vector<Stats> part((size_t)(nb * ncb));
    std::vector<float> s32((size_t)nb), z32((size_t)nb);
#pragma omp parallel if (n > kSerial)
    {
        std::vector<float> fbuf(DT == F32 ? 0 : (size_t)kTile);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < nb * ncb; ++it) {
            const int64_t b = it / ncb, a = b * bs + (it % ncb) * kTile;
            const int64_t e = std::min({n, (b + 1) * bs, a + kTile});
            if (a < e)
                stats_add<SYM>(as_f32<DT>(x, a, e - a, fbuf.data()), e - a, mask ? mask + a : nullptr, excl, thr,
                               part[(size_t)it]);
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            Stats st;
            for (int64_t k = 0; k < ncb; ++k) st.merge(part[(size_t)(b * ncb + k)]);
            store_scale<S>(st, bits, SYM, clip, scale, zero, b, s32[(size_t)b], z32[(size_t)b]);
        }
        std::vector<uint8_t> cbuf((size_t)kTile + 8);
        const int64_t nt = (n + kTile - 1) / kTile;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; ++t) {
            code_tile<DT>(x, t * kTile, std::min(n, (t + 1) * kTile), bs, SYM, bits,
                          [&](int64_t b, float& s, float& z) { s = s32[(size_t)b]; z = z32[(size_t)b]; },
                          fbuf.data(), cbuf.data(), out);
        }
    }
}

template <typename F>
void dispatch_scale(int sdt, F&& f) {
    dispatch_dt(sdt, std::forward<F>(f));
}

void quant_quantize(uintptr_t x, int dtype, uintptr_t mask, double thr, int bits, int64_t bs, bool sym, double clip,
                    uintptr_t scale, uintptr_t zero, int scale_dtype, uintptr_t out, int64_t n) {
    if (bits < 2 || bits > 8) throw std::invalid_argument("quant_quantize: bits must be in 2..8");
    if (bs <= 0) throw std::invalid_argument("quant_quantize: block_size must be > 0");
    if (n <= 0) return;
    const bool excl = std::isfinite(thr);
    const float t = excl ? (float)thr : 0.f;
    const float cl = clip > 0 ? (float)clip : -1.f;
    const void* xp = reinterpret_cast<const void*>(x);
    const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask);
    void* sp = reinterpret_cast<void*>(scale);
    void* zp = reinterpret_cast<void*>(zero);
    uint8_t* op = reinterpret_cast<uint8_t*>(out);
    py::gil_scoped_release nogil;
    dispatch_dt(dtype, [&](auto dt) {
        dispatch_scale(scale_dtype, [&](auto st) {
            if (sym)
                quantize_impl<decltype(dt)::value, decltype(st)::value, true>(xp, mp, t, excl, bits, bs, cl, sp, zp,
                                                                               op, n);
            else
                quantize_impl<decltype(dt)::value, decltype(st)::value, false>(xp, mp, t, excl, bits, bs, cl, sp,
                                                                                zp, op, n);
        });
    });
}

// Values of codes c[0, len) of one block segment, stored as DT at out + a.
template <int DT>
void value_segment(const uint8_t* c, int64_t len, float s, float z, bool sym, int bits, void* out, int64_t a,
                   float* fbuf) {
    float* f = DT == F32 ? static_cast<float*>(out) + a : fbuf;
    if (sym) {
        const float half = (float)(1 << (bits - 1));
        for (int64_t i = 0; i < len; ++i) f[i] = fmul((float)c[i] - half, s);
    } else {
        for (int64_t i = 0; i < len; ++i) f[i] = fmul((float)c[i], s) + z;
    }
    if constexpr (DT != F32) {
        for (int64_t i = 0; i < len; ++i) store_f32<DT>(out, a + i, f[i]);
    }
}

template <int DT>
void dequantize_impl(const uint8_t* p, const float* s32, const float* z32, void* out, int64_t n, int64_t bs,
                     int bits) {
    const int64_t nt = (n + kTile - 1) / kTile;
    const bool sym = z32 == nullptr;
#pragma omp parallel if (n > kSerial)
    {
        std::vector<uint8_t> cbuf((size_t)kTile);
        std::vector<float> fbuf(DT == F32 ? 0 : (size_t)kTile);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; ++t) {
            const int64_t e0 = t * kTile, e1 = std::min(n, e0 + kTile);
            unpack(p + e0 / 8 * bits, (e1 - e0 + 7) / 8 * 8, bits, cbuf.data());
            for (int64_t a = e0; a < e1;) {
                const int64_t b = a / bs, e = std::min(e1, (b + 1) * bs);
                value_segment<DT>(cbuf.data() + (a - e0), e - a, s32[b], sym ? 0.f : z32[b], sym, bits, out, a,
                                  fbuf.data());
                a = e;
            }
        }
    }
}

void quant_dequantize(uintptr_t packed, uintptr_t scale, uintptr_t zero, uintptr_t out, int dtype, int64_t n,
                      int64_t bs, int bits) {
    if (bits < 2 || bits > 8) throw std::invalid_argument("quant_dequantize: bits must be in 2..8");
    if (bs <= 0) throw std::invalid_argument("quant_dequantize: block_size must be > 0");
    if (n <= 0) return;
    const uint8_t* p = reinterpret_cast<const uint8_t*>(packed);
    const float* s = reinterpret_cast<const float*>(scale);
    const float* z = reinterpret_cast<const float*>(zero);
    void* o = reinterpret_cast<void*>(out);
    py::gil_scoped_release nogil;
    dispatch_dt(dtype, [&](auto dt) { dequantize_impl<decltype(dt)::value>(p, s, z, o, n, bs, bits); });
}

// ------------------------------------------------------------------------------ outlier indices
// The sorted flat indices of the elements held out of the quantization: float32 |x[i]| >= thr (a
// finite thr) or mask[i] != 0 (wweight/quant/outliers.py outlier_indices; for 16-bit x the same set as its
// compare in the weight's own dtype). Two passes over x replace torch's abs, compare and nonzero
// (four passes, one of them the slow serial nonzero): per chunk of kOutChunk elements a count,
// then, at each chunk's offset in the output, its indices in element order. Both passes test
// 64-element groups with a loop the compiler vectorises; the second only walks a group's lanes
// one by one where the group holds an outlier (0.1-1 % of elements: most groups hold none).
constexpr int64_t kOutChunk = 1 << 16;
constexpr int kOutGroup = 64;

template <int DT>
inline int outlier_group(const void* x, const uint8_t* m, float thr, int64_t a, int len, float* fbuf, uint8_t* f) {
    const float* v = as_f32<DT>(x, a, len, fbuf);
    int c = 0;
    if (m != nullptr) {
        for (int i = 0; i < len; ++i) {
            f[i] = uint8_t((std::fabs(v[i]) >= thr) | (m[a + i] != 0));
            c += f[i];
        }
    } else {
        for (int i = 0; i < len; ++i) {
            f[i] = uint8_t(std::fabs(v[i]) >= thr);
            c += f[i];
        }
    }
    return c;
}

template <int DT>
void outlier_pass(const void* x, const uint8_t* m, float thr, int64_t n, int64_t* counts, int64_t* out) {
    const int64_t nc = (n + kOutChunk - 1) / kOutChunk;
#pragma omp parallel if (n > kSerial)
    {
        alignas(64) float fbuf[kOutGroup];
        alignas(64) uint8_t f[kOutGroup];
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nc; ++c) {
            const int64_t e0 = c * kOutChunk, e1 = std::min(n, e0 + kOutChunk);
            int64_t k = out != nullptr ? counts[c] : 0;   // write pass: the chunk's exclusive offset
            for (int64_t a = e0; a < e1; a += kOutGroup) {
                const int len = int(std::min<int64_t>(kOutGroup, e1 - a));
                const int g = outlier_group<DT>(x, m, thr, a, len, fbuf, f);
                if (out == nullptr || g == 0) {
                    k += g;
                    continue;
                }
                for (int i = 0; i < len; ++i)
                    if (f[i]) out[k++] = a + i;
            }
            if (out == nullptr) counts[c] = k;
        }
    }
}

// counts: (ceil(n / 65536),) int64. out == 0: write each chunk's count there; else counts hold the
// exclusive prefix sums of those counts and out (their total) receives the indices.
void quant_outliers(uintptr_t x, int dtype, uintptr_t mask, double thr, int64_t n, uintptr_t counts, uintptr_t out) {
    if (n <= 0) return;
    // no finite threshold: only the mask counts (outlier_indices); |v| >= NaN is false for every v
    const float t = std::isfinite(thr) ? (float)thr : std::numeric_limits<float>::quiet_NaN();
    const void* xp = reinterpret_cast<const void*>(x);
    const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask);
    int64_t* cp = reinterpret_cast<int64_t*>(counts);
    int64_t* op = reinterpret_cast<int64_t*>(out);
    py::gil_scoped_release nogil;
    dispatch_dt(dtype, [&](auto dt) { outlier_pass<decltype(dt)::value>(xp, mp, t, n, cp, op); });
}

}  // namespace

void register_quant_cpu(py::module_& m) {
    m.def("quant_quantize", &quant_quantize,
          "blockwise RTN: statistics, stored scale / zero (scale_dtype), codes and packing, one pass per tile",
          py::arg("x"), py::arg("dtype"), py::arg("mask"), py::arg("thr"), py::arg("bits"), py::arg("bs"),
          py::arg("sym"), py::arg("clip"), py::arg("scale"), py::arg("zero"), py::arg("scale_dtype"),
          py::arg("out"), py::arg("n"));
    m.def("quant_outliers", &quant_outliers,
          "flat indices of float32 |x| >= thr or mask: per-chunk counts (out = 0), then the indices",
          py::arg("x"), py::arg("dtype"), py::arg("mask"), py::arg("thr"), py::arg("n"), py::arg("counts"),
          py::arg("out"));
    m.def("quant_dequantize", &quant_dequantize, "packed codes + float32 scale / zero -> values of dtype",
          py::arg("packed"), py::arg("scale"), py::arg("zero"), py::arg("out"), py::arg("dtype"), py::arg("n"),
          py::arg("bs"), py::arg("bits"));
}
