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

  check_attention_args(a, device, backend);
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
