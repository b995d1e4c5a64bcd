// Reading the kernel contract's record (zeromask.backends.AttentionArgs / RotaryArgs) from
// Python into zeromask_args.h's structs, checked: for the CPU and CUDA bindings only (the
// one place that needs pybind11 / torch/extension.h, slow to compile).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>

#include "zeromask_args.h"

namespace zm_args {

inline std::optional<at::Tensor> optional_tensor(const py::handle& rec, const char* name) {
  py::object o = rec.attr(name);
  if (o.is_none()) return std::nullopt;
  return o.cast<at::Tensor>();
}

inline AttentionArgs attention_args(const py::handle& rec, c10::DeviceType device,
                                    const char* backend) {
  AttentionArgs a;
  a.q = rec.attr("q").cast<at::Tensor>();
  a.k = rec.attr("k").cast<at::Tensor>();
  a.v = rec.attr("v").cast<at::Tensor>();
  a.key_zero = optional_tensor(rec, "key_zero");
  a.zero_scale = rec.attr("zero_scale").cast<at::Tensor>();
  a.theta_q = optional_tensor(rec, "theta_q");
  a.theta_k = optional_tensor(rec, "theta_k");
  a.pos_q = optional_tensor(rec, "pos_q");
  a.pos_k = optional_tensor(rec, "pos_k");
  a.radius = optional_tensor(rec, "radius");
  a.seqlens_k = optional_tensor(rec, "seqlens_k");
  const std::string mode = rec.attr("zero_mode").cast<std::string>();
  TORCH_CHECK(mode == "prob" || mode == "score" || mode == "hard", "zeromask ", backend,
              " backend: zero_mode must be prob, score or hard, got ", mode);
  a.score = mode == "score";
  a.hard = mode == "hard";
  a.causal = rec.attr("causal").cast<bool>();
  a.sm_scale = rec.attr("sm_scale").cast<double>();
  a.rotary_dim = rec.attr("rotary_dim").cast<int64_t>();
  a.interleaved = rec.attr("interleaved").cast<bool>();

  for (const auto* t : {&a.q, &a.k, &a.v}) {
    check_4d(*t, device, backend, "q/k/v");
    TORCH_CHECK(t->scalar_type() == a.q.scalar_type(), "zeromask ", backend,
                " backend: q/k/v dtypes differ");
  }
  TORCH_CHECK(a.k.sizes() == a.v.sizes() && a.k.size(0) == a.q.size(0) &&
                  a.k.size(3) == a.q.size(3),
              "zeromask ", backend, " backend: k/v shapes ", a.k.sizes(), ", ", a.v.sizes(),
              " do not match q ", a.q.sizes());
  a.B = a.q.size(0); a.Hq = a.q.size(1); a.Lq = a.q.size(2); a.D = a.q.size(3);
  a.Hkv = a.k.size(1); a.Lk = a.k.size(2);
  TORCH_CHECK(a.Hkv > 0 && a.Hq % a.Hkv == 0, "zeromask ", backend,
              " backend: q heads must be a multiple of k/v heads");
  const bool rotary = a.theta_q.has_value() || a.theta_k.has_value();
  // rotary_dim = 0 only without rotary (head dim 1)
  TORCH_CHECK(a.rotary_dim % 2 == 0 && a.rotary_dim <= a.D && a.rotary_dim >= 0 &&
                  (a.rotary_dim > 0 || !rotary),
              "zeromask ", backend, " backend: bad rotary_dim ", a.rotary_dim, " for D ", a.D);
  TORCH_CHECK(a.theta_q.has_value() == a.pos_q.has_value() &&
                  a.theta_k.has_value() == a.pos_k.has_value(),
              "zeromask ", backend, " backend: positions must be given exactly with theta");
  check_side(a.key_zero, at::kBool, a.B * a.Lk, device, backend, "key_zero");
  check_side(a.zero_scale, at::kFloat, 1, device, backend, "zero_scale");
  check_side(a.theta_q, at::kFloat, a.B * a.Lq, device, backend, "theta_q");
  check_side(a.pos_q, at::kFloat, a.B * a.Lq, device, backend, "pos_q");
  check_side(a.theta_k, at::kFloat, a.B * a.Lk, device, backend, "theta_k");
  check_side(a.pos_k, at::kFloat, a.B * a.Lk, device, backend, "pos_k");
  check_side(a.radius, at::kFloat, a.rotary_dim / 2, device, backend, "radius");
  check_side(a.seqlens_k, at::kInt, a.B, device, backend, "seqlens_k");
  return a;
}

inline RotaryArgs rotary_args(const py::handle& rec, c10::DeviceType device,
                              const char* backend) {
  RotaryArgs r;
  r.x = rec.attr("x").cast<at::Tensor>();
  r.theta = rec.attr("theta").cast<at::Tensor>();
  r.positions = rec.attr("positions").cast<at::Tensor>();
  r.radius = optional_tensor(rec, "radius");
  r.rotary_dim = rec.attr("rotary_dim").cast<int64_t>();
  r.interleaved = rec.attr("interleaved").cast<bool>();
  check_4d(r.x, device, backend, "x");
  r.B = r.x.size(0); r.H = r.x.size(1); r.L = r.x.size(2); r.D = r.x.size(3);
  TORCH_CHECK(r.rotary_dim > 0 && r.rotary_dim % 2 == 0 && r.rotary_dim <= r.D, "zeromask ",
              backend, " backend: bad rotary_dim ", r.rotary_dim, " for D ", r.D);
  check_side(r.theta, at::kFloat, r.B * r.L, device, backend, "theta");
  check_side(r.positions, at::kFloat, r.B * r.L, device, backend, "positions");
  check_side(r.radius, at::kFloat, r.rotary_dim / 2, device, backend, "radius");
  return r;
}

}  // namespace zm_args
