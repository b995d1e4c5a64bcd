"""The CUDA extension backend: ``zeromask._C_cuda`` (csrc/cuda) behind the kernel contract.

For GPUs where Triton cannot serve the call. The device code is plain CUDA C++ on raw
pointers; this launcher allocates every output with :func:`new_output`, zeroes the buffers
the kernels accumulate into atomically (theta, radius and zero-scale gradients), and hands
the kernels torch's current CUDA stream as an integer. q/k/v are used with their own
strides (contiguous last dim); nothing is copied. Head dims up to 128.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..outputs import new_output
from . import Backend, common_support

MAX_HEAD_DIM = 128  # csrc/cuda/zeromask_cuda.h kMaxHeadDim

try:  # built only where torch has CUDA and a toolkit was found at install time
    from .. import _C_cuda as _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(exc)


def available() -> Optional[str]:
    if _C is None:
        if torch.version.cuda is None:
            return ("the CUDA extension zeromask._C_cuda is not built: this torch "
                    f"({torch.__version__}) has no CUDA support")
        return ("the CUDA extension zeromask._C_cuda was not built (" + str(_IMPORT_ERROR) +
                "): reinstall with `pip install --no-build-isolation .` on a machine with a "
                "CUDA toolkit (CUDA_HOME) and ZEROMASK_NO_EXT / ZEROMASK_NO_CUDA_EXT unset")
    if not torch.cuda.is_available():
        return "the CUDA extension is built but no CUDA device is available"
    return None


def supports(op: str, **call) -> Optional[str]:
    if op == "attention" and call.get("zero_mode") == "hard":
        return ("cuda backend: zero_mode='hard' is not verified on a GPU yet (its empty-row "
                "rule differs); the triton and reference backends serve it")
    return common_support("cuda", op, call,
                          max_head_dim=MAX_HEAD_DIM if op == "attention" else None,
                          min_head_dim=2)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _zeroed(shape, device) -> torch.Tensor:
    """An output the kernel accumulates into atomically: allocated, then zeroed."""
    return new_output(shape, dtype=torch.float32, device=device).zero_()


def attention_forward(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k, radius,
                      seqlens_k, *, zero_mode, causal, sm_scale, rotary_dim, interleaved):
    B, Hq, Lq, D = q.shape
    out = new_output((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    lse = new_output((B, Hq, Lq), dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        _C.attention_fwd(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k, radius,
                         seqlens_k, zero_mode == "score", bool(causal), float(sm_scale),
                         int(rotary_dim), bool(interleaved), out, lse, _stream(q))
    return out, lse


def attention_backward(do, q, k, v, out, lse, key_zero, zero_scale, theta_q, theta_k, pos_q,
                       pos_k, radius, seqlens_k, *, zero_mode, causal, sm_scale, rotary_dim,
                       interleaved):
    dev = q.device
    dq = new_output(q.shape, dtype=q.dtype, device=dev)
    dk = new_output(k.shape, dtype=k.dtype, device=dev)
    dv = new_output(v.shape, dtype=v.dtype, device=dev)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=dev)  # scratch
    dtq = _zeroed(theta_q.shape, dev) if theta_q is not None else None
    dtk = _zeroed(theta_k.shape, dev) if theta_k is not None else None
    drad = _zeroed(radius.shape, dev) if radius is not None else None
    dzs = _zeroed((), dev) if key_zero is not None else None
    with torch.cuda.device(dev):
        _C.attention_bwd(do.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), key_zero,
                         zero_scale, theta_q, theta_k, pos_q, pos_k, radius, seqlens_k,
                         zero_mode == "score", bool(causal), float(sm_scale), int(rotary_dim),
                         bool(interleaved), delta, dq, dk, dv, dtq, dtk, drad, dzs, _stream(q))
    return dq, dk, dv, dtq, dtk, drad, dzs


def rotary_forward(x, theta, positions, radius, *, rotary_dim, interleaved):
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        _C.rotary_fwd(x, theta, positions, radius, int(rotary_dim), bool(interleaved), y,
                      _stream(x))
    return y


def rotary_backward(dy, x, theta, positions, radius, *, rotary_dim, interleaved):
    B, _, L, _ = x.shape
    dx = new_output(x.shape, dtype=x.dtype, device=x.device)
    dtheta = new_output((B, L), dtype=torch.float32, device=x.device)
    drad = _zeroed(radius.shape, x.device) if radius is not None else None
    with torch.cuda.device(x.device):
        _C.rotary_bwd(dy.contiguous(), x, theta, positions, radius, int(rotary_dim),
                      bool(interleaved), dx, dtheta, drad, _stream(x))
    return dx, dtheta, drad


BACKEND = Backend(
    name="cuda",
    available=available,
    supports=supports,
    attention_forward=attention_forward,
    attention_backward=attention_backward,
    rotary_forward=rotary_forward,
    rotary_backward=rotary_backward,
    device_types=("cuda",),
)
