"""The Triton backend: the kernels of :mod:`zeromask.kernels` behind the kernel contract.

Runs compiled on CUDA tensors; on CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is first imported), which is how the test suite
checks the kernels on a machine without a GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import Backend, common_support

MAX_HEAD_DIM = 256


def _available() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    try:
        from zeromask.kernels import attention, rotary  # noqa: F401
    except Exception as exc:
        return f"zeromask.kernels could not be imported ({type(exc).__name__}: {exc})"
    return None


def _device_reason(t: torch.Tensor) -> Optional[str]:
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported (slow; meant for tests)")
    return f"triton backend does not run on {t.device.type} tensors"


def _supports(op: str, args) -> Optional[str]:
    if op == "attention":
        names = ("q", "k", "v")
    elif op == "rotary":
        names = ("x",)
    else:
        return f"triton backend has no {op!r} op"
    why = _device_reason(args[0])
    if why is not None:
        return why
    why = common_support("triton", args, max_head_dim=MAX_HEAD_DIM, min_head_dim=2)
    if why is not None:
        return why
    for name in names:
        if getattr(args, name).stride(-1) != 1:
            return f"{name} must have a contiguous last dim"
    return None


def _attention_forward(*args, **kwargs):
    from zeromask.kernels import attention
    return attention.attention_forward(*args, **kwargs)


def _attention_backward(*args, **kwargs):
    from zeromask.kernels import attention
    return attention.attention_backward(*args, **kwargs)


def _rotary_forward(*args, **kwargs):
    from zeromask.kernels import rotary
    return rotary.rotary_forward(*args, **kwargs)


def _rotary_backward(*args, **kwargs):
    from zeromask.kernels import rotary
    return rotary.rotary_backward(*args, **kwargs)


BACKEND = Backend(
    name="triton",
    available=_available,
    supports=_supports,
    attention_forward=_attention_forward,
    attention_backward=_attention_backward,
    rotary_forward=_rotary_forward,
    rotary_backward=_rotary_backward,
    device_types=("cuda", "cpu"),
)
