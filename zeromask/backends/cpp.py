"""The C++ CPU backend: ``zeromask._C_cpu`` (csrc/cpu) behind the kernel contract.

Forward: flash-style tiles with online softmax, rotary applied on the fly, keys rotated once
per (batch, kv head); backward: all gradients of the contract. Every output is allocated
here with :func:`new_output` (so tests can NaN-poison it) and written by the kernel, which
also reduces its per-task partial sums for the theta, radius and zero_scale gradients.
q/k/v are used with their own strides (contiguous last dim); nothing is copied.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..outputs import new_output
from . import AttentionArgs, Backend, RotaryArgs, common_support


try:  # the compiled extension is optional: the package works without it (reference)
    from .. import _C_cpu as _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(exc)


def available() -> Optional[str]:
    if _C is None:
        return ("the C++ extension zeromask._C_cpu was not built (" + str(_IMPORT_ERROR) +
                "): reinstall with `pip install --no-build-isolation .` with torch installed "
                "and ZEROMASK_NO_EXT unset")
    return None


def supports(op: str, args) -> Optional[str]:
    return common_support("cpp", args)


def attention_forward(a: AttentionArgs):
    B, Hq, Lq, D = a.q.shape
    out = new_output((B, Hq, Lq, D), dtype=a.q.dtype, device=a.q.device)
    lse = new_output((B, Hq, Lq), dtype=torch.float32, device=a.q.device)
    _C.attention_fwd(a, out, lse)
    return out, lse


def attention_backward(do, out, lse, a: AttentionArgs):
    q, k, v = a.q, a.k, a.v
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=q.device)
    dv = new_output(v.shape, dtype=v.dtype, device=q.device)
    dtq, dtk, drad, dzs = _C.attention_bwd(a, do.contiguous(), out.contiguous(),
                                           lse.contiguous(), dq, dk, dv)
    return dq, dk, dv, dtq, dtk, drad, dzs


def rotary_forward(r: RotaryArgs):
    y = new_output(r.x.shape, dtype=r.x.dtype, device=r.x.device)
    _C.rotary_fwd(r, y)
    return y


def rotary_backward(dy, r: RotaryArgs):
    B, _, L, _ = r.x.shape
    dx = new_output(r.x.shape, dtype=r.x.dtype, device=r.x.device)
    dtheta = new_output((B, L), dtype=torch.float32, device=r.x.device)
    drad_part = torch.empty((B * L, r.rotary_dim // 2), dtype=torch.float64,
                            device=r.x.device) if r.radius is not None else None
    _C.rotary_bwd(r, dy.contiguous(), dx, dtheta, drad_part)
    drad = drad_part.sum(0).float() if r.radius is not None else None
    return dx, dtheta, drad


BACKEND = Backend(
    name="cpp",
    available=available,
    supports=supports,
    attention_forward=attention_forward,
    attention_backward=attention_backward,
    rotary_forward=rotary_forward,
    rotary_backward=rotary_backward,
    device_types=("cpu",),
    attention_forward_fast=_C.attention_forward_fast if _C is not None else None,
)
