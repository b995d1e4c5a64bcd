// The standalone f0 rotary op on the CPU, forward and backward.
#include "kernels.h"
#include "rotary.h"

namespace zm {

void rotary_forward(const zm_args::RotaryArgs& r, at::Tensor y) {
  zm_args::check_dense(y, r.x.sizes(), r.x.scalar_type(), at::kCPU, "cpp", "y");
  const int64_t B = r.B, H = r.H, L = r.L, D = r.D, R = r.rotary_dim;
  const bool interleaved = r.interleaved;
  const float* rho = r.radius.has_value() ? r.radius->data_ptr<float>() : nullptr;
  RotTable t = make_table(r.theta, r.positions, B, L, R, false);
  const at::Tensor& x = r.x;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
    at::parallel_for(0, B * H * L, 64, [&](int64_t lo, int64_t hi) {
      std::vector<float> a(D), o(D);
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t l = row % L, h = (row / L) % H, b = row / (L * H);
        load_row(xp + b * s0 + h * s1 + l * s2, a.data(), D);
        rot_row(a.data(), o.data(), D, R, interleaved, t.c(b, l), t.s(b, l), rho);
        store_row(o.data(), yp + row * D, D);
      }
    });
  });
}

// dx (like x, contiguous), dtheta (B, L) float32, drad_part (B*L, R/2) float64 or None.
void rotary_backward(const zm_args::RotaryArgs& r, const at::Tensor& dy, at::Tensor dx,
                     at::Tensor dtheta, std::optional<at::Tensor> drad_part) {
  const at::Tensor& x = r.x;
  zm_args::check_dense(dy, x.sizes(), x.scalar_type(), at::kCPU, "cpp", "dy");
  zm_args::check_dense(dx, x.sizes(), x.scalar_type(), at::kCPU, "cpp", "dx");
  zm_args::check_dense(dtheta, r.theta.sizes(), at::kFloat, at::kCPU, "cpp", "dtheta");
  const int64_t B = r.B, H = r.H, L = r.L, D = r.D, R = r.rotary_dim;
  const bool interleaved = r.interleaved;
  const float* rho = nullptr;
  double* drp = nullptr;
  const int64_t half = R / 2;
  if (r.radius.has_value()) {
    rho = r.radius->data_ptr<float>();
    TORCH_CHECK(drad_part.has_value(), "zeromask cpp backend: drad_part missing");
    zm_args::check_dense(*drad_part, {B * L, half}, at::kDouble, at::kCPU, "cpp", "drad_part");
    drp = drad_part->data_ptr<double>();
  }
  RotTable t = make_table(r.theta, r.positions, B, L, R, true);
  float* dtp = dtheta.data_ptr<float>();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* dyp = dy.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
    at::parallel_for(0, B * L, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> a(D), g(D), o(D);
      std::vector<double> dr(std::max<int64_t>(half, 1));
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t b = row / L, l = row % L;
        std::fill(dr.begin(), dr.end(), 0.0);
        double dth = 0.0;
        for (int64_t h = 0; h < H; ++h) {
          load_row(xp + b * s0 + h * s1 + l * s2, a.data(), D);
          load_row(dyp + ((b * H + h) * L + l) * D, g.data(), D);
          dth += rot_row_bwd(a.data(), g.data(), o.data(), D, R, interleaved, t.c(b, l),
                             t.s(b, l), t.d(b, l), rho, rho ? dr.data() : nullptr);
          store_row(o.data(), dxp + ((b * H + h) * L + l) * D, D);
        }
        dtp[row] = static_cast<float>(dth);
        if (drp) for (int64_t i = 0; i < half; ++i) drp[row * half + i] = dr[i];
      }
    });
  });
}

}  // namespace zm
