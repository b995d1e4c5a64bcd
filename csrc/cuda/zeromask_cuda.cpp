// Torch binding for the CUDA kernels (zeromask._C_cuda).  No CUDA / ATen-cuda headers here:
// the stream is an integer from Python (torch.cuda.current_stream().cuda_stream), and the
// device code (zeromask_cuda_kernels.cu) works on raw pointers.  Outputs are allocated in
// Python (zeromask/backends/cuda.py, through new_output) and passed in; each function takes
// the call's record first (csrc/include/zeromask_args.h reads and checks it).
#include <torch/extension.h>

#include <optional>

#include "zeromask_args_py.h"
#include "zeromask_cuda.h"

namespace {

zmc::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return zmc::kF32;
    case at::kHalf: return zmc::kF16;
    case at::kBFloat16: return zmc::kBF16;
    default: TORCH_CHECK(false, "zeromask cuda backend: dtype ", t.scalar_type(),
                         " is not supported (float32, float16, bfloat16)");
  }
  return zmc::kF32;
}

template <typename P>
const P* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<const P*>(t->data_ptr()) : nullptr;
}

template <typename P>
P* out_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<P*>(t->data_ptr()) : nullptr;
}

void check_rc(int rc, const char* what) {
  TORCH_CHECK(rc == 0, "zeromask cuda backend: ", what, " failed: ",
              rc == 1 ? "unsupported arguments (head dim > 128?)" : zmc::error_string(rc));
}

// The record's tensors as the device code's raw-pointer params (zm_args checked them).
zmc::AttnParams attn_params(const zm_args::AttentionArgs& a) {
  TORCH_CHECK(a.D <= zmc::kMaxHeadDim, "zeromask cuda backend: head dim ", a.D, " > ",
              zmc::kMaxHeadDim);
  TORCH_CHECK(a.rotary_dim > 0, "zeromask cuda backend: head dim 1 is not supported");
  TORCH_CHECK(!a.hard, "zeromask cuda backend: zero_mode='hard' is not supported");
  zmc::AttnParams p;
  p.q = a.q.data_ptr(); p.k = a.k.data_ptr(); p.v = a.v.data_ptr();
  p.qs0 = a.q.stride(0); p.qs1 = a.q.stride(1); p.qs2 = a.q.stride(2);
  p.ks0 = a.k.stride(0); p.ks1 = a.k.stride(1); p.ks2 = a.k.stride(2);
  p.vs0 = a.v.stride(0); p.vs1 = a.v.stride(1); p.vs2 = a.v.stride(2);
  p.B = static_cast<int>(a.B); p.Hq = static_cast<int>(a.Hq);
  p.Lq = static_cast<int>(a.Lq); p.D = static_cast<int>(a.D);
  p.Hkv = static_cast<int>(a.Hkv); p.Lk = static_cast<int>(a.Lk);
  p.R = static_cast<int>(a.rotary_dim);
  p.score = a.score; p.causal = a.causal; p.interleaved = a.interleaved;
  p.sm_scale = static_cast<float>(a.sm_scale);
  p.zs = a.zero_scale.item<float>();  // one scalar read; the op is not capturable anyway
  p.key_zero = opt_ptr<bool>(a.key_zero);
  p.seqlens = opt_ptr<int32_t>(a.seqlens_k);
  p.radius = opt_ptr<float>(a.radius);
  p.theta_q = opt_ptr<float>(a.theta_q);
  p.pos_q = opt_ptr<float>(a.pos_q);
  p.theta_k = opt_ptr<float>(a.theta_k);
  p.pos_k = opt_ptr<float>(a.pos_k);
  return p;
}

void attention_fwd(const py::object& args, at::Tensor out, at::Tensor lse, int64_t stream) {
  const zm_args::AttentionArgs a = zm_args::attention_args(args, at::kCUDA, "cuda");
  zmc::AttnParams p = attn_params(a);
  zm_args::check_forward_outputs(a, out, lse, at::kCUDA, "cuda");
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_rc(zmc::attention_forward(p, dtype_of(a.q), reinterpret_cast<void*>(stream)),
           "attention forward launch");
}

void attention_bwd(const py::object& args, const at::Tensor& dout, const at::Tensor& out,
                   const at::Tensor& lse, at::Tensor delta, at::Tensor dq, at::Tensor dk,
                   at::Tensor dv, const std::optional<at::Tensor>& dtheta_q,
                   const std::optional<at::Tensor>& dtheta_k,
                   const std::optional<at::Tensor>& dradius,
                   const std::optional<at::Tensor>& dzs, int64_t stream) {
  const zm_args::AttentionArgs a = zm_args::attention_args(args, at::kCUDA, "cuda");
  zmc::AttnParams p = attn_params(a);
  zm_args::check_backward_buffers(a, dout, out, lse, dq, dk, dv, at::kCUDA, "cuda");
  zm_args::check_rows(delta, a, at::kCUDA, "cuda", "delta");
  // the float accumulators: zeroed by the caller, present exactly when their input is
  zm_args::check_side(dtheta_q, at::kFloat, a.B * a.Lq, at::kCUDA, "cuda", "dtheta_q");
  zm_args::check_side(dtheta_k, at::kFloat, a.B * a.Lk, at::kCUDA, "cuda", "dtheta_k");
  zm_args::check_side(dradius, at::kFloat, a.rotary_dim / 2, at::kCUDA, "cuda", "dradius");
  zm_args::check_side(dzs, at::kFloat, 1, at::kCUDA, "cuda", "dzero_scale");
  TORCH_CHECK(a.theta_q.has_value() == dtheta_q.has_value() &&
                  a.theta_k.has_value() == dtheta_k.has_value() &&
                  a.radius.has_value() == dradius.has_value() &&
                  a.key_zero.has_value() == dzs.has_value(),
              "zeromask cuda backend: a gradient buffer is missing or extra");
  p.dout = dout.data_ptr();
  p.out_in = out.data_ptr();
  p.lse_in = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.dtheta_q = out_ptr<float>(dtheta_q);
  p.dtheta_k = out_ptr<float>(dtheta_k);
  p.dradius = out_ptr<float>(dradius);
  p.dzs = out_ptr<float>(dzs);
  check_rc(zmc::attention_backward(p, dtype_of(a.q), reinterpret_cast<void*>(stream)),
           "attention backward launch");
}

zmc::RotaryParams rot_params(const zm_args::RotaryArgs& r) {
  zmc::RotaryParams p;
  p.x = r.x.data_ptr();
  p.xs0 = r.x.stride(0); p.xs1 = r.x.stride(1); p.xs2 = r.x.stride(2);
  p.B = static_cast<int>(r.B); p.H = static_cast<int>(r.H);
  p.L = static_cast<int>(r.L); p.D = static_cast<int>(r.D);
  p.R = static_cast<int>(r.rotary_dim);
  p.interleaved = r.interleaved;
  p.theta = r.theta.data_ptr<float>();
  p.pos = r.positions.data_ptr<float>();
  p.radius = opt_ptr<float>(r.radius);
  return p;
}

void rotary_fwd(const py::object& args, at::Tensor y, int64_t stream) {
  const zm_args::RotaryArgs r = zm_args::rotary_args(args, at::kCUDA, "cuda");
  zmc::RotaryParams p = rot_params(r);
  zm_args::check_dense(y, r.x.sizes(), r.x.scalar_type(), at::kCUDA, "cuda", "y");
  p.y = y.data_ptr();
  check_rc(zmc::rotary_forward(p, dtype_of(r.x), reinterpret_cast<void*>(stream)),
           "rotary forward launch");
}

void rotary_bwd(const py::object& args, const at::Tensor& dy, at::Tensor dx, at::Tensor dtheta,
                const std::optional<at::Tensor>& dradius, int64_t stream) {
  const zm_args::RotaryArgs r = zm_args::rotary_args(args, at::kCUDA, "cuda");
  zmc::RotaryParams p = rot_params(r);
  zm_args::check_dense(dy, r.x.sizes(), r.x.scalar_type(), at::kCUDA, "cuda", "dy");
  zm_args::check_dense(dx, r.x.sizes(), r.x.scalar_type(), at::kCUDA, "cuda", "dx");
  zm_args::check_dense(dtheta, r.theta.sizes(), at::kFloat, at::kCUDA, "cuda", "dtheta");
  zm_args::check_side(dradius, at::kFloat, r.rotary_dim / 2, at::kCUDA, "cuda", "dradius");
  TORCH_CHECK(r.radius.has_value() == dradius.has_value(),
              "zeromask cuda backend: dradius must be given exactly with radius");
  p.dy = dy.data_ptr();
  p.dx = dx.data_ptr();
  p.dtheta = dtheta.data_ptr<float>();
  p.dradius = out_ptr<float>(dradius);
  check_rc(zmc::rotary_backward(p, dtype_of(r.x), reinterpret_cast<void*>(stream)),
           "rotary backward launch");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zeromask CUDA kernels: fused f0 rotary + zero-soft attention, f0 rotary";
  m.def("attention_fwd", &attention_fwd, "fused attention forward (writes out, lse)");
  m.def("attention_bwd", &attention_bwd, "fused attention backward");
  m.def("rotary_fwd", &rotary_fwd, "f0 rotary forward (writes y)");
  m.def("rotary_bwd", &rotary_bwd, "f0 rotary backward");
}
