"""zeromask: fused f0-rotary + zero-soft attention for speech models.

Public API::

    zeromask.zero_soft_attention(q, k, v, *, key_zero=None, zero_scale=1e-6, ...)
    zeromask.f0_rotary(x, theta, *, positions=None, ...)
    zeromask.ZeroSoftAttention   # drop-in for nn.MultiheadAttention
    zeromask.F0Rotary            # F0 contour -> per-position theta (learnable)
    zeromask.zero                # which tokens are zero
    zeromask.dispatch            # backend choice: available_backends(), BackendError
"""
from . import dispatch, reference, zero
from .dispatch import BackendError, available_backends
from .modules import F0Rotary, ZeroSoftAttention, resample_contour, swap_attention
from .ops import f0_rotary, set_value_checks, zero_soft_attention

__version__ = "0.1.0"

__all__ = [
    "zero_soft_attention",
    "f0_rotary",
    "set_value_checks",
    "ZeroSoftAttention",
    "F0Rotary",
    "swap_attention",
    "resample_contour",
    "zero",
    "dispatch",
    "reference",
    "BackendError",
    "available_backends",
    "__version__",
]
