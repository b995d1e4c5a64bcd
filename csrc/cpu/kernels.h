// The CPU kernels' entry points, called by bindings.cpp with the checked record
// (csrc/include/zeromask_args.h); each writes its outputs in full.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "zeromask_args.h"

namespace zm {

void attention_forward(const zm_args::AttentionArgs& x, at::Tensor out, at::Tensor lse);

// Returns the partial sums (dtheta_q (B, Hq, Lq), dtheta_k (B, Hkv, Lk), dradius (n, R/2),
// dzero_scale (n,)), each an empty tensor when not needed; zeromask/backends/cpp.py reduces
// them into the outputs.  dq, dk, dv are written in full.
std::vector<at::Tensor> attention_backward(const zm_args::AttentionArgs& x,
                                           const at::Tensor& dout, const at::Tensor& out,
                                           const at::Tensor& lse, at::Tensor dq, at::Tensor dk,
                                           at::Tensor dv);

void rotary_forward(const zm_args::RotaryArgs& r, at::Tensor y);

// dx (like x, contiguous), dtheta (B, L) float32, drad_part (B*L, R/2) float64 or None.
void rotary_backward(const zm_args::RotaryArgs& r, const at::Tensor& dy, at::Tensor dx,
                     at::Tensor dtheta, std::optional<at::Tensor> drad_part);

}  // namespace zm
