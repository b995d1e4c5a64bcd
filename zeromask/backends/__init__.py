"""Backend adapters: one module per backend, each exposing ``BACKEND``, a :class:`Backend`.

:mod:`zeromask.dispatch` is the only place that chooses among them; the autograd glue in
:mod:`zeromask.ops` calls the chosen backend's kernels with *normalised* arguments, so a
backend never validates user input and never sees a Python float where a tensor is meant.

The kernel contract (every backend except ``reference``, whose autograd is PyTorch's own).
A call's arguments travel as one record from validation (:func:`zeromask.ops.zero_soft_attention`)
to the kernels: :class:`AttentionArgs` / :class:`RotaryArgs` (the C++ bindings read the same
record by field name, csrc/include/zeromask_args_py.h, into the struct and checks of
csrc/include/zeromask_args.h).

Attention (docs/design.md 3.3)::

    attention_forward(a: AttentionArgs) -> (out, lse)
    attention_backward(do, out, lse, a: AttentionArgs)
        -> (dq, dk, dv, dtheta_q, dtheta_k, dradius, dzero_scale)

    a.q (B, Hq, Lq, D); a.k, a.v (B, Hkv, Lk, D): one dtype (fp16, bf16 or fp32), one
        device, last dim contiguous (other strides arbitrary), Hq % Hkv == 0.
    out: q's dtype, (B, Hq, Lq, D) contiguous; rows whose keys are all hard-masked are 0.
    lse: float32 (B, Hq, Lq), natural-log row logsumexp of the masked logits, -inf for an
        empty row.
    do: contiguous, out's shape and dtype. dq/dk/dv in the input dtype; dtheta_* float32 of
    theta's shape (None when that theta is None); dradius float32 (R/2,) or None;
    dzero_scale float32 0-dim (None when key_zero is None).

Rotary (docs/design.md 3.1)::

    rotary_forward(r: RotaryArgs) -> y
    rotary_backward(dy, r: RotaryArgs) -> (dx, dtheta, dradius)

    y, dx: x's dtype and shape; dtheta float32 (B, L); dradius float32 (R/2,) or None.

``available()`` returns None when the backend can run at all in this process, else the
reason; ``supports(op, args)`` returns None when it can serve that call, else the reason
(op is "attention" or "rotary", args its record). A backend may also offer
``attention_forward_fast`` (see :class:`Backend`), which :func:`zeromask.dispatch.fast_path`
hands out.
Outputs are allocated with :func:`zeromask.outputs.new_output`, so tests can poison them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor


class AttentionArgs(NamedTuple):
    """One attention call's normalised arguments, as validation hands them to a backend.

    Tensor fields first (``None`` where absent), flags last; every tensor is on q's device,
    and the float ones other than q/k/v are float32 (float64 for float64 inputs, which only
    the reference backend takes).
    """

    q: Tensor                    # (B, Hq, Lq, D), last dim contiguous
    k: Tensor                    # (B, Hkv, Lk, D), q's dtype
    v: Tensor                    # (B, Hkv, Lk, D), q's dtype
    key_zero: Optional[Tensor]   # bool (B, Lk) contiguous: True = zero token
    zero_scale: Tensor           # 0-dim, in (0, 1]; unused when zero_mode == "hard"
    theta_q: Optional[Tensor]    # (B, Lq) contiguous, or None: no rotary on the queries
    theta_k: Optional[Tensor]    # (B, Lk) contiguous, or None: no rotary on the keys
    pos_q: Optional[Tensor]      # (B, Lq), given exactly when theta_q is
    pos_k: Optional[Tensor]      # (B, Lk), given exactly when theta_k is
    radius: Optional[Tensor]     # (rotary_dim / 2,) or None
    seqlens_k: Optional[Tensor]  # int32 (B,) or None
    zero_mode: str               # "prob" | "score" | "hard" (zero keys -inf)
    causal: bool                 # bottom-right aligned
    sm_scale: float
    rotary_dim: int              # even, <= D
    interleaved: bool

    def tensors(self) -> tuple:
        """The tensor fields (q .. seqlens_k), in order."""
        return self[:_ATTENTION_TENSORS]

    def flags(self) -> tuple:
        """The non-tensor fields (zero_mode .. interleaved), in order."""
        return self[_ATTENTION_TENSORS:]

    def keywords(self) -> dict:
        """Every field after q, k, v by name: the keyword arguments of the reference."""
        return dict(zip(self._fields[3:], self[3:]))


_ATTENTION_TENSORS = AttentionArgs._fields.index("zero_mode")


class RotaryArgs(NamedTuple):
    """One rotary call's normalised arguments."""

    x: Tensor                    # (B, H, L, D), last dim contiguous
    theta: Tensor                # (B, L) contiguous
    positions: Tensor            # (B, L) contiguous
    radius: Optional[Tensor]     # (rotary_dim / 2,) or None
    rotary_dim: int
    interleaved: bool


Args = Union[AttentionArgs, RotaryArgs]


#: the input dtypes every compiled backend takes (float64 runs on the reference).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def common_support(name: str, args: Args, max_head_dim: Optional[int] = None,
                   min_head_dim: Optional[int] = None) -> Optional[str]:
    """The ``supports`` checks compiled backends share: a dtype the kernels take and an
    optional head-dim limit. None when they pass, else the reason."""
    x = args[0]
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
    #: the whole of an eager call (its autograd formula included where an input requires
    #: grad), from the user's own arguments (zero_soft_attention's, in order, then
    #: ``backend``), in one compiled function: returns the output, or None where the call
    #: is not one it takes (then the checked path runs). Optional; only ``cpp`` has one
    #: (csrc/cpu/fast_path.cpp).
    attention_forward_fast: Optional[Callable] = None
