// The CPU fast path of zeromask.zero_soft_attention: the whole call (argument checks,
// normalisation to the kernel record, output allocation, the kernel) in one C++ function,
// with the attention's autograd formula as a C++ autograd Function where an input requires
// grad, for the calls speech models make (eager, CPU, plain arguments: training steps,
// decoding steps, evaluation).  At the short sequences such models run, the Python
// normalisation of zeromask/ops.py (~20 small tensor ops at 3-6 us each) and its Python
// autograd Function cost several times the kernels themselves.
//
// It *accepts* a call or *declines* it, never raises on user input: it returns the output
// tensor when every argument is of a plain, valid kind it knows (exact torch.Tensor or
// Python float / int / bool / str / None; every value in range), and None otherwise, after
// which ops.py runs its full path on the same call.  So every error message a user can see
// still comes from one place, ops.py; whatever this file declines is merely slower.  Its
// acceptance rules are ops.py's checks (tests/test_fast_path.py holds both to the same
// cases: each call ops.py rejects is declined here, each one accepted gives ops.py's
// result bit for bit).
#include <torch/extension.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

#include "fast_path.h"
#include "kernels.h"

namespace zm {
namespace {

// The values ops.py's checks hold (MIN_ZERO_SCALE, MAX_POSITION).
constexpr double MIN_ZERO_SCALE = std::numeric_limits<float>::min();
constexpr int64_t MAX_POSITION = int64_t{1} << 24;

// A tensor the fast path takes: exactly torch.Tensor (no subclass), a plain strided CPU
// tensor with no Python, functorch or neg/conj view state.
std::optional<at::Tensor> plain_tensor(PyObject* o) {
  if (!THPVariable_CheckExact(o)) return std::nullopt;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!t.defined() || !t.is_cpu() || t.layout() != at::kStrided || t.is_neg() ||
      t.is_conj())
    return std::nullopt;
  const auto ks = t.key_set();
  if (ks.has(c10::DispatchKey::Python) || ks.has(c10::DispatchKey::FuncTorchBatched) ||
      ks.has(c10::DispatchKey::FuncTorchGradWrapper))
    return std::nullopt;
  return t;
}

// A Python float or int (not bool, not a subclass such as numpy.float64) as a double.
std::optional<double> plain_number(PyObject* o) {
  if (PyFloat_CheckExact(o)) return PyFloat_AS_DOUBLE(o);
  if (PyLong_CheckExact(o)) {
    const double d = PyLong_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return std::nullopt; }
    return d;
  }
  return std::nullopt;
}

std::optional<int64_t> plain_int(PyObject* o) {
  if (!PyLong_CheckExact(o)) return std::nullopt;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow || (v == -1 && PyErr_Occurred())) { PyErr_Clear(); return std::nullopt; }
  return v;
}

std::optional<bool> plain_bool(PyObject* o) {
  if (o == Py_True) return true;
  if (o == Py_False) return false;
  return std::nullopt;
}

// Whether autograd records a call on t (grad mode on and t requires grad).
bool needs_grad(const at::Tensor& t) { return at::GradMode::is_enabled() && t.requires_grad(); }

// (B, L) float32 contiguous theta from a tensor of shape (), (L,), (1, L) or (B, L) whose
// values are finite and > 1 (ops._theta), else nullopt.
std::optional<at::Tensor> theta_tensor(const at::Tensor& t, int64_t B, int64_t L) {
  if (!t.is_floating_point() || t.dim() > 2) return std::nullopt;
  if (t.dim() >= 1 && t.size(-1) != L) return std::nullopt;
  if (t.dim() == 2 && t.size(0) != 1 && t.size(0) != B) return std::nullopt;
  at::Tensor x = t.dim() == 2 ? t : t.reshape({1, t.dim() == 1 ? L : 1});
  x = x.to(at::kFloat).expand({B, L}).contiguous();
  // (a value of a wider dtype past float32's range became inf here: declined, as ops.py
  // rejects it; a NaN fails both comparisons)
  const float* p = x.data_ptr<float>();
  for (int64_t i = 0, n = B * L; i < n; ++i)
    if (!(p[i] > 1.f && p[i] < std::numeric_limits<float>::infinity())) return std::nullopt;
  return x;
}

// (B, L) float32 positions start, start + 1, ... (ops._positions with an int offset).
std::optional<at::Tensor> positions(int64_t start, int64_t B, int64_t L) {
  if (std::llabs(start) + L - 1 > MAX_POSITION) return std::nullopt;
  at::Tensor x = at::empty({B, L}, at::TensorOptions().dtype(at::kFloat));
  float* p = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i) p[b * L + i] = static_cast<float>(start + i);
  return x;
}

// theta and positions of one side: (theta, pos) normalised, or nullopt to decline.
// `theta` is None, a number or a tensor; `pos` None or an int offset; `same` the other
// side's normalised theta when this side passed the same object for the same length
// (self-attention: normalised once, as ops.py does).
struct Side { std::optional<at::Tensor> theta, pos; };
std::optional<Side> rotary_side(PyObject* theta, PyObject* pos, int64_t B, int64_t L,
                                int64_t default_offset,
                                const std::optional<at::Tensor>& same = std::nullopt) {
  Side s;
  if (theta == Py_None) {
    if (pos != Py_None) return std::nullopt;  // ops.py: positions without theta
    return s;
  }
  if (same) {
    s.theta = same;
  } else if (auto v = plain_number(theta)) {
    if (!(std::isfinite(*v) && *v > 1.0 && *v < std::numeric_limits<float>::max()))
      return std::nullopt;
    s.theta = at::full({B, L}, *v, at::TensorOptions().dtype(at::kFloat));
  } else if (auto t = plain_tensor(theta)) {
    s.theta = theta_tensor(*t, B, L);  // (differentiable: the graph reaches the user's theta)
    if (!s.theta) return std::nullopt;
  } else {
    return std::nullopt;
  }
  int64_t start = default_offset;
  if (pos != Py_None) {
    auto p = plain_int(pos);
    if (!p) return std::nullopt;  // a positions tensor: the full path
    start = *p;
  }
  s.pos = positions(start, B, L);
  if (!s.pos) return std::nullopt;
  return s;
}

// ZEROMASK_BACKEND / backend= resolves to the cpp backend: "auto" or "cpp".
bool resolves_to_cpp(PyObject* backend) {
  std::string name;
  if (backend == Py_None) {
    const char* env = std::getenv("ZEROMASK_BACKEND");
    name = env ? env : "auto";
  } else if (PyUnicode_CheckExact(backend)) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(backend, &n);
    if (!s) { PyErr_Clear(); return false; }
    name.assign(s, n);
  } else {
    return false;
  }
  // (ops.py strips and lowercases; anything unusual goes there)
  return name == "auto" || name == "cpp";
}

// A kernel output as zeromask.outputs.new_output allocates it: NaN-filled when the
// environment sets ZEROMASK_POISON=1 (the test suite), so an unwritten element shows.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  const char* poison = std::getenv("ZEROMASK_POISON");
  if (poison && std::strcmp(poison, "1") == 0) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

// (out, lse) of a checked record.
std::pair<at::Tensor, at::Tensor> forward(zm_args::AttentionArgs& a) {
  zm_args::check_attention_args(a, at::kCPU, "cpp");
  at::Tensor out = new_output(a.q.sizes(), a.q.options());
  at::Tensor lse = new_output({a.B, a.Hq, a.Lq}, a.q.options().dtype(at::kFloat));
  attention_forward(a, out, lse);
  return {out, lse};
}

// The attention's autograd formula in C++ (what ops.py registers for the custom op and
// _EagerAttention, without Python's per-call cost): saves the record's tensors, out and
// lse; the backward kernel gives every gradient.
struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  using Opt = std::optional<at::Tensor>;

  static zm_args::AttentionArgs record(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const Opt& key_zero,
                                       const at::Tensor& zero_scale, const Opt& theta_q,
                                       const Opt& theta_k, const Opt& pos_q, const Opt& pos_k,
                                       const Opt& seqlens_k) {
    zm_args::AttentionArgs a;
    a.q = q; a.k = k; a.v = v; a.key_zero = key_zero; a.zero_scale = zero_scale;
    a.theta_q = theta_q; a.theta_k = theta_k; a.pos_q = pos_q; a.pos_k = pos_k;
    a.seqlens_k = seqlens_k;
    return a;
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, const Opt& key_zero,
                            const at::Tensor& zero_scale, const Opt& theta_q,
                            const Opt& theta_k, const Opt& pos_q, const Opt& pos_k,
                            const Opt& seqlens_k, bool score, bool hard, bool causal,
                            double sm_scale, int64_t rotary_dim, bool interleaved) {
    zm_args::AttentionArgs a = record(q, k, v, key_zero, zero_scale, theta_q, theta_k,
                                      pos_q, pos_k, seqlens_k);
    a.score = score; a.hard = hard; a.causal = causal; a.sm_scale = sm_scale;
    a.rotary_dim = rotary_dim; a.interleaved = interleaved;
    auto [out, lse] = zm::forward(a);
    const at::Tensor none;
    ctx->save_for_backward({q, k, v, key_zero.value_or(none), zero_scale,
                            theta_q.value_or(none), theta_k.value_or(none),
                            pos_q.value_or(none), pos_k.value_or(none),
                            seqlens_k.value_or(none), out, lse});
    ctx->saved_data["score"] = score;
    ctx->saved_data["hard"] = hard;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["sm_scale"] = sm_scale;
    ctx->saved_data["rotary_dim"] = rotary_dim;
    ctx->saved_data["interleaved"] = interleaved;
    // (not ctx->needs_input_grad: its index counts only the inputs that are tensors, and
    // key_zero may be None)
    ctx->saved_data["need_dzs"] = !hard && zero_scale.requires_grad();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list dout) {
    const auto s = ctx->get_saved_variables();
    auto opt = [](const at::Tensor& t) { return t.defined() ? Opt(t) : std::nullopt; };
    zm_args::AttentionArgs a = record(s[0], s[1], s[2], opt(s[3]), s[4], opt(s[5]),
                                      opt(s[6]), opt(s[7]), opt(s[8]), opt(s[9]));
    a.score = ctx->saved_data["score"].toBool();
    a.hard = ctx->saved_data["hard"].toBool();
    a.causal = ctx->saved_data["causal"].toBool();
    a.sm_scale = ctx->saved_data["sm_scale"].toDouble();
    a.rotary_dim = ctx->saved_data["rotary_dim"].toInt();
    a.interleaved = ctx->saved_data["interleaved"].toBool();
    zm_args::check_attention_args(a, at::kCPU, "cpp");
    const at::Tensor& out = s[10];
    const at::Tensor& lse = s[11];
    at::Tensor dq = new_output(a.q.sizes(), a.q.options());
    at::Tensor dk = new_output(a.k.sizes(), a.q.options());
    at::Tensor dv = new_output(a.v.sizes(), a.q.options());
    at::Tensor g = dout[0].defined() ? dout[0].contiguous() : at::zeros_like(out);
    // a fixed zero_scale (the default) skips prob mode's sums for d ln s
    const bool need_dzs = ctx->saved_data["need_dzs"].toBool();
    auto grads = attention_backward(a, g, out, lse, dq, dk, dv, need_dzs);  // dtq, dtk, drad, dzs
    // hard mode has no zero_scale in its math: no gradient flows to it
    at::Tensor dzs = need_dzs ? grads[3] : at::Tensor();
    const at::Tensor none;
    return {dq, dk, dv, none, dzs, grads[0], grads[1], none, none, none,
            none, none, none, none, none, none};
  }
};

}  // namespace

py::object attention_forward_fast(py::handle q_, py::handle k_, py::handle v_,
                                  py::handle key_zero_, py::handle zero_scale_,
                                  py::handle zero_mode_, py::handle causal_,
                                  py::handle sm_scale_, py::handle seqlens_k_,
                                  py::handle theta_q_, py::handle theta_k_, py::handle pos_q_,
                                  py::handle pos_k_, py::handle rotary_dim_,
                                  py::handle interleaved_, py::handle radius_,
                                  py::handle backend_) {
  const py::object declined = py::none();
  if (!resolves_to_cpp(backend_.ptr()) || radius_.ptr() != Py_None ||
      c10::impl::TorchDispatchModeTLS::stack_len() > 0)  // a dispatch mode sees every op
    return declined;
  auto q = plain_tensor(q_.ptr()), k = plain_tensor(k_.ptr()), v = plain_tensor(v_.ptr());
  if (!q || !k || !v) return declined;
  const auto dt = q->scalar_type();
  if (!(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) ||
      k->scalar_type() != dt || v->scalar_type() != dt)
    return declined;
  if (q->dim() != 4 || k->dim() != 4 || v->dim() != 4 || q->stride(3) != 1 ||
      k->stride(3) != 1 || v->stride(3) != 1 || k->sizes() != v->sizes())
    return declined;
  const int64_t B = q->size(0), Hq = q->size(1), Lq = q->size(2), D = q->size(3);
  const int64_t Hkv = k->size(1), Lk = k->size(2);
  if (k->size(0) != B || k->size(3) != D || Hkv == 0 || Hq % Hkv || D == 0 ||
      B * Hq * Lq * Lk == 0)
    return declined;

  zm_args::AttentionArgs a;
  a.q = *q; a.k = *k; a.v = *v;
  if (key_zero_.ptr() != Py_None) {
    auto kz = plain_tensor(key_zero_.ptr());
    if (!kz || kz->scalar_type() != at::kBool || kz->dim() != 2 || kz->size(0) != B ||
        kz->size(1) != Lk)
      return declined;
    a.key_zero = kz->contiguous();
  }
  if (!PyUnicode_CheckExact(zero_mode_.ptr())) return declined;
  const std::string mode = py::cast<std::string>(zero_mode_);
  if (mode != "prob" && mode != "score" && mode != "hard") return declined;
  a.score = mode == "score";
  a.hard = mode == "hard";
  double zs = 0;
  if (auto n = plain_number(zero_scale_.ptr())) {
    zs = *n;
  } else if (auto t = plain_tensor(zero_scale_.ptr())) {
    if (t->numel() != 1 || !t->is_floating_point()) return declined;
    zs = t->item<double>();
    a.zero_scale = t->reshape({}).to(at::kFloat);  // (differentiable: a learnable scale)
  } else {
    return declined;
  }
  if (!(zs > 0.0 && zs <= 1.0 && zs >= MIN_ZERO_SCALE)) return declined;
  if (!a.zero_scale.defined())
    a.zero_scale = at::scalar_tensor(zs, at::TensorOptions().dtype(at::kFloat));
  auto causal = plain_bool(causal_.ptr()), interleaved = plain_bool(interleaved_.ptr());
  if (!causal || !interleaved) return declined;
  a.causal = *causal;
  a.interleaved = *interleaved;
  if (sm_scale_.ptr() == Py_None) {
    a.sm_scale = std::pow(static_cast<double>(D), -0.5);
  } else {
    auto s = plain_number(sm_scale_.ptr());
    if (!s || !(std::isfinite(*s) && *s > 0)) return declined;
    a.sm_scale = *s;
  }
  if (seqlens_k_.ptr() != Py_None) {
    auto s = plain_tensor(seqlens_k_.ptr());
    if (!s || !(s->scalar_type() == at::kInt || s->scalar_type() == at::kLong) ||
        s->dim() != 1 || s->size(0) != B)
      return declined;
    at::Tensor s32 = s->to(at::kInt).contiguous();
    const int32_t* p = s32.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      if (p[b] < 0 || p[b] > Lk) return declined;
    if (s->scalar_type() == at::kLong) {  // (a value past int32 wrapped in the cast)
      at::Tensor s64 = s->contiguous();
      const int64_t* p64 = s64.data_ptr<int64_t>();
      for (int64_t b = 0; b < B; ++b)
        if (p64[b] != p[b]) return declined;
    }
    a.seqlens_k = s32;
  }
  const bool rotary = theta_q_.ptr() != Py_None || theta_k_.ptr() != Py_None;
  if (rotary_dim_.ptr() == Py_None) {
    a.rotary_dim = D - D % 2;
    if (rotary && a.rotary_dim == 0) return declined;
  } else {
    auto r = plain_int(rotary_dim_.ptr());
    if (!rotary || !r || *r <= 0 || *r % 2 || *r > D) return declined;
    a.rotary_dim = *r;
  }
  auto sq = rotary_side(theta_q_.ptr(), pos_q_.ptr(), B, Lq, a.causal ? Lk - Lq : 0);
  if (!sq) return declined;
  a.theta_q = sq->theta; a.pos_q = sq->pos;
  const bool same = theta_k_.ptr() == theta_q_.ptr() && Lk == Lq;
  auto sk = rotary_side(theta_k_.ptr(), pos_k_.ptr(), B, Lk, 0,
                        same ? a.theta_q : std::nullopt);
  if (!sk) return declined;
  a.theta_k = sk->theta; a.pos_k = sk->pos;

  const bool differentiable = needs_grad(a.q) || needs_grad(a.k) || needs_grad(a.v) ||
                              needs_grad(a.zero_scale) ||
                              (a.theta_q && needs_grad(*a.theta_q)) ||
                              (a.theta_k && needs_grad(*a.theta_k));
  if (differentiable)  // (with the GIL: autograd may call Python saved-tensor hooks)
    return py::cast(AttentionFunction::apply(a.q, a.k, a.v, a.key_zero, a.zero_scale,
                                             a.theta_q, a.theta_k, a.pos_q, a.pos_k,
                                             a.seqlens_k, a.score, a.hard, a.causal,
                                             a.sm_scale, a.rotary_dim, a.interleaved));
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = forward(a).first;
  }
  return py::cast(out);
}

}  // namespace zm
