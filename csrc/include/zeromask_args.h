// The kernel contract's arguments on the C++ side, shared by the CPU and CUDA bindings.
//
// Python hands each binding the call's record (zeromask.backends.AttentionArgs or
// RotaryArgs, a NamedTuple); attention_args() / rotary_args() read it by field name into
// the structs below and check everything a kernel relies on (devices, ranks, dtypes,
// contiguity, shapes), so a binding never trusts its caller and no argument list is
// written out per binding.  Validation of user input (with errors naming the argument)
// happens earlier, in zeromask/ops.py; these checks guard the contract itself.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>

namespace zm_args {

struct AttentionArgs {
  at::Tensor q, k, v;                    // (B, Hq, Lq, D), (B, Hkv, Lk, D) x 2
  std::optional<at::Tensor> key_zero;    // bool (B, Lk)
  at::Tensor zero_scale;                 // float32, one element
  std::optional<at::Tensor> theta_q, theta_k, pos_q, pos_k;  // float32 (B, Lq) / (B, Lk)
  std::optional<at::Tensor> radius;      // float32 (R/2,)
  std::optional<at::Tensor> seqlens_k;   // int32 (B,)
  bool score = false;                    // zero_mode == "score"
  bool hard = false;                     // zero_mode == "hard": zero keys are -inf
  bool causal = false, interleaved = false;
  double sm_scale = 1.0;
  int64_t rotary_dim = 0;
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0;
};

struct RotaryArgs {
  at::Tensor x;                          // (B, H, L, D)
  at::Tensor theta, positions;           // float32 (B, L)
  std::optional<at::Tensor> radius;      // float32 (R/2,)
  int64_t rotary_dim = 0;
  bool interleaved = false;
  int64_t B = 0, H = 0, L = 0, D = 0;
};

inline std::optional<at::Tensor> optional_tensor(const py::handle& rec, const char* name) {
  py::object o = rec.attr(name);
  if (o.is_none()) return std::nullopt;
  return o.cast<at::Tensor>();
}

inline void check_device(const at::Tensor& t, c10::DeviceType device, const char* backend,
                         const char* name) {
  TORCH_CHECK(t.device().type() == device, "zeromask ", backend, " backend: ", name,
              " is on ", t.device(), ", not ", c10::DeviceTypeName(device));
}

// An optional float32 / int32 / bool side input: contiguous, `numel` elements, on the device.
inline void check_side(const std::optional<at::Tensor>& t, at::ScalarType st, int64_t numel,
                       c10::DeviceType device, const char* backend, const char* name) {
  if (!t.has_value()) return;
  check_device(*t, device, backend, name);
  TORCH_CHECK(t->scalar_type() == st && t->is_contiguous() && t->numel() == numel,
              "zeromask ", backend, " backend: ", name, " must be ", c10::toString(st),
              " contiguous with ", numel, " elements, got ", t->scalar_type(), " ",
              t->sizes());
}

// A tensor the kernel reads or writes densely: contiguous, `like`'s shape, `st`.
inline void check_dense(const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType st,
                        c10::DeviceType device, const char* backend, const char* name) {
  check_device(t, device, backend, name);
  TORCH_CHECK(t.is_contiguous() && t.sizes() == sizes && t.scalar_type() == st, "zeromask ",
              backend, " backend: ", name, " must be ", c10::toString(st), " contiguous of "
              "shape ", sizes, ", got ", t.scalar_type(), " ", t.sizes(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

// out (B, Hq, Lq, D) in q's dtype, or a (B, Hq, Lq) float32 row buffer such as lse.
inline void check_like_q(const at::Tensor& t, const AttentionArgs& a, c10::DeviceType device,
                         const char* backend, const char* name) {
  check_dense(t, a.q.sizes(), a.q.scalar_type(), device, backend, name);
}
inline void check_rows(const at::Tensor& t, const AttentionArgs& a, c10::DeviceType device,
                       const char* backend, const char* name) {
  check_dense(t, {a.B, a.Hq, a.Lq}, at::kFloat, device, backend, name);
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
    check_device(*t, device, backend, "q/k/v");
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, "zeromask ", backend,
                " backend: q/k/v must be 4-D with a contiguous last dim, got ", t->sizes());
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
  check_device(r.x, device, backend, "x");
  TORCH_CHECK(r.x.dim() == 4 && r.x.stride(3) == 1, "zeromask ", backend,
              " backend: x must be 4-D with a contiguous last dim, got ", r.x.sizes());
  r.B = r.x.size(0); r.H = r.x.size(1); r.L = r.x.size(2); r.D = r.x.size(3);
  TORCH_CHECK(r.rotary_dim > 0 && r.rotary_dim % 2 == 0 && r.rotary_dim <= r.D, "zeromask ",
              backend, " backend: bad rotary_dim ", r.rotary_dim, " for D ", r.D);
  check_side(r.theta, at::kFloat, r.B * r.L, device, backend, "theta");
  check_side(r.positions, at::kFloat, r.B * r.L, device, backend, "positions");
  check_side(r.radius, at::kFloat, r.rotary_dim / 2, device, backend, "radius");
  return r;
}

}  // namespace zm_args
