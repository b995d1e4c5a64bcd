// f0 rotary on the CPU: the per-call angle tables (cos, sin, dphi/dtheta in double, rounded
// once to float) and the rotation of one row, forward and backward.
#pragma once
#include "vec.h"

namespace zm {

struct RotTable {
  // (B, L, R/2) each; empty when there is no rotary on that side.
  std::vector<float> cs, sn, dpdt;
  int64_t L = 0, half = 0;
  bool on = false;
  const float* c(int64_t b, int64_t t) const { return cs.data() + (b * L + t) * half; }
  const float* s(int64_t b, int64_t t) const { return sn.data() + (b * L + t) * half; }
  const float* d(int64_t b, int64_t t) const { return dpdt.data() + (b * L + t) * half; }
};

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
  constexpr double HALF_PI = 1.570796326794896619231;
  // Chunks of >= 16k angles (~0.1 ms): smaller tables stay serial, as a parallel region's
  // thread wake-up would cost more than it saves; at L = 2048, D = 64 the table (~0.4 ms
  // serial) was most of the standalone rotary op's time.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(half, 1));
  at::parallel_for(0, B * L, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> wv(half), y(half);
    std::vector<int32_t> quad(half);
    for (int64_t row = lo; row < hi; ++row) {
      // w_i = theta^(-2i/R) = ratio^i, by repeated multiplication in double (error ~ i ulp
      // of a double); phi = pos * w_i reduced in double to y in [-pi/4, pi/4] and its
      // quadrant, then sin and cos of y by their Taylor series to y^13 / y^14 in double
      // (truncation < 1e-13) rounded once to float: as accurate as libm's sinf/cosf, in
      // loops GCC vectorises (libm's scalar cosf + sinf took ~6 ns an angle).
      const double ratio = std::exp(-2.0 / static_cast<double>(R) * std::log(static_cast<double>(th[row])));
      const double p = ps[row];
      double w = 1.0;
      for (int64_t i = 0; i < half; ++i, w *= ratio) wv[i] = w;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const double phi = p * wv[i];
        const double k = std::nearbyint(phi * (1.0 / HALF_PI));
        y[i] = phi - HALF_PI * k;
        // k mod 4 in [0, 4), exactly ((int64) k & 3, without a vector int64 conversion)
        quad[i] = static_cast<int32_t>(k - 4.0 * std::floor(k * 0.25));
      }
      float* cs = t.cs.data() + row * half;
      float* sn = t.sn.data() + row * half;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const double x = y[i], z = x * x;
        const double sp = x * (1.0 + z * (-1.0 / 6 + z * (1.0 / 120 + z * (-1.0 / 5040 + z * (
            1.0 / 362880 + z * (-1.0 / 39916800 + z * (1.0 / 6227020800.0)))))));
        const double cp = 1.0 + z * (-0.5 + z * (1.0 / 24 + z * (-1.0 / 720 + z * (
            1.0 / 40320 + z * (-1.0 / 3628800 + z * (1.0 / 479001600 + z * (
            -1.0 / 87178291200.0)))))));
        const int32_t q = quad[i];  // phi = y + q pi/2 (mod 2 pi)
        const double sv = (q & 1) ? cp : sp, cv = (q & 1) ? sp : cp;
        sn[i] = static_cast<float>((q & 2) ? -sv : sv);
        cs[i] = static_cast<float>(((q + 1) & 2) ? -cv : cv);
      }
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

// The rotary pairs of a row are (x[i], x[i + R/2]) (ST = 1, halves) or (x[2i], x[2i + 1])
// (ST = 2, interleaved), i < R/2.  The loops below are one per layout and radius / no
// radius, without branches inside, so GCC vectorises them.

// y = rot(x) (one row of D); dims >= R copied.  y may not alias x.
template <int ST, bool RHO>
static inline void rot_pairs(const float* __restrict xa, const float* __restrict xb,
                             float* __restrict ya, float* __restrict yb, int64_t half,
                             const float* __restrict c, const float* __restrict s,
                             const float* __restrict rho) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = xa[i * ST], b = xb[i * ST];
    const float u = a * c[i] - b * s[i], w = a * s[i] + b * c[i];
    ya[i * ST] = RHO ? rho[i] * u : u;
    yb[i * ST] = RHO ? rho[i] * w : w;
  }
}
static inline void rot_row(const float* x, float* y, int64_t D, int64_t R, bool inter,
                           const float* c, const float* s, const float* rho) {
  const int64_t half = R / 2;
  if (inter) {
    if (rho) rot_pairs<2, true>(x, x + 1, y, y + 1, half, c, s, rho);
    else rot_pairs<2, false>(x, x + 1, y, y + 1, half, c, s, rho);
  } else {
    if (rho) rot_pairs<1, true>(x, x + half, y, y + half, half, c, s, rho);
    else rot_pairs<1, false>(x, x + half, y, y + half, half, c, s, rho);
  }
  for (int64_t d = R; d < D; ++d) y[d] = x[d];
}

// Given x and dy = dL/d rot(x): dx, returns dL/dtheta for this row, adds dL/drho (double
// sums; the dtheta one in SIMD lanes, i.e. reassociated, at double precision).
template <int ST, bool RHO>
static inline double rot_pairs_bwd(const float* __restrict xa, const float* __restrict xb,
                                   const float* __restrict ga, const float* __restrict gb,
                                   float* __restrict dxa, float* __restrict dxb, int64_t half,
                                   const float* __restrict c, const float* __restrict s,
                                   const float* __restrict dpdt, const float* __restrict rho,
                                   double* __restrict drho) {
  double dth = 0.0;
#pragma omp simd reduction(+ : dth)
  for (int64_t i = 0; i < half; ++i) {
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
