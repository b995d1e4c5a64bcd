// The CPU kernels' entry points, called by bindings.cpp with the checked record
// (csrc/include/zeromask_args.h); each writes its outputs in full.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "zeromask_args.h"

namespace zm {

void attention_forward(const zm_args::AttentionArgs& x, at::Tensor out, at::Tensor lse);

// Writes dq, dk, dv in full and returns the other gradients: dtheta_q (B, Lq), dtheta_k
// (B, Lk), dradius (R/2,), dzero_scale (0-dim), float32, each undefined (None in Python)
// where that input is absent, or, for dzero_scale, where `need_dzero_scale` is false (a
// zero_scale that does not require grad: the prob-mode sums it needs are skipped; dq, dk
// and dv are bitwise the same either way).
std::vector<at::Tensor> attention_backward(const zm_args::AttentionArgs& x,
                                           const at::Tensor& dout, const at::Tensor& out,
                                           const at::Tensor& lse, at::Tensor dq, at::Tensor dk,
                                           at::Tensor dv, bool need_dzero_scale = true);

void rotary_forward(const zm_args::RotaryArgs& r, at::Tensor y);

// dx (like x, contiguous), dtheta (B, L) float32, drad_part (B*L, R/2) float64 or None.
void rotary_backward(const zm_args::RotaryArgs& r, const at::Tensor& dy, at::Tensor dx,
                     at::Tensor dtheta, std::optional<at::Tensor> drad_part);

}  // namespace zm
