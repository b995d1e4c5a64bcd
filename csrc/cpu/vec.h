// SIMD helpers of the CPU kernels: the vector type sized to the ISA (vector_width.h), loads
// and stores, the vectorised exp, horizontal reductions; and the dtype dispatch and row
// conversions every kernel file uses.
#pragma once
// ATen's core headers only (torch/extension.h, with pybind11, is the binding's: bindings.cpp)
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__AVX512F__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "vector_width.h"

namespace zm {

// The vector width (ZM_VBYTES) follows the ISA: see vector_width.h.
typedef float vf __attribute__((vector_size(ZM_VBYTES)));
typedef float vfu __attribute__((vector_size(ZM_VBYTES), aligned(4)));
typedef int vi __attribute__((vector_size(ZM_VBYTES)));
constexpr int VL = ZM_VBYTES / 4;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();
constexpr float NAN_F = std::numeric_limits<float>::quiet_NaN();
constexpr float LOG2E = 1.44269504088896341f;

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// 4 floats whatever the ISA (rows of few rotary pairs, 4 x 4 transposes); unaligned.
typedef float f4 __attribute__((vector_size(16)));
typedef float f4u __attribute__((vector_size(16), aligned(4)));
static inline f4 ld4(const float* p) { return *reinterpret_cast<const f4u*>(p); }
static inline void st4(float* p, f4 v) { *reinterpret_cast<f4u*>(p) = v; }
#ifdef __AVX512F__
static inline vf vset(float x) { vf v = {}; return v + x; }
#else
// x - (+0) is x for every x (-0 too), so GCC makes this one broadcast, straight from memory
// where x is loaded; 0 + x is not x for x = -0, so {} + x costs a scalar add first.
static inline vf vset(float x) { return x - vf{}; }
#endif

// e^x for a vector of floats as 2^(x log2 e): the Cephes exp2f polynomial on [-1/2, 1/2]
// (~2 ulp), the exponent put in by vscalefps under AVX-512 (else by integer bits).  Exactly
// 0 below -87 (incl. -inf), so no denormal reaches the P V product.  Forward and backward
// use this one function, so the backward's recomputed P is the forward's.
#ifdef __AVX512F__
static inline vf vexp(vf x) {
  // lanes below -87 (and -inf) come out 0 through the mask of the final scalef; NaN lanes
  // are put back as NaN at the end (a kernel never hides a NaN: README, "NaN, lengths and limits")
  const __mmask16 live = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __mmask16 nan = _mm512_cmp_ps_mask((__m512)x, (__m512)x, _CMP_UNORD_Q);
  vf t = x * LOG2E;
  t = t < 127.0f ? t : vset(127.0f);
  const __m512 xm = (__m512)t;
  // (the zero-masking form with an all-ones mask: the plain one trips GCC 12's
  // -Wmaybe-uninitialized inside its own header)
  const __m512 n = _mm512_maskz_roundscale_ps(static_cast<__mmask16>(0xFFFF), xm,
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = (vf)_mm512_sub_ps(xm, n);
  vf p = vset(1.535336188319500E-4f);
  p = p * f + 1.339887440266574E-3f;
  p = p * f + 9.618437357674640E-3f;
  p = p * f + 5.550332471162809E-2f;
  p = p * f + 2.402264791363012E-1f;
  p = p * f + 6.931472028550421E-1f;
  vf y = p * f + 1.0f;
  return (vf)_mm512_mask_mov_ps(_mm512_maskz_scalef_ps(live, (__m512)y, n), nan, (__m512)x);
}
#else
// x[0..U) = e^x[u], U exps a step each: one exp is a chain of ~15 dependent ops, and
// interleaving U of them step by step keeps the FP scheduler fed (U = 4 was ~17% faster
// than one after another on Zen 1).  For x <= 88 only (the softmax's x = s - max and
// s - lse are <= 0): lanes below -87 (and -inf) are set to 0 at the end, whatever the
// steps made of them (an exponent out of range, inf or NaN: never a denormal, as
// (n + 127) << 23 has zero mantissa bits).  NaN stays NaN.
template <int U>
static inline void vexp_n(vf* x) {
  const vf magic = vset(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  vi dead[U];
  vf t[U], tn[U], f[U], p[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    dead[u] = x[u] < -87.0f;
    t[u] = x[u] * LOG2E;
    tn[u] = t[u] + magic;  // n in the low mantissa bits
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    f[u] = t[u] - (tn[u] - magic);
    p[u] = f[u] * 1.535336188319500E-4f + 1.339887440266574E-3f;
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * f[u] + 9.618437357674640E-3f;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * f[u] + 5.550332471162809E-2f;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * f[u] + 2.402264791363012E-1f;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = p[u] * f[u] + 6.931472028550421E-1f;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const vf y = p[u] * f[u] + 1.0f;
    // 2^n: the bits of tn are those of magic (0x4B400000) + n, and 0x4B400000 << 23 wraps
    // to 0, so (bits(tn) + 127) << 23 is (n + 127) << 23 without a float -> int conversion
    const vi bits = ((vi)tn[u] + 127) << 23;
    x[u] = dead[u] ? vset(0.0f) : y * (vf)bits;  // GCC vector cast = bit cast
  }
}
static inline vf vexp(vf x) {
  vexp_n<1>(&x);
  return x;
}
#endif

// Horizontal max / sum of one vector as a shuffle tree (log2(VL) shuffles + ops; GCC turns
// a plain loop over the lanes into a serial chain of VL - 1 scalar ops, which was a fifth
// of the softmax's time).  swap_halves(v, w) swaps neighbouring groups of w lanes.
static inline vf swap_halves(vf v, int w) {
#if ZM_VBYTES == 64
  switch (w) {
    case 8: return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    case 4: return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    case 2: return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    default: return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  }
#elif ZM_VBYTES == 32
  switch (w) {
    case 4: return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    case 2: return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    default: return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  }
#else
  switch (w) {
    case 2: return __builtin_shufflevector(v, v, 2, 3, 0, 1);
    default: return __builtin_shufflevector(v, v, 1, 0, 3, 2);
  }
#endif
}
static inline float hmax(vf v) {
  for (int w = VL / 2; w >= 1; w /= 2) {
    const vf u = swap_halves(v, w);
    v = u > v ? u : v;
  }
  return v[0];
}
static inline float hsum(vf v) {
  for (int w = VL / 2; w >= 1; w /= 2) v += swap_halves(v, w);
  return v[0];
}

template <typename F>
static void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "zeromask cpp backend: dtype ", st, " is not supported "
                                "(float32, bfloat16, float16)");
  }
}

template <typename T>
static inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
static inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

}  // namespace zm
