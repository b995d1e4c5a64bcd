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
from . import AttentionArgs, Backend, RotaryArgs, common_support

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


def supports(op: str, args) -> Optional[str]:
    if op == "attention" and args.zero_mode == "hard":
        return ("cuda backend: zero_mode='hard' is not verified on a GPU yet (its empty-row "
                "rule differs); the triton and reference backends serve it")
    return common_support("cuda", args,
                          max_head_dim=MAX_HEAD_DIM if op == "attention" else None,
                          min_head_dim=2)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _zeroed(shape, device) -> torch.Tensor:
    """An output the kernel accumulates into atomically: allocated, then zeroed."""
    return new_output(shape, dtype=torch.float32, device=device).zero_()


def attention_forward(a: AttentionArgs):
    B, Hq, Lq, D = a.q.shape
    out = new_output((B, Hq, Lq, D), dtype=a.q.dtype, device=a.q.device)
    lse = new_output((B, Hq, Lq), dtype=torch.float32, device=a.q.device)
    with torch.cuda.device(a.q.device):
        _C.attention_fwd(a, out, lse, _stream(a.q))
    return out, lse


def attention_backward(do, out, lse, a: AttentionArgs):
    q, k, v = a.q, a.k, a.v
    dev = q.device
    dq = new_output(q.shape, dtype=q.dtype, device=dev)
    dk = new_output(k.shape, dtype=k.dtype, device=dev)
    dv = new_output(v.shape, dtype=v.dtype, device=dev)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=dev)  # scratch
    dtq = _zeroed(a.theta_q.shape, dev) if a.theta_q is not None else None
    dtk = _zeroed(a.theta_k.shape, dev) if a.theta_k is not None else None
    drad = _zeroed(a.radius.shape, dev) if a.radius is not None else None
    dzs = _zeroed((), dev) if a.key_zero is not None else None
    with torch.cuda.device(dev):
        _C.attention_bwd(a, do.contiguous(), out.contiguous(), lse.contiguous(), delta, dq, dk,
                         dv, dtq, dtk, drad, dzs, _stream(q))
    return dq, dk, dv, dtq, dtk, drad, dzs


def rotary_forward(r: RotaryArgs):
    y = new_output(r.x.shape, dtype=r.x.dtype, device=r.x.device)
    with torch.cuda.device(r.x.device):
        _C.rotary_fwd(r, y, _stream(r.x))
    return y


def rotary_backward(dy, r: RotaryArgs):
    B, _, L, _ = r.x.shape
    dx = new_output(r.x.shape, dtype=r.x.dtype, device=r.x.device)
    dtheta = new_output((B, L), dtype=torch.float32, device=r.x.device)
    drad = _zeroed(r.radius.shape, r.x.device) if r.radius is not None else None
    with torch.cuda.device(r.x.device):
        _C.rotary_bwd(r, dy.contiguous(), dx, dtheta, drad, _stream(r.x))
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
