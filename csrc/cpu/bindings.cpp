// The Python module zeromask._C_cpu: each function takes the call's record
// (zeromask.backends.AttentionArgs / RotaryArgs) first; csrc/include/zeromask_args_py.h reads
// and checks it, csrc/cpu/kernels.h runs it.
#include <torch/extension.h>

#include "fast_path.h"
#include "kernels.h"
#include "zeromask_args_py.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zeromask CPU kernels: fused f0 rotary + zero-soft attention, f0 rotary";
  // each takes the call's record (zeromask.backends.AttentionArgs / RotaryArgs) first
  m.def("attention_fwd", [](const py::object& args, at::Tensor out, at::Tensor lse) {
    zm::attention_forward(zm_args::attention_args(args, at::kCPU, "cpp"), out, lse);
  }, "fused attention forward (writes out, lse)");
  m.def("attention_bwd", [](const py::object& args, const at::Tensor& dout,
                            const at::Tensor& out, const at::Tensor& lse, at::Tensor dq,
                            at::Tensor dk, at::Tensor dv) {
    return zm::attention_backward(zm_args::attention_args(args, at::kCPU, "cpp"), dout, out,
                                  lse, dq, dk, dv);
  }, "fused attention backward (writes dq, dk, dv; returns dtheta_q, dtheta_k, dradius, dzero_scale or None)");
  m.def("attention_forward_fast", &zm::attention_forward_fast,
        "zero_soft_attention in one call where it takes the call (eager, CPU, plain "
        "arguments; a C++ autograd Function where an input requires grad), else None");
  m.def("rotary_fwd", [](const py::object& args, at::Tensor y) {
    zm::rotary_forward(zm_args::rotary_args(args, at::kCPU, "cpp"), y);
  }, "f0 rotary forward (writes y)");
  m.def("rotary_bwd", [](const py::object& args, const at::Tensor& dy, at::Tensor dx,
                         at::Tensor dtheta, std::optional<at::Tensor> drad_part) {
    zm::rotary_backward(zm_args::rotary_args(args, at::kCPU, "cpp"), dy, dx, dtheta, drad_part);
  }, "f0 rotary backward (writes dx, dtheta, drad_part)");
}
