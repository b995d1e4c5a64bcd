"""Public functionals: input validation, argument normalisation and the autograd glue.

``zero_soft_attention`` and ``f0_rotary`` check every argument (errors name it), normalise
it to the kernel contract of :mod:`zeromask.backends`, ask :mod:`zeromask.dispatch` for a
backend and run it. The ``reference`` backend runs with PyTorch's own autograd; every
kernel backend runs through the ``torch.library`` custom ops defined here
(``zeromask::attention_fwd`` / ``attention_bwd``, ``zeromask::rotary_fwd`` /
``rotary_bwd``), which carry fake (meta) implementations and autograd formulas so
``torch.compile(fullgraph=True)`` can trace a model that uses them.
"""
from __future__ import annotations

import inspect
import math
import os
import numbers
from typing import Optional, Tuple, Union

import torch

from . import dispatch, reference
from .backends import AttentionArgs, RotaryArgs

Tensor = torch.Tensor
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ZERO_MODES = ("prob", "score", "hard")


# --------------------------------------------------------------------------------------
# validation and normalisation
# --------------------------------------------------------------------------------------
def _compiling() -> bool:
    return torch.compiler.is_compiling()


_DEBUG_CHECKS = os.environ.get("ZEROMASK_CHECK_VALUES", "0") == "1"


def set_value_checks(enabled: bool) -> None:
    """Check the *values* of device tensors too (NaN theta, theta <= 1, seqlens_k range,
    zero_scale range, ...), not only those of CPU tensors.

    Such a check reads the tensor back to the host, which on a GPU waits for all queued
    work (a synchronisation per check): off by default for CUDA tensors, on for CPU ones
    (where it costs no wait). Also set by the environment: ``ZEROMASK_CHECK_VALUES=1``.
    Shapes, dtypes and devices are always checked.
    """
    global _DEBUG_CHECKS
    _DEBUG_CHECKS = bool(enabled)


def _check_values(t: Tensor) -> bool:
    """Whether to check ``t``'s values here: never while tracing; CPU tensors always; other
    devices only with :func:`set_value_checks` (a host read is a device synchronisation)."""
    return not _compiling() and (t.device.type == "cpu" or _DEBUG_CHECKS)


def _check_tensor(name: str, t, ndim: Optional[int] = None) -> Tensor:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    return t


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move it to {device}")


def _not_finite(name: str) -> ValueError:
    return ValueError(f"{name} contains NaN or inf; for an F0 contour use "
                      "zeromask.F0Rotary, which maps unvoiced (0/NaN) frames to theta_base")


def _value_range(t: Tensor) -> Optional[Tuple[float, float]]:
    """``(min, max)`` of ``t``'s values in one pass (NaN anywhere makes both NaN), or None
    where the values are not checked (:func:`_check_values`) or there are none. Every value
    check of an argument reads these two numbers, so checking costs one reduction."""
    if not _check_values(t) or t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t.detach())
    return lo.item(), hi.item()


def _finite(r: Tuple[float, float]) -> bool:
    return math.isfinite(r[0]) and math.isfinite(r[1])


#: tensors built from call-invariant arguments (default positions, a float theta or
#: zero_scale), reused across calls; the kernels and the reference only read them
_CONSTANTS: dict = {}


#: the largest constant kept (elements): the per-call cost it saves matters at small shapes,
#: and a cache of large (B, L) tables would hold memory for nothing
_CONSTANT_MAX_NUMEL = 1 << 16


def _constant(key: tuple, make) -> Tensor:
    """``make()``, cached under ``key`` (+ inference mode, whose tensors cannot be saved for
    a backward outside it) when it is small; built fresh while tracing, where the graph
    builds it. At most 64 entries of at most ``_CONSTANT_MAX_NUMEL`` elements."""
    if _compiling():
        return make()
    key = key + (torch.is_inference_mode_enabled(),)
    t = _CONSTANTS.get(key)
    if t is None:
        t = make()
        if t.numel() <= _CONSTANT_MAX_NUMEL:
            if len(_CONSTANTS) >= 64:
                _CONSTANTS.clear()
            _CONSTANTS[key] = t
    return t


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rotary angles, theta and positions are handled in: fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rotary_dim(rotary_dim, head_dim: int) -> int:
    if rotary_dim is None:
        rotary_dim = head_dim
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, numbers.Integral):
        raise TypeError(f"rotary_dim must be an int, got {type(rotary_dim).__name__}")
    rotary_dim = int(rotary_dim)
    if rotary_dim % 2 or rotary_dim <= 0 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in [2, head dim {head_dim}], "
                         f"got {rotary_dim}")
    return rotary_dim


def _theta(name: str, theta, batch: int, length: int, device, dtype) -> Optional[Tensor]:
    """float / 0-dim / (L,) / (B, L) -> (B, L) tensor in dtype; keeps the autograd graph."""
    if theta is None:
        return None
    if isinstance(theta, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool")
    big = torch.finfo(dtype).max
    if isinstance(theta, numbers.Real):
        if not math.isfinite(theta) or theta <= 1.0 or theta >= big:
            raise ValueError(f"{name} must be a finite float in (1, {big:.3g}) (the rotary "
                             f"runs in {dtype}), got {theta}")
        return _constant(("theta", float(theta), batch, length, device, dtype),
                         lambda: torch.full((batch, length), float(theta), device=device,
                                            dtype=dtype))
    _check_tensor(name, theta)
    if not theta.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {theta.dtype}")
    _check_device(name, theta, device)
    if theta.dim() > 2 or (theta.dim() >= 1 and theta.shape[-1] != length) or (
            theta.dim() == 2 and theta.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be a float or have shape ({batch}, {length}) or "
                         f"({length},), got {tuple(theta.shape)}")
    r = _value_range(theta)
    if r is not None:
        if not _finite(r):
            raise _not_finite(name)
        if r[0] <= 1.0:
            raise ValueError(f"{name} must be > 1 everywhere (min is {r[0]:g})")
        if theta.dtype != dtype and r[1] >= big:
            raise ValueError(f"{name} must be below {big:.3g} (the rotary runs in {dtype}), "
                             f"max is {r[1]:g}")
    if theta.dim() < 2:
        theta = theta.reshape(1, -1) if theta.dim() == 1 else theta.reshape(1, 1)
    return theta.to(dtype).expand(batch, length).contiguous()


#: the largest rotary position (in magnitude) the kernels take: float32 represents every
#: integer only up to 2**24, and positions past it would be rotated by rounded angles
MAX_POSITION = 2 ** 24


def _positions(name: str, pos, batch: int, length: int, device, dtype, offset: int = 0) -> Tensor:
    """None / int offset / (L,) / (B, L) -> float (B, L) positions."""
    if pos is None or (isinstance(pos, numbers.Integral) and not isinstance(pos, bool)):
        start = offset if pos is None else int(pos)
        if abs(start) + length - 1 > MAX_POSITION:
            raise ValueError(f"{name}: positions up to {abs(start) + length - 1:,} exceed "
                             f"{MAX_POSITION:,} (2**24: float32 holds every integer only up "
                             "to there)")
        return _constant(("positions", start, batch, length, device, dtype),
                         lambda: (torch.arange(length, device=device, dtype=dtype) + start
                                  ).expand(batch, length).contiguous())
    if not torch.is_tensor(pos):
        raise TypeError(f"{name} must be None, an int offset or an (L,) / (B, L) tensor, "
                        f"got {type(pos).__name__}")
    if pos.dtype == torch.bool or pos.is_complex():
        raise TypeError(f"{name} must be an int offset or an integer/float tensor, "
                        f"got {pos.dtype}")
    _check_device(name, pos, device)
    if pos.dim() not in (1, 2) or pos.shape[-1] != length or (
            pos.dim() == 2 and pos.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be an int offset or have shape ({batch}, {length}) "
                         f"or ({length},), got {tuple(pos.shape)}")
    r = _value_range(pos)
    if r is not None:
        if pos.is_floating_point() and not _finite(r):
            raise _not_finite(name)
        if max(-r[0], r[1]) > MAX_POSITION:
            raise ValueError(f"{name} must be within +-{MAX_POSITION:,} (2**24: float32 "
                             "holds every integer only up to there), got "
                             f"{max(-r[0], r[1]):g}")
    return pos.to(dtype).reshape(-1, length).expand(batch, length).contiguous()


def _radius(radius, rotary_dim: int, device, dtype) -> Optional[Tensor]:
    if radius is None:
        return None
    _check_tensor("radius", radius, 1)
    if not radius.is_floating_point():
        raise TypeError(f"radius must be a floating tensor, got {radius.dtype}")
    _check_device("radius", radius, device)
    if radius.shape[0] != rotary_dim // 2:
        raise ValueError(f"radius must have shape ({rotary_dim // 2},) = rotary_dim/2, "
                         f"got {tuple(radius.shape)}")
    r = _value_range(radius)
    if r is not None:
        if not _finite(r):
            raise _not_finite("radius")
        if r[0] <= 0:
            raise ValueError("radius must be > 0 everywhere")
    return radius.to(dtype).contiguous()


#: the smallest zero_scale every backend represents: float32's smallest normal number.
#: Below it s rounds to a subnormal or to 0 in float32, ln(s) to -inf, and a row whose keys
#: are all zero tokens would stop being an ordinary row (docs/design.md 3.3).
MIN_ZERO_SCALE = float(torch.finfo(torch.float32).tiny)


def _zero_scale_range_error(value: float) -> Optional[str]:
    if not 0.0 < value <= 1.0:
        return f"zero_scale must be in (0, 1], got {value}"
    if value < MIN_ZERO_SCALE:
        return (f"zero_scale {value:g} is below {MIN_ZERO_SCALE:.4g}, float32's smallest "
                "normal number: the kernels compute in float32, where it underflows")
    return None


def _zero_scale(zero_scale, device, dtype) -> Tensor:
    if isinstance(zero_scale, bool):
        raise TypeError("zero_scale must be a float or a 0-dim tensor, got bool")
    if isinstance(zero_scale, numbers.Real):
        err = _zero_scale_range_error(float(zero_scale))
        if err:
            raise ValueError(err)
        return _constant(("zero_scale", float(zero_scale), device, dtype),
                         lambda: torch.tensor(float(zero_scale), device=device, dtype=dtype))
    _check_tensor("zero_scale", zero_scale)
    if zero_scale.numel() != 1:
        raise ValueError(f"zero_scale must be a float or a 0-dim tensor, got shape "
                         f"{tuple(zero_scale.shape)}")
    if not zero_scale.is_floating_point():
        raise TypeError(f"zero_scale must be floating, got {zero_scale.dtype}")
    if _check_values(zero_scale):
        value = float(zero_scale.detach().reshape(()).item())
        err = _zero_scale_range_error(value)
        if err:
            raise ValueError(f"{err}; a learnable scale should be parameterised to stay "
                             "there (see ZeroSoftAttention)")
    return zero_scale.reshape(()).to(device=device, dtype=dtype)


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
        _check_float(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_device("k", k, q.device)
    _check_device("v", v, q.device)
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Lk, D), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, Hkv, Lk, D={D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")


def _normalise_attention(q, k, v, key_zero, zero_scale, zero_mode, causal, sm_scale,
                         seqlens_k, theta_q, theta_k, pos_q, pos_k, rotary_dim, interleaved,
                         radius) -> AttentionArgs:
    """Every argument checked (errors name it) and normalised to the record the backends
    take: tensors on q's device in the compute dtype, rotary_dim resolved, flags typed."""
    _check_qkv(q, k, v)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, _, Lq, D = q.shape
    if D == 0:
        raise ValueError(f"q, k and v must have a head dim >= 1, got shape {tuple(q.shape)}")
    Lk = k.shape[2]
    dev = q.device
    cdt = compute_dtype(q.dtype)
    if key_zero is not None:
        _check_tensor("key_zero", key_zero, 2)
        if key_zero.dtype != torch.bool:
            raise TypeError(f"key_zero must be a bool tensor (True = zero token), "
                            f"got {key_zero.dtype}")
        if tuple(key_zero.shape) != (B, Lk):
            raise ValueError(f"key_zero must have shape (B, Lk) = ({B}, {Lk}), "
                             f"got {tuple(key_zero.shape)}")
        _check_device("key_zero", key_zero, dev)
        key_zero = key_zero.contiguous()
    if zero_mode not in ZERO_MODES:
        raise ValueError(f"zero_mode must be one of {ZERO_MODES}, got {zero_mode!r}")
    zs = _zero_scale(zero_scale, dev, cdt)
    if sm_scale is None:
        sm_scale = D ** -0.5
    elif isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real) or not (
            math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive float, got {sm_scale!r}")
    if seqlens_k is not None:
        _check_tensor("seqlens_k", seqlens_k, 1)
        if seqlens_k.is_floating_point() or seqlens_k.dtype == torch.bool:
            raise TypeError(f"seqlens_k must be an integer tensor, got {seqlens_k.dtype}")
        if seqlens_k.shape[0] != B:
            raise ValueError(f"seqlens_k must have shape ({B},), got {tuple(seqlens_k.shape)}")
        _check_device("seqlens_k", seqlens_k, dev)
        r = _value_range(seqlens_k)
        if r is not None and (r[0] < 0 or r[1] > Lk):
            raise ValueError(f"seqlens_k values must be in [0, Lk={Lk}]")
        seqlens_k = seqlens_k.to(torch.int32).contiguous()
    rotary = theta_q is not None or theta_k is not None
    for side, pos, theta in (("q", pos_q, theta_q), ("k", pos_k, theta_k)):
        if pos is not None and theta is None:
            raise ValueError(f"pos_{side} was given but theta_{side} is None: positions only "
                             "mean something to a rotary")
    if rotary:
        R = _rotary_dim(rotary_dim, D)
    elif rotary_dim is not None:
        raise ValueError("rotary_dim was given but no theta_q/theta_k: there is no rotary")
    else:  # no rotary: any head dim (the kernels take the largest even part, unused)
        R = D - D % 2
    tq = _theta("theta_q", theta_q, B, Lq, dev, cdt)
    # self-attention passes one theta for both sides: normalised (and checked) once
    tk = tq if theta_k is theta_q and Lk == Lq else _theta("theta_k", theta_k, B, Lk, dev, cdt)
    pq = _positions("pos_q", pos_q, B, Lq, dev, cdt, offset=(Lk - Lq) if causal else 0) \
        if tq is not None else None
    pk = _positions("pos_k", pos_k, B, Lk, dev, cdt) if tk is not None else None
    rad = _radius(radius, R, dev, cdt) if rotary else None
    if radius is not None and not rotary:
        raise ValueError("radius was given but no theta_q/theta_k: there is no rotary to scale")
    return AttentionArgs(q, k, v, key_zero, zs, tq, tk, pq, pk, rad, seqlens_k, zero_mode,
                         bool(causal), float(sm_scale), R, bool(interleaved))


# --------------------------------------------------------------------------------------
# torch.library custom ops: the path of every kernel backend
# --------------------------------------------------------------------------------------
def _placeholder(t: Optional[Tensor], like: Tensor) -> Tensor:
    """custom ops cannot return None: an empty (0,) tensor stands for 'no gradient'."""
    return t if t is not None else like.new_empty((0,), dtype=torch.float32)


# The custom ops' schemas are flat (torch.library takes no records): an attention op's
# inputs are AttentionArgs' fields in order, then the backend's name; the bodies rebuild
# the record from them.

@torch.library.custom_op("zeromask::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_zero: Optional[Tensor],
                   zero_scale: Tensor, theta_q: Optional[Tensor], theta_k: Optional[Tensor],
                   pos_q: Optional[Tensor], pos_k: Optional[Tensor], radius: Optional[Tensor],
                   seqlens_k: Optional[Tensor], zero_mode: str, causal: bool, sm_scale: float,
                   rotary_dim: int, interleaved: bool, backend: str) -> Tuple[Tensor, Tensor]:
    a = AttentionArgs(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k, radius,
                      seqlens_k, zero_mode, causal, sm_scale, rotary_dim, interleaved)
    return dispatch.load(backend).attention_forward(a)


@_attention_fwd.register_fake
def _(q, *rest):
    B, H, L, D = q.shape
    return q.new_empty((B, H, L, D)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("zeromask::attention_bwd", mutates_args=())
def _attention_bwd(do: Tensor, out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                   key_zero: Optional[Tensor], zero_scale: Tensor, theta_q: Optional[Tensor],
                   theta_k: Optional[Tensor], pos_q: Optional[Tensor], pos_k: Optional[Tensor],
                   radius: Optional[Tensor], seqlens_k: Optional[Tensor], zero_mode: str,
                   causal: bool, sm_scale: float, rotary_dim: int, interleaved: bool,
                   backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a = AttentionArgs(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k, radius,
                      seqlens_k, zero_mode, causal, sm_scale, rotary_dim, interleaved)
    dq, dk, dv, dtq, dtk, drad, dzs = _attention_bwd_kernel(do, out, lse, a, backend)
    return (dq, dk, dv, _placeholder(dtq, q), _placeholder(dtk, q), _placeholder(drad, q),
            _placeholder(dzs, q))


@_attention_bwd.register_fake
def _(do, out, lse, *inputs):
    # the kernels return contiguous gradients whatever q/k/v's strides (new_output): a fake
    # with q's strides (empty_like of a transposed view) fails compiled backward passes
    a = AttentionArgs(*inputs[:-1])
    q = a.q

    def like(t):
        return q.new_empty((0,), dtype=torch.float32) if t is None else t.new_empty(
            t.shape, dtype=torch.float32)
    return (q.new_empty(q.shape), a.k.new_empty(a.k.shape), a.v.new_empty(a.v.shape),
            like(a.theta_q), like(a.theta_k), like(a.radius),
            like(a.zero_scale if a.key_zero is not None else None))


def _attention_fwd_kernel(*inputs):
    """The body of ``zeromask::attention_fwd`` on its inputs (the record's fields, then the
    backend's name), for the eager path."""
    return dispatch.load(inputs[-1]).attention_forward(AttentionArgs(*inputs[:-1]))


def _attention_bwd_kernel(do, out, lse, a: AttentionArgs, backend: str):
    """The body of ``zeromask::attention_bwd``: ``backend``'s backward kernel."""
    return dispatch.load(backend).attention_backward(do, out, lse, a)


def _attention_setup(ctx, inputs, output):
    a = AttentionArgs(*inputs[:-1])
    out, lse = output
    ctx.save_for_backward(out, lse, *a.tensors())
    ctx.flags = a.flags()
    ctx.backend = inputs[-1]


def _attention_grads(ctx, dout, eager: bool):
    """The attention's autograd formula: the gradients of every input of
    ``zeromask::attention_fwd`` from ``dout``, through the custom op ``_attention_bwd`` or,
    eagerly, its body ``_attention_bwd_kernel``."""
    out, lse, *tensors = ctx.saved_tensors
    a = AttentionArgs(*tensors, *ctx.flags)
    if eager:
        grads = _attention_bwd_kernel(dout.contiguous(), out, lse, a, ctx.backend)
    else:
        grads = _attention_bwd(dout.contiguous(), out, lse, *a, ctx.backend)
    dq, dk, dv, dtq, dtk, drad, dzs = grads
    dtq = dtq if a.theta_q is not None else None
    dtk = dtk if a.theta_k is not None else None
    drad = drad if a.radius is not None else None
    dzs = (dzs.reshape(()).to(a.zero_scale.dtype)
           if a.key_zero is not None and a.zero_mode != "hard" else None)
    grad = dict(q=dq, k=dk, v=dv, zero_scale=dzs, theta_q=dtq, theta_k=dtk, radius=drad)
    return tuple(grad.get(name) for name in AttentionArgs._fields) + (None,)


def _attention_backward(ctx, dout, dlse):
    return _attention_grads(ctx, dout, eager=False)


torch.library.register_autograd("zeromask::attention_fwd", _attention_backward,
                                setup_context=_attention_setup)


def _eager(t: Tensor) -> bool:
    """Whether a call on ``t`` runs eagerly on a plain tensor: not traced by torch.compile
    or export, not a fake/functional/functorch tensor, no dispatch mode active. Such a call
    skips the custom ops' Python dispatcher (about 100 us a call, most of the op's cost at
    the short sequences speech models run) and calls the same kernels directly."""
    return (not _compiling() and type(t) is Tensor and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _needs_grad(*tensors) -> bool:
    """Whether autograd would record a call on these inputs (grad mode on and one of them
    requires grad); when not, the eager path skips the autograd Function (about 50 us a
    call on the 2-core EPYC of the README's model results)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: dispatch.fast_path("cpu"), looked up at the first call (it loads the cpp backend)
_UNSET = object()
_fast_attention = _UNSET


class _EagerAttention(torch.autograd.Function):
    """``zeromask::attention_fwd`` with its registered autograd formula, minus the custom
    op's dispatcher: same kernels, same saved tensors, same gradients (:func:`_eager`)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _attention_fwd_kernel(*inputs)
        _attention_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        return _attention_grads(ctx, dout, eager=True)


@torch.library.custom_op("zeromask::rotary_fwd", mutates_args=())
def _rotary_fwd(x: Tensor, theta: Tensor, positions: Tensor, radius: Optional[Tensor],
                rotary_dim: int, interleaved: bool, backend: str) -> Tensor:
    return _rotary_fwd_kernel(x, theta, positions, radius, rotary_dim, interleaved, backend)


@_rotary_fwd.register_fake
def _(x, *rest):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("zeromask::rotary_bwd", mutates_args=())
def _rotary_bwd(dy: Tensor, x: Tensor, theta: Tensor, positions: Tensor,
                radius: Optional[Tensor], rotary_dim: int, interleaved: bool,
                backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    r = RotaryArgs(x, theta, positions, radius, rotary_dim, interleaved)
    dx, dtheta, drad = _rotary_bwd_kernel(dy, r, backend)
    return dx, dtheta, _placeholder(drad, x)


@_rotary_bwd.register_fake
def _(dy, x, theta, positions, radius, *flags):
    drad = x.new_empty((0,), dtype=torch.float32) if radius is None else radius.new_empty(
        radius.shape, dtype=torch.float32)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            theta.new_empty(theta.shape, dtype=torch.float32), drad)


def _rotary_fwd_kernel(*inputs):
    """The body of ``zeromask::rotary_fwd`` (inputs: RotaryArgs' fields, then the backend)."""
    return dispatch.load(inputs[-1]).rotary_forward(RotaryArgs(*inputs[:-1]))


def _rotary_bwd_kernel(dy, r: RotaryArgs, backend: str):
    """The body of ``zeromask::rotary_bwd``: ``backend``'s rotary backward kernel."""
    return dispatch.load(backend).rotary_backward(dy, r)


def _rotary_setup(ctx, inputs, output):
    r = RotaryArgs(*inputs[:-1])
    ctx.save_for_backward(r.x, r.theta, r.positions, r.radius)
    ctx.flags = (r.rotary_dim, r.interleaved)
    ctx.backend = inputs[-1]


def _rotary_grads(ctx, dy, eager: bool):
    """The rotary's autograd formula, through ``_rotary_bwd`` or (eagerly) its body."""
    r = RotaryArgs(*ctx.saved_tensors, *ctx.flags)
    if eager:
        dx, dtheta, drad = _rotary_bwd_kernel(dy.contiguous(), r, ctx.backend)
    else:
        dx, dtheta, drad = _rotary_bwd(dy.contiguous(), *r, ctx.backend)
    return dx, dtheta, None, (drad if r.radius is not None else None), None, None, None


def _rotary_backward(ctx, dy):
    return _rotary_grads(ctx, dy, eager=False)


torch.library.register_autograd("zeromask::rotary_fwd", _rotary_backward,
                                setup_context=_rotary_setup)


class _EagerRotary(torch.autograd.Function):
    """``zeromask::rotary_fwd`` with its autograd formula, minus the custom op's
    dispatcher (:func:`_eager`)."""

    @staticmethod
    def forward(ctx, *inputs):
        y = _rotary_fwd_kernel(*inputs)
        _rotary_setup(ctx, inputs, y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        return _rotary_grads(ctx, dy, eager=True)


# --------------------------------------------------------------------------------------
# public functionals
# --------------------------------------------------------------------------------------
def zero_soft_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_zero: Optional[Tensor] = None,
    zero_scale: Union[float, Tensor] = 1e-6,
    zero_mode: str = "prob",
    causal: bool = False,
    sm_scale: Optional[float] = None,
    seqlens_k: Optional[Tensor] = None,
    theta_q: Union[Tensor, float, None] = None,
    theta_k: Union[Tensor, float, None] = None,
    pos_q: Union[Tensor, int, None] = None,
    pos_k: Union[Tensor, int, None] = None,
    rotary_dim: Optional[int] = None,
    interleaved: bool = False,
    radius: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention in which zero-token keys are scaled by ``zero_scale`` instead of masked,
    with the f0 rotary applied to q and k tiles as they load (docs/design.md 3.1, 3.3).

    ``S = sm_scale * rot(q) rot(k)^T``; a zero-token key gets ``S + ln(s)`` in ``"prob"``
    mode (its softmax weight times ``s``), ``S * s`` in ``"score"`` mode (the original
    Echo code: it pulls the logit toward 0, so a "zero" key can take a large share) or
    ``-inf`` in ``"hard"`` mode;
    ``O = softmax(S') V``, computed flash-style (online softmax, O(L) memory).

    Args:
        q: ``(B, Hq, Lq, D)``, float16 / bfloat16 / float32 (float64 runs on the reference);
            any strides with a contiguous last dim.
        k, v: ``(B, Hkv, Lk, D)``, q's dtype and device; ``Hq % Hkv == 0`` (GQA / MQA).
        key_zero: bool ``(B, Lk)``, True where the key is a zero token (silence, padding,
            the start token); None: no zero tokens.
        zero_scale: ``s`` in ``[1.18e-38, 1]``, a float or a 0-dim tensor (may require grad:
            learnable).
        zero_mode: ``"prob"`` (default), ``"score"``, or ``"hard"`` (zero-token keys get
            -inf like any hard-masked key; ``zero_scale`` is then unused).
        causal: query ``i`` sees keys ``j <= i + (Lk - Lq)`` (bottom-right aligned, as for
            decoding against a KV cache). Lq = 3 queries, Lk = 5 keys::

                keys      0 1 2 3 4
                query 0   x x x . .
                query 1   x x x x .
                query 2   x x x x x

        sm_scale: logit scale, default ``D ** -0.5``.
        seqlens_k: int ``(B,)`` in ``[0, Lk]``: keys at or past ``seqlens_k[b]`` are
            hard-masked; they are never read (garbage is allowed there) and get exactly 0
            gradient.
        theta_q, theta_k: rotary theta per position, a float > 1 or ``(B, Lq)`` / ``(B, Lk)``
            (``(L,)`` broadcasts); None: no rotary on that side.
        pos_q, pos_k: positions, an int offset or ``(B, L)`` / ``(L,)`` floats; default
            ``arange(L)``, queries offset by ``Lk - Lq`` when ``causal``.
        rotary_dim: even ``R <= D`` (default D); dims ``>= R`` are not rotated.
        interleaved: pairs ``(2i, 2i+1)`` (GPT-J / Echo) instead of ``(i, i + R/2)``
            (GPT-NeoX / LLaMA).
        radius: ``(R/2,)`` positive per-pair scale of the rotation, or None.
        backend: ``"auto"`` (default, or the ``ZEROMASK_BACKEND`` environment variable),
            ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"reference"``.

    Returns:
        ``(B, Hq, Lq, D)`` in q's dtype. A row whose keys are all hard-masked (``causal``,
        ``seqlens_k``, hard mode's zero tokens) is 0, never NaN; in prob and score mode a row
        whose keys are all zero tokens is an ordinary row. A NaN or inf in a visible q/k/v
        propagates to the rows it touches. Differentiable in q, k, v, theta_q, theta_k,
        radius and (except in hard mode) zero_scale.

    Raises:
        TypeError / ValueError naming the argument: wrong types, shapes, dtypes or devices,
            ``Hq % Hkv != 0``, theta <= 1, zero_scale outside its range, an unknown
            ``zero_mode``, ``seqlens_k`` outside ``[0, Lk]``.
        zeromask.dispatch.BackendError (a RuntimeError): an explicitly requested backend
            that cannot serve the call, with the reason.
    """
    global _fast_attention
    if not _compiling():
        # eager CPU calls, with or without gradients, in one C++ call (per-call cost at
        # the speech model's short shapes); it declines anything else, which runs below
        if _fast_attention is _UNSET:
            _fast_attention = dispatch.fast_path("cpu")
        if _fast_attention is not None:
            out = _fast_attention(q, k, v, key_zero, zero_scale, zero_mode, causal,
                                  sm_scale, seqlens_k, theta_q, theta_k, pos_q, pos_k,
                                  rotary_dim, interleaved, radius, backend)
            if out is not None:
                return out
    a = _normalise_attention(q, k, v, key_zero, zero_scale, zero_mode, causal, sm_scale,
                             seqlens_k, theta_q, theta_k, pos_q, pos_k, rotary_dim, interleaved,
                             radius)
    chosen = dispatch.select("attention", a.q.device.type, backend, a)
    if chosen.name == "reference":
        return reference.zero_soft_attention(a.q, a.k, a.v, **a.keywords())
    # (compiled backends take fp16/bf16/fp32 inputs, whose compute dtype is float32: the
    # record's float tensors are already what the kernels read)
    if not _eager(a.q):
        run = _attention_fwd
    elif _needs_grad(a.q, a.k, a.v, a.zero_scale, a.theta_q, a.theta_k, a.radius):
        run = _EagerAttention.apply
    else:  # nothing to differentiate (inference, decoding steps): the kernel alone
        run = _attention_fwd_kernel
    out, _ = run(*a, chosen.name)
    return out


def zero_soft_attention_weights(q: Tensor, k: Tensor, **kwargs) -> Tensor:
    """The attention probabilities ``(B, Hq, Lq, Lk)`` of :func:`zero_soft_attention`.

    Same keyword arguments (``backend`` is ignored): this materialises the L x L matrix
    through the reference, for inspection and plots, not for speed.
    """
    try:
        a = _normalise_call(q, k, k, **kwargs)
    except TypeError as exc:
        raise TypeError(f"zero_soft_attention_weights: {exc}") from None
    return reference.zero_soft_attention_weights(a.q, a.k, **a.keywords())


def _normalise_call(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> AttentionArgs:
    """:func:`zero_soft_attention`'s keyword arguments (its defaults for those not given;
    ``backend`` ignored) checked and normalised into the backends' record. Raises
    TypeError for an unknown keyword, as the call itself would."""
    bound = inspect.signature(zero_soft_attention).bind(q, k, v, **kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("backend")
    return _normalise_attention(**args)


def f0_rotary(
    x: Tensor,
    theta: Union[Tensor, float],
    *,
    positions: Union[Tensor, int, None] = None,
    rotary_dim: Optional[int] = None,
    interleaved: bool = False,
    radius: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Rotary embedding of x with a theta per position (docs/design.md 3.1):
    ``w_i = theta ** (-2i / R)``, ``phi_i = pos * w_i``, each pair ``(a, b)`` rotated by
    ``phi_i`` and scaled by ``radius_i``. With a constant theta this is standard RoPE.

    Args:
        x: ``(B, H, L, D)``, float16 / bfloat16 / float32 / float64, any strides.
        theta: a float > 1, ``(L,)`` or ``(B, L)``, every value > 1 (the F0-driven theta of
            :class:`zeromask.F0Rotary`, or a learnable base).
        positions: None (``arange(L)``), an int offset, ``(L,)`` or ``(B, L)``.
        rotary_dim: even ``R <= D`` (default D); dims ``>= R`` pass through unchanged.
        interleaved: pairs ``(2i, 2i+1)`` (GPT-J / Echo) instead of ``(i, i + R/2)``
            (GPT-NeoX / LLaMA, the default).
        radius: ``(R/2,)`` positive per-pair scale, or None.
        backend: as in :func:`zero_soft_attention`.

    Returns:
        x's shape and dtype. Differentiable in x, theta and radius.

    Raises:
        TypeError / ValueError naming the argument: wrong types, shapes or dtypes, theta
            missing or <= 1, an odd or too large ``rotary_dim``, a non-positive radius.
    """
    _check_tensor("x", x, 4)
    _check_float("x", x)
    if theta is None:
        raise ValueError("theta is required (a float > 1 or a (B, L) tensor)")
    x = _last_dim_contiguous(x)
    B, _, L, D = x.shape
    cdt = compute_dtype(x.dtype)
    R = _rotary_dim(rotary_dim, D)
    th = _theta("theta", theta, B, L, x.device, cdt)
    pos = _positions("positions", positions, B, L, x.device, cdt)
    rad = _radius(radius, R, x.device, cdt)
    r = RotaryArgs(x, th, pos, rad, R, bool(interleaved))
    chosen = dispatch.select("rotary", x.device.type, backend, r)
    if chosen.name == "reference":
        return reference.f0_rotary(x, th, pos, rotary_dim=R, interleaved=r.interleaved,
                                   radius=rad)
    if not _eager(x):
        run = _rotary_fwd
    elif _needs_grad(r.x, r.theta, r.radius):
        run = _EagerRotary.apply
    else:
        run = _rotary_fwd_kernel
    return run(*r, chosen.name)


__all__ = ["zero_soft_attention", "zero_soft_attention_weights", "f0_rotary", "ZERO_MODES", "compute_dtype"]
