// The kernel contract's arguments on the C++ side, shared by the CPU and CUDA bindings.
//
// Python hands each binding the call's record (zeromask.backends.AttentionArgs or
// RotaryArgs, a NamedTuple); attention_args() / rotary_args() (zeromask_args_py.h) read it
// by field name into the structs below and check everything a kernel relies on (devices,
// ranks, dtypes, contiguity, shapes) with the checks below, so a binding never trusts its
// caller and no argument list is written out per binding.  Validation of user input (with
// errors naming the argument) happens earlier, in zeromask/ops.py; these checks guard the
// contract itself.  ATen's core headers only: the kernel sources include this (quickly).
#pragma once
#include <ATen/core/Tensor.h>

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

// The forward's outputs: out like q, lse float32 (B, Hq, Lq).
inline void check_forward_outputs(const AttentionArgs& a, const at::Tensor& out,
                                  const at::Tensor& lse, c10::DeviceType device,
                                  const char* backend) {
  check_like_q(out, a, device, backend, "out");
  check_rows(lse, a, device, backend, "lse");
}

// The backward's dense buffers: dout, out and dq like q, lse float32 (B, Hq, Lq), dk / dv
// like k / v in q's dtype.
inline void check_backward_buffers(const AttentionArgs& a, const at::Tensor& dout,
                                   const at::Tensor& out, const at::Tensor& lse,
                                   const at::Tensor& dq, const at::Tensor& dk,
                                   const at::Tensor& dv, c10::DeviceType device,
                                   const char* backend) {
  check_like_q(dout, a, device, backend, "dout");
  check_forward_outputs(a, out, lse, device, backend);
  check_like_q(dq, a, device, backend, "dq");
  check_dense(dk, a.k.sizes(), a.q.scalar_type(), device, backend, "dk");
  check_dense(dv, a.v.sizes(), a.q.scalar_type(), device, backend, "dv");
}

// A (B, H, L, D) input the kernels read with its own strides: 4-D, last dim contiguous.
inline void check_4d(const at::Tensor& t, c10::DeviceType device, const char* backend,
                     const char* name) {
  check_device(t, device, backend, name);
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "zeromask ", backend, " backend: ", name,
              " must be 4-D with a contiguous last dim, got ", t.sizes());
}

// Everything a kernel relies on in a filled-in record (devices, ranks, dtypes, contiguity,
// shapes); also sets its sizes B .. D.  Every binding's record passes here, however it was
// built (read from Python's record, or by the CPU fast path from the call's arguments).
inline void check_attention_args(AttentionArgs& a, c10::DeviceType device,
                                 const char* backend) {
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
}

}  // namespace zm_args
