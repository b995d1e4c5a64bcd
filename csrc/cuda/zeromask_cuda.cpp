// Torch binding for the CUDA kernels (zeromask._C_cuda).  No CUDA / ATen-cuda headers here:
// the stream is an integer from Python (torch.cuda.current_stream().cuda_stream), and the
// device code (zeromask_cuda_kernels.cu) works on raw pointers.  Outputs are allocated in
// Python (zeromask/backends/cuda.py, through new_output) and passed in.
#include <torch/extension.h>

#include <optional>

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

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "zeromask cuda backend: ", name, " must be a CUDA tensor");
}

template <typename P>
const P* opt_ptr(const std::optional<at::Tensor>& t, at::ScalarType st, const char* name) {
  if (!t.has_value()) return nullptr;
  check_cuda(*t, name);
  TORCH_CHECK(t->scalar_type() == st && t->is_contiguous(), "zeromask: ", name,
              " has the wrong dtype or is not contiguous");
  return static_cast<const P*>(t->data_ptr());
}

template <typename P>
P* out_ptr(const std::optional<at::Tensor>& t, at::ScalarType st, const char* name) {
  if (!t.has_value()) return nullptr;
  check_cuda(*t, name);
  TORCH_CHECK(t->scalar_type() == st && t->is_contiguous(), "zeromask: ", name,
              " has the wrong dtype or is not contiguous");
  return static_cast<P*>(t->data_ptr());
}

void check_rc(int rc, const char* what) {
  TORCH_CHECK(rc == 0, "zeromask cuda backend: ", what, " failed: ",
              rc == 1 ? "unsupported arguments (head dim > 128?)" : zmc::error_string(rc));
}

zmc::AttnParams attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_zero,
                            const at::Tensor& zero_scale,
                            const std::optional<at::Tensor>& theta_q,
                            const std::optional<at::Tensor>& theta_k,
                            const std::optional<at::Tensor>& pos_q,
                            const std::optional<at::Tensor>& pos_k,
                            const std::optional<at::Tensor>& radius,
                            const std::optional<at::Tensor>& seqlens_k, bool score, bool causal,
                            double sm_scale, int64_t rotary_dim, bool interleaved) {
  for (auto* t : {&q, &k, &v}) {
    check_cuda(*t, "q/k/v");
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1,
                "zeromask: q/k/v must be 4-D with a contiguous last dim");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "zeromask: q/k/v dtypes differ");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "zeromask: k/v shapes do not match q");
  TORCH_CHECK(q.size(3) <= zmc::kMaxHeadDim, "zeromask cuda backend: head dim ", q.size(3),
              " > ", zmc::kMaxHeadDim);
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "zeromask: Hq % Hkv != 0");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= q.size(3),
              "zeromask: bad rotary_dim");
  TORCH_CHECK(theta_q.has_value() == pos_q.has_value() && theta_k.has_value() == pos_k.has_value(),
              "zeromask: positions must be given exactly with theta");
  zmc::AttnParams p;
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.qs0 = q.stride(0); p.qs1 = q.stride(1); p.qs2 = q.stride(2);
  p.ks0 = k.stride(0); p.ks1 = k.stride(1); p.ks2 = k.stride(2);
  p.vs0 = v.stride(0); p.vs1 = v.stride(1); p.vs2 = v.stride(2);
  p.B = static_cast<int>(q.size(0)); p.Hq = static_cast<int>(q.size(1));
  p.Lq = static_cast<int>(q.size(2)); p.D = static_cast<int>(q.size(3));
  p.Hkv = static_cast<int>(k.size(1)); p.Lk = static_cast<int>(k.size(2));
  p.R = static_cast<int>(rotary_dim);
  p.score = score; p.causal = causal; p.interleaved = interleaved;
  p.sm_scale = static_cast<float>(sm_scale);
  p.zs = zero_scale.item<float>();  // one scalar read; the op is not capturable anyway
  p.key_zero = opt_ptr<bool>(key_zero, at::kBool, "key_zero");
  p.seqlens = opt_ptr<int32_t>(seqlens_k, at::kInt, "seqlens_k");
  p.radius = opt_ptr<float>(radius, at::kFloat, "radius");
  p.theta_q = opt_ptr<float>(theta_q, at::kFloat, "theta_q");
  p.pos_q = opt_ptr<float>(pos_q, at::kFloat, "pos_q");
  p.theta_k = opt_ptr<float>(theta_k, at::kFloat, "theta_k");
  p.pos_k = opt_ptr<float>(pos_k, at::kFloat, "pos_k");
  return p;
}

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& key_zero, const at::Tensor& zero_scale,
                   const std::optional<at::Tensor>& theta_q,
                   const std::optional<at::Tensor>& theta_k,
                   const std::optional<at::Tensor>& pos_q, const std::optional<at::Tensor>& pos_k,
                   const std::optional<at::Tensor>& radius,
                   const std::optional<at::Tensor>& seqlens_k, bool score, bool causal,
                   double sm_scale, int64_t rotary_dim, bool interleaved, at::Tensor out,
                   at::Tensor lse, int64_t stream) {
  zmc::AttnParams p = attn_params(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k,
                                  radius, seqlens_k, score, causal, sm_scale, rotary_dim,
                                  interleaved);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "zeromask: out must be contiguous like q");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat &&
                  lse.numel() == q.size(0) * q.size(1) * q.size(2), "zeromask: bad lse");
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_rc(zmc::attention_forward(p, dtype_of(q), reinterpret_cast<void*>(stream)),
           "attention forward launch");
}

void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const std::optional<at::Tensor>& key_zero, const at::Tensor& zero_scale,
                   const std::optional<at::Tensor>& theta_q,
                   const std::optional<at::Tensor>& theta_k,
                   const std::optional<at::Tensor>& pos_q, const std::optional<at::Tensor>& pos_k,
                   const std::optional<at::Tensor>& radius,
                   const std::optional<at::Tensor>& seqlens_k, bool score, bool causal,
                   double sm_scale, int64_t rotary_dim, bool interleaved, at::Tensor delta,
                   at::Tensor dq, at::Tensor dk, at::Tensor dv,
                   const std::optional<at::Tensor>& dtheta_q,
                   const std::optional<at::Tensor>& dtheta_k,
                   const std::optional<at::Tensor>& dradius,
                   const std::optional<at::Tensor>& dzs, int64_t stream) {
  zmc::AttnParams p = attn_params(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k,
                                  radius, seqlens_k, score, causal, sm_scale, rotary_dim,
                                  interleaved);
  for (auto* t : {&dout, &out}) {
    check_cuda(*t, "dout/out");
    TORCH_CHECK(t->is_contiguous() && t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type(),
                "zeromask: dout/out must be contiguous like q");
  }
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat, "zeromask: bad lse");
  TORCH_CHECK(delta.is_contiguous() && delta.scalar_type() == at::kFloat &&
                  delta.numel() == lse.numel(), "zeromask: bad delta scratch");
  TORCH_CHECK(dq.is_contiguous() && dk.is_contiguous() && dv.is_contiguous() &&
                  dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes() &&
                  dq.scalar_type() == q.scalar_type() && dk.scalar_type() == q.scalar_type() &&
                  dv.scalar_type() == q.scalar_type(),
              "zeromask: dq/dk/dv must be contiguous like q/k/v");
  TORCH_CHECK(!p.theta_q || dtheta_q.has_value(), "zeromask: dtheta_q buffer missing");
  TORCH_CHECK(!p.theta_k || dtheta_k.has_value(), "zeromask: dtheta_k buffer missing");
  p.dout = dout.data_ptr();
  p.out_in = out.data_ptr();
  p.lse_in = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.dtheta_q = out_ptr<float>(dtheta_q, at::kFloat, "dtheta_q");
  p.dtheta_k = out_ptr<float>(dtheta_k, at::kFloat, "dtheta_k");
  p.dradius = out_ptr<float>(dradius, at::kFloat, "dradius");
  p.dzs = out_ptr<float>(dzs, at::kFloat, "dzero_scale");
  check_rc(zmc::attention_backward(p, dtype_of(q), reinterpret_cast<void*>(stream)),
           "attention backward launch");
}

zmc::RotaryParams rot_params(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& pos,
                             const std::optional<at::Tensor>& radius, int64_t rotary_dim,
                             bool interleaved) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "zeromask: x must be 4-D, last dim contiguous");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= x.size(3),
              "zeromask: bad rotary_dim");
  zmc::RotaryParams p;
  p.x = x.data_ptr();
  p.xs0 = x.stride(0); p.xs1 = x.stride(1); p.xs2 = x.stride(2);
  p.B = static_cast<int>(x.size(0)); p.H = static_cast<int>(x.size(1));
  p.L = static_cast<int>(x.size(2)); p.D = static_cast<int>(x.size(3));
  p.R = static_cast<int>(rotary_dim);
  p.interleaved = interleaved;
  p.theta = opt_ptr<float>(theta, at::kFloat, "theta");
  p.pos = opt_ptr<float>(pos, at::kFloat, "positions");
  TORCH_CHECK(theta.numel() == x.size(0) * x.size(2) && pos.numel() == theta.numel(),
              "zeromask: theta/positions must be (B, L)");
  p.radius = opt_ptr<float>(radius, at::kFloat, "radius");
  return p;
}

void rotary_fwd(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& pos,
                const std::optional<at::Tensor>& radius, int64_t rotary_dim, bool interleaved,
                at::Tensor y, int64_t stream) {
  zmc::RotaryParams p = rot_params(x, theta, pos, radius, rotary_dim, interleaved);
  TORCH_CHECK(y.is_contiguous() && y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(),
              "zeromask: y must be contiguous like x");
  p.y = y.data_ptr();
  check_rc(zmc::rotary_forward(p, dtype_of(x), reinterpret_cast<void*>(stream)),
           "rotary forward launch");
}

void rotary_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& theta,
                const at::Tensor& pos, const std::optional<at::Tensor>& radius,
                int64_t rotary_dim, bool interleaved, at::Tensor dx, at::Tensor dtheta,
                const std::optional<at::Tensor>& dradius, int64_t stream) {
  zmc::RotaryParams p = rot_params(x, theta, pos, radius, rotary_dim, interleaved);
  TORCH_CHECK(dy.is_contiguous() && dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "zeromask: dy must be contiguous like x");
  TORCH_CHECK(dx.is_contiguous() && dx.sizes() == x.sizes() && dx.scalar_type() == x.scalar_type(),
              "zeromask: dx must be contiguous like x");
  TORCH_CHECK(dtheta.is_contiguous() && dtheta.scalar_type() == at::kFloat &&
                  dtheta.numel() == theta.numel(), "zeromask: bad dtheta");
  p.dy = dy.data_ptr();
  p.dx = dx.data_ptr();
  p.dtheta = dtheta.data_ptr<float>();
  p.dradius = out_ptr<float>(dradius, at::kFloat, "dradius");
  check_rc(zmc::rotary_backward(p, dtype_of(x), reinterpret_cast<void*>(stream)),
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
