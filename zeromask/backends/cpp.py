"""The C++ CPU backend: ``zeromask._C_cpu`` (csrc/cpu) behind the kernel contract.

Forward: flash-style tiles with online softmax, rotary applied on the fly, keys rotated once
per (batch, kv head); backward: all gradients of the contract. Every output is allocated
here with :func:`new_output` (so tests can NaN-poison it) and written by the kernel;
per-task partial sums for theta, radius and zero_scale gradients are reduced here.
q/k/v are used with their own strides (contiguous last dim); nothing is copied.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..outputs import new_output
from . import Backend, common_support


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


def _kernel_zero_mode(zero_scale: torch.Tensor, zero_mode: str) -> Tuple[torch.Tensor, str]:
    """``(zero_scale, zero_mode)`` as the C++ kernels take them: ``"hard"`` is prob mode
    with ``s = 0`` (``ln s = -inf``: every zero key's bias is -inf, as for a key past
    seqlens_k; the kernel then treats a row that sees no other key as empty)."""
    if zero_mode == "hard":
        return torch.zeros_like(zero_scale), "prob"
    return zero_scale, zero_mode


def supports(op: str, **call) -> Optional[str]:
    return common_support("cpp", op, call)


def attention_forward(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k, radius,
                      seqlens_k, *, zero_mode, causal, sm_scale, rotary_dim, interleaved):
    B, Hq, Lq, D = q.shape
    zero_scale, zero_mode = _kernel_zero_mode(zero_scale, zero_mode)
    out = new_output((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    lse = new_output((B, Hq, Lq), dtype=torch.float32, device=q.device)
    _C.attention_fwd(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k, radius,
                     seqlens_k, zero_mode == "score", bool(causal), float(sm_scale),
                     int(rotary_dim), bool(interleaved), out, lse)
    return out, lse


def attention_backward(do, q, k, v, out, lse, key_zero, zero_scale, theta_q, theta_k, pos_q,
                       pos_k, radius, seqlens_k, *, zero_mode, causal, sm_scale, rotary_dim,
                       interleaved):
    dev = q.device
    zero_scale, zero_mode = _kernel_zero_mode(zero_scale, zero_mode)
    dq = new_output(q.shape, dtype=q.dtype, device=dev)
    dk = new_output(k.shape, dtype=k.dtype, device=dev)
    dv = new_output(v.shape, dtype=v.dtype, device=dev)
    # the kernel returns per-task partial sums (no atomics); reduce them into the outputs
    dtq_part, dtk_part, drad_part, dzs_part = _C.attention_bwd(
        do.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), key_zero, zero_scale,
        theta_q, theta_k, pos_q, pos_k, radius, seqlens_k, zero_mode == "score", bool(causal),
        float(sm_scale), int(rotary_dim), bool(interleaved), dq, dk, dv)
    # (float32 head sums (B, H, L) for theta, float64 task sums for radius and zero_scale)
    dtq = dtq_part.sum(1) if theta_q is not None else None
    dtk = dtk_part.sum(1) if theta_k is not None else None
    drad = drad_part.sum(0).float() if radius is not None else None
    dzs = dzs_part.sum().float() if key_zero is not None else None
    return dq, dk, dv, dtq, dtk, drad, dzs


def rotary_forward(x, theta, positions, radius, *, rotary_dim, interleaved):
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    _C.rotary_fwd(x, theta, positions, radius, int(rotary_dim), bool(interleaved), y)
    return y


def rotary_backward(dy, x, theta, positions, radius, *, rotary_dim, interleaved):
    B, _, L, _ = x.shape
    dx = new_output(x.shape, dtype=x.dtype, device=x.device)
    dtheta = new_output((B, L), dtype=torch.float32, device=x.device)
    drad_part = torch.empty((B * L, rotary_dim // 2), dtype=torch.float64, device=x.device) \
        if radius is not None else None
    _C.rotary_bwd(dy.contiguous(), x, theta, positions, radius, int(rotary_dim),
                  bool(interleaved), dx, dtheta, drad_part)
    drad = drad_part.sum(0).float() if radius is not None else None
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
)
