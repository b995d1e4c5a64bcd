"""Backend adapters: one module per backend, each exposing ``BACKEND``, a :class:`Backend`.

:mod:`zeromask.dispatch` is the only place that chooses among them; the autograd glue in
:mod:`zeromask.ops` calls the chosen backend's kernels with *normalised* arguments, so a
backend never validates user input and never sees a Python float where a tensor is meant.

The kernel contract (every backend except ``reference``, whose autograd is PyTorch's own):

Attention (docs/design.md 3.3)::

    attention_forward(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k,
                      radius, seqlens_k, *, zero_mode, causal, sm_scale, rotary_dim,
                      interleaved) -> (out, lse)
    attention_backward(do, q, k, v, out, lse, <same arguments as the forward>)
        -> (dq, dk, dv, dtheta_q, dtheta_k, dradius, dzero_scale)

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); one dtype (fp16, bf16 or fp32), one device,
        last dim contiguous (other strides arbitrary), Hq % Hkv == 0.
    key_zero   bool (B, Lk) contiguous, or None (no zero tokens).
    zero_scale float32 0-dim tensor on the device, in (0, 1].
    theta_q / theta_k  float32 (B, Lq) / (B, Lk) contiguous, or None (no rotary on that
        side); pos_q / pos_k float32 of the same shape, given exactly when the theta is.
    radius     float32 (rotary_dim / 2,) or None.   seqlens_k int32 (B,) or None.
    zero_mode  "prob" | "score" | "hard" (zero keys -inf; zero_scale then unused and
        dzero_scale ignored);  causal bool (bottom-right aligned);  sm_scale float;
    rotary_dim even int <= D;  interleaved bool.
    out: q's dtype, (B, Hq, Lq, D) contiguous; rows whose keys are all hard-masked are 0.
    lse: float32 (B, Hq, Lq), natural-log row logsumexp of the masked logits, -inf for an
        empty row.
    do: contiguous, out's shape and dtype. dq/dk/dv in the input dtype; dtheta_* float32 of
    theta's shape (None when that theta is None); dradius float32 (R/2,) or None;
    dzero_scale float32 0-dim (None when key_zero is None).

Rotary (docs/design.md 3.1)::

    rotary_forward(x, theta, positions, radius, *, rotary_dim, interleaved) -> y
    rotary_backward(dy, x, theta, positions, radius, *, rotary_dim, interleaved)
        -> (dx, dtheta, dradius)

    x (B, H, L, D) fp16/bf16/fp32 with contiguous last dim; theta, positions float32 (B, L)
    contiguous; radius float32 (R/2,) or None.  y, dx: x's dtype and shape.

``available()`` returns None when the backend can run at all in this process, else the
reason; ``supports(op, **call)`` returns None when it can serve that call, else the reason
(op is "attention" or "rotary"; call holds the forward's tensors and flags by name).
Outputs are allocated with :func:`zeromask.outputs.new_output`, so tests can poison them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


#: the input dtypes every compiled backend takes (float64 runs on the reference).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def common_support(name: str, op: str, call: dict, max_head_dim: Optional[int] = None,
                   min_head_dim: Optional[int] = None) -> Optional[str]:
    """The ``supports`` checks compiled backends share: an input to judge by, a dtype the
    kernels take, and an optional head-dim limit. None when they pass, else the reason."""
    x = call.get("q") if op == "attention" else call.get("x")
    if x is None:
        return f"{name} backend: no input tensor for {op!r}"
    if x.dtype not in KERNEL_DTYPES:
        return (f"{name} kernels take float16, bfloat16 or float32, got {x.dtype} "
                "(float64 runs on the reference backend)")
    if max_head_dim is not None and x.shape[-1] > max_head_dim:
        return f"{name} kernels support head dims up to {max_head_dim}, got {x.shape[-1]}"
    if min_head_dim is not None and x.shape[-1] < min_head_dim:
        return f"{name} kernels need a head dim of at least {min_head_dim}, got {x.shape[-1]}"
    return None


@dataclass
class Backend:
    """A named set of kernels plus the checks that say when they can run."""

    name: str
    available: Callable[[], Optional[str]]
    supports: Callable[..., Optional[str]]
    attention_forward: Optional[Callable] = None
    attention_backward: Optional[Callable] = None
    rotary_forward: Optional[Callable] = None
    rotary_backward: Optional[Callable] = None
    device_types: tuple = ("cpu", "cuda")
