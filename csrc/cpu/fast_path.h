// The CPU fast path of zeromask.zero_soft_attention (fast_path.cpp): the call's own
// arguments in zero_soft_attention's order; returns the output, or None where the call is
// not one it takes (zeromask/ops.py then runs its full path).
#pragma once
#include <torch/extension.h>

namespace zm {

py::object attention_forward_fast(py::handle q, py::handle k, py::handle v,
                                  py::handle key_zero, py::handle zero_scale,
                                  py::handle zero_mode, py::handle causal,
                                  py::handle sm_scale, py::handle seqlens_k,
                                  py::handle theta_q, py::handle theta_k, py::handle pos_q,
                                  py::handle pos_k, py::handle rotary_dim,
                                  py::handle interleaved, py::handle radius,
                                  py::handle backend);

}  // namespace zm
