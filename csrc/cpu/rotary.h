// f0 rotary on the CPU: the per-call angle tables (cos, sin, dphi/dtheta in double, rounded
// once to float) and the rotation of one row, forward and backward.
#pragma once
#include "vec.h"

namespace zm {

struct RotTable {
  // (B, L, R/2) each (make_table), or (B, R/2, Lp) for cs and sn (make_table_by_freq);
  // empty when there is no rotary on that side.
  std::vector<float> cs, sn, dpdt;
  int64_t L = 0, half = 0, Lp = 0;
  bool on = false;
  const float* c(int64_t b, int64_t t) const { return cs.data() + (b * L + t) * half; }
  const float* s(int64_t b, int64_t t) const { return sn.data() + (b * L + t) * half; }
  const float* d(int64_t b, int64_t t) const { return dpdt.data() + (b * L + t) * half; }
  // by frequency: cos / sin of pair i for positions 0 .. Lp of batch b
  const float* cf(int64_t b, int64_t i) const { return cs.data() + (b * half + i) * Lp; }
  const float* sf(int64_t b, int64_t i) const { return sn.data() + (b * half + i) * Lp; }
};

// ratio = theta^(-2/R) in double, once per run of equal theta (constant theta, e.g. a text
// rotary, costs one exp and one log per row of B, not per position)
static inline double theta_ratio(double theta, int64_t R, double& last_theta, double& last) {
  if (theta != last_theta) {
    last_theta = theta;
    last = std::exp(-2.0 / static_cast<double>(R) * std::log(theta));
  }
  return last;
}

// sin(phi), cos(phi) rounded once to float: phi reduced in double to y in [-pi/4, pi/4] and
// its quadrant, then the Taylor series of sin and cos to y^13 / y^14 in double (truncation
// < 1e-13): as accurate as libm's sinf/cosf, in loops GCC vectorises (libm's scalar cosf +
// sinf took ~6 ns an angle).  Split in two so each loop vectorises.
constexpr double HALF_PI = 1.570796326794896619231;
static inline double reduce_angle(double phi, int32_t& quad) {
  const double k = std::nearbyint(phi * (1.0 / HALF_PI));
  // k mod 4 in [0, 4), exactly ((int64) k & 3, without a vector int64 conversion)
  quad = static_cast<int32_t>(k - 4.0 * std::floor(k * 0.25));
  return phi - HALF_PI * k;
}
static inline void sin_cos_reduced(double x, int32_t q, float& sn, float& cs) {
  const double z = x * x;
  const double sp = x * (1.0 + z * (-1.0 / 6 + z * (1.0 / 120 + z * (-1.0 / 5040 + z * (
      1.0 / 362880 + z * (-1.0 / 39916800 + z * (1.0 / 6227020800.0)))))));
  const double cp = 1.0 + z * (-0.5 + z * (1.0 / 24 + z * (-1.0 / 720 + z * (
      1.0 / 40320 + z * (-1.0 / 3628800 + z * (1.0 / 479001600 + z * (
      -1.0 / 87178291200.0)))))));
  // phi = y + q pi/2 (mod 2 pi)
  const double sv = (q & 1) ? cp : sp, cv = (q & 1) ? sp : cp;
  sn = static_cast<float>((q & 2) ? -sv : sv);
  cs = static_cast<float>(((q + 1) & 2) ? -cv : cv);
}

// phi_i = pos * theta^(-2i/R); dphi_i/dtheta = -pos * (2i/R) * w_i / theta.  In double.
static RotTable make_table(const std::optional<at::Tensor>& theta,
                           const std::optional<at::Tensor>& pos, int64_t B, int64_t L,
                           int64_t R, bool need_grad) {
  // (theta, pos: float32 (B, L) contiguous, both or neither: zm_args checked them)
  RotTable t;
  if (!theta.has_value()) return t;
  t.on = true;
  t.L = L;
  t.half = R / 2;
  const int64_t half = R / 2;
  t.cs.resize(B * L * half);
  t.sn.resize(B * L * half);
  if (need_grad) t.dpdt.resize(B * L * half);
  const float* th = theta->data_ptr<float>();
  const float* ps = pos->data_ptr<float>();
  // Chunks of >= 16k angles (~0.1 ms): smaller tables stay serial, as a parallel region's
  // thread wake-up would cost more than it saves; at L = 2048, D = 64 the table (~0.4 ms
  // serial) was most of the standalone rotary op's time.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(half, 1));
  at::parallel_for(0, B * L, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> wv(half), y(half);
    std::vector<int32_t> quad(half);
    double last_theta = std::numeric_limits<double>::quiet_NaN(), last = 0.0;
    for (int64_t row = lo; row < hi; ++row) {
      // w_i = theta^(-2i/R) = ratio^i, by repeated multiplication in double (error ~ i ulp
      // of a double); phi = pos * w_i
      const double ratio = theta_ratio(th[row], R, last_theta, last);
      const double p = ps[row];
      double w = 1.0;
      for (int64_t i = 0; i < half; ++i, w *= ratio) wv[i] = w;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) y[i] = reduce_angle(p * wv[i], quad[i]);
      float* cs = t.cs.data() + row * half;
      float* sn = t.sn.data() + row * half;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) sin_cos_reduced(y[i], quad[i], sn[i], cs[i]);
      if (need_grad) {
        float* dp = t.dpdt.data() + row * half;
        const double th_r = th[row];
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const double e = -2.0 * static_cast<double>(i) / static_cast<double>(R);
          dp[i] = static_cast<float>(p * e * wv[i] / th_r);
        }
      }
    }
  });
  return t;
}

// The table of make_table (without dphi/dtheta) laid out by frequency, for kernels that
// rotate VL positions at once: cf(b, i)[t] = cos(phi_i) of position t, t < Lp = L rounded up
// to VL (positions past L: cos 1, sin 0).  The same double-precision angles, as vector loops
// over positions.
static inline RotTable make_table_by_freq(const std::optional<at::Tensor>& theta,
                                   const std::optional<at::Tensor>& pos, int64_t B, int64_t L,
                                   int64_t R) {
  RotTable t;
  if (!theta.has_value()) return t;
  t.on = true;
  t.L = L;
  t.half = R / 2;
  t.Lp = (std::max<int64_t>(L, 1) + VL - 1) / VL * VL;
  const int64_t half = R / 2, Lp = t.Lp;
  t.cs.assign(B * half * Lp, 1.f);
  t.sn.assign(B * half * Lp, 0.f);
  const float* th = theta->data_ptr<float>();
  const float* ps = pos->data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(half * L, 1));
  at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> ratio(L), w(L), p(L), y(L);
    std::vector<int32_t> quad(L);
    double last_theta = std::numeric_limits<double>::quiet_NaN(), last = 0.0;
    for (int64_t b = lo; b < hi; ++b) {
      for (int64_t j = 0; j < L; ++j) {
        ratio[j] = theta_ratio(th[b * L + j], R, last_theta, last);
        p[j] = ps[b * L + j];
        w[j] = 1.0;
      }
      for (int64_t i = 0; i < half; ++i) {
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) y[j] = reduce_angle(p[j] * w[j], quad[j]);
        float* cs = t.cs.data() + (b * half + i) * Lp;
        float* sn = t.sn.data() + (b * half + i) * Lp;
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) sin_cos_reduced(y[j], quad[j], sn[j], cs[j]);
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) w[j] *= ratio[j];
      }
    }
  });
  return t;
}

// The rotary pairs of a row are (x[i], x[i + R/2]) (ST = 1, halves) or (x[2i], x[2i + 1])
// (ST = 2, interleaved), i < R/2.  Both loops below take 4 pairs a step in 4-lane vectors
// (then the < 4 left one by one): a row has few pairs (12 at D = 24), fewer than one
// AVX-512 vector holds, so a loop vectorised at the ISA's width ran them all in its scalar
// remainder, and the backward's double dtheta sum as a serial chain of dependent adds (a
// third of a decode step's backward).
typedef float f8u __attribute__((vector_size(32), aligned(4)));
typedef double d4 __attribute__((vector_size(32)));
typedef double d4u __attribute__((vector_size(32), aligned(8)));
static inline d4 to_d4(f4 v) { return __builtin_convertvector(v, d4); }
// pairs i .. i + 3 of (xa, xb) into (a, b), and back
template <int ST>
static inline void ld_pairs(const float* xa, const float* xb, int64_t i, f4& a, f4& b) {
  if constexpr (ST == 1) {
    a = ld4(xa + i); b = ld4(xb + i);
  } else {  // xb = xa + 1: 8 floats x[2i .. 2i + 8), evens and odds
    (void)xb;
    const f4 lo = ld4(xa + 2 * i), hi = ld4(xa + 2 * i + 4);
    a = __builtin_shufflevector(lo, hi, 0, 2, 4, 6);
    b = __builtin_shufflevector(lo, hi, 1, 3, 5, 7);
  }
}
template <int ST>
static inline void st_pairs(float* ya, float* yb, int64_t i, f4 a, f4 b) {
  if constexpr (ST == 1) {
    st4(ya + i, a); st4(yb + i, b);
  } else {  // yb = ya + 1
    (void)yb;
    *reinterpret_cast<f8u*>(ya + 2 * i) = __builtin_shufflevector(a, b, 0, 4, 1, 5, 2, 6, 3, 7);
  }
}

// y = scale * rot(x) (one row of D, the product rounded after the rotation's); dims >= R
// copied (times scale).  y may not alias x.  (The scale is applied in registers: a wider
// vector load of what the 4-float stores here just wrote stalls on store forwarding.)
template <int ST, bool RHO>
static inline void rot_pairs(const float* __restrict xa, const float* __restrict xb,
                             float* __restrict ya, float* __restrict yb, int64_t half,
                             const float* __restrict c, const float* __restrict s,
                             const float* __restrict rho, float scale) {
  int64_t i = 0;
  for (; i + 4 <= half; i += 4) {
    f4 a, b;
    ld_pairs<ST>(xa, xb, i, a, b);
    const f4 ci = ld4(c + i), si = ld4(s + i);
    f4 u = a * ci - b * si, w = a * si + b * ci;
    if (RHO) { const f4 r = ld4(rho + i); u *= r; w *= r; }
    st_pairs<ST>(ya, yb, i, u * scale, w * scale);
  }
  for (; i < half; ++i) {
    const float a = xa[i * ST], b = xb[i * ST];
    const float u = a * c[i] - b * s[i], w = a * s[i] + b * c[i];
    ya[i * ST] = (RHO ? rho[i] * u : u) * scale;
    yb[i * ST] = (RHO ? rho[i] * w : w) * scale;
  }
}
static inline void rot_row(const float* x, float* y, int64_t D, int64_t R, bool inter,
                           const float* c, const float* s, const float* rho,
                           float scale = 1.f) {
  const int64_t half = R / 2;
  if (inter) {
    if (rho) rot_pairs<2, true>(x, x + 1, y, y + 1, half, c, s, rho, scale);
    else rot_pairs<2, false>(x, x + 1, y, y + 1, half, c, s, rho, scale);
  } else {
    if (rho) rot_pairs<1, true>(x, x + half, y, y + half, half, c, s, rho, scale);
    else rot_pairs<1, false>(x, x + half, y, y + half, half, c, s, rho, scale);
  }
  for (int64_t d = R; d < D; ++d) y[d] = x[d] * scale;
}

// Given x and dy = dL/d rot(x): dx, returns dL/dtheta for this row, adds dL/drho (double
// sums; the dtheta one in 4 lanes, i.e. reassociated, at double precision).
template <int ST, bool RHO>
static inline double rot_pairs_bwd(const float* __restrict xa, const float* __restrict xb,
                                   const float* __restrict ga, const float* __restrict gb,
                                   float* __restrict dxa, float* __restrict dxb, int64_t half,
                                   const float* __restrict c, const float* __restrict s,
                                   const float* __restrict dpdt, const float* __restrict rho,
                                   double* __restrict drho) {
  d4 acc = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= half; i += 4) {
    f4 a, b, g0, g1;
    ld_pairs<ST>(xa, xb, i, a, b);
    ld_pairs<ST>(ga, gb, i, g0, g1);
    const f4 ci = ld4(c + i), si = ld4(s + i);
    const f4 ya = a * ci - b * si, yb = a * si + b * ci;
    f4 u = g0 * ci + g1 * si, w = g1 * ci - g0 * si;
    const d4 g0d = to_d4(g0), g1d = to_d4(g1), yad = to_d4(ya), ybd = to_d4(yb);
    d4 dphi = g1d * yad - g0d * ybd;
    if (RHO) {
      const f4 r = ld4(rho + i);
      u *= r; w *= r;
      dphi *= to_d4(r);
      d4u* dr = reinterpret_cast<d4u*>(drho + i);
      *dr = *dr + (g0d * yad + g1d * ybd);
    }
    st_pairs<ST>(dxa, dxb, i, u, w);
    acc += dphi * to_d4(ld4(dpdt + i));
  }
  double dth = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (; i < half; ++i) {
    const float a = xa[i * ST], b = xb[i * ST], r = RHO ? rho[i] : 1.0f;
    const float ya = a * c[i] - b * s[i], yb = a * s[i] + b * c[i];
    const float g0 = ga[i * ST], g1 = gb[i * ST];
    const float u = g0 * c[i] + g1 * s[i], w = g1 * c[i] - g0 * s[i];
    dxa[i * ST] = RHO ? r * u : u;
    dxb[i * ST] = RHO ? r * w : w;
    const double dphi = static_cast<double>(r) * (static_cast<double>(g1) * ya -
                                                  static_cast<double>(g0) * yb);
    dth += dphi * dpdt[i];
    if (RHO) drho[i] += static_cast<double>(g0) * ya + static_cast<double>(g1) * yb;
  }
  return dth;
}
// rho and drho: both or neither.
static inline double rot_row_bwd(const float* x, const float* dy, float* dx, int64_t D,
                                 int64_t R, bool inter, const float* c, const float* s,
                                 const float* dpdt, const float* rho, double* drho) {
  TORCH_CHECK(!rho == !drho, "zeromask: rot_row_bwd needs rho and drho together");
  const int64_t half = R / 2;
  double dth;
  if (inter) {
    dth = rho ? rot_pairs_bwd<2, true>(x, x + 1, dy, dy + 1, dx, dx + 1, half, c, s, dpdt, rho, drho)
              : rot_pairs_bwd<2, false>(x, x + 1, dy, dy + 1, dx, dx + 1, half, c, s, dpdt, rho, drho);
  } else {
    dth = rho ? rot_pairs_bwd<1, true>(x, x + half, dy, dy + half, dx, dx + half, half, c, s,
                                       dpdt, rho, drho)
              : rot_pairs_bwd<1, false>(x, x + half, dy, dy + half, dx, dx + half, half, c, s,
                                        dpdt, rho, drho);
  }
  for (int64_t d = R; d < D; ++d) dx[d] = dy[d];
  return dth;
}

}  // namespace zm
