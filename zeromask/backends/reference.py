"""The reference backend: :mod:`zeromask.reference` behind the kernel contract.

:mod:`zeromask.ops` runs the reference with PyTorch's own autograd (so float64 and double
backward work); the contract functions below exist so the custom-op glue can be tested
against the spec with no compiled kernel present.
"""
from __future__ import annotations

import torch

from .. import reference
from . import Backend


def _attention_kwargs(key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k, radius,
                      seqlens_k, zero_mode, causal, sm_scale, rotary_dim, interleaved):
    return dict(key_zero=key_zero, zero_scale=zero_scale, zero_mode=zero_mode, causal=causal,
                sm_scale=sm_scale, seqlens_k=seqlens_k, theta_q=theta_q, theta_k=theta_k,
                pos_q=pos_q, pos_k=pos_k, rotary_dim=rotary_dim, interleaved=interleaved,
                radius=radius)


def attention_forward(q, k, v, key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k, radius,
                      seqlens_k, *, zero_mode, causal, sm_scale, rotary_dim, interleaved):
    kw = _attention_kwargs(key_zero, zero_scale, theta_q, theta_k, pos_q, pos_k, radius,
                           seqlens_k, zero_mode, causal, sm_scale, rotary_dim, interleaved)
    out = reference.zero_soft_attention(q, k, v, **kw).contiguous()
    lse = reference.zero_soft_attention_lse(q, k, **kw).float()
    return out, lse


def _vjp(fn, primals, cotangent):
    """Gradients of fn at primals (None entries skipped), by torch.func.vjp.

    torch.func works inside a torch.library custom op, where the dispatcher has switched
    ordinary autograd recording off.
    """
    present = [i for i, t in enumerate(primals) if t is not None]

    def f(*xs):
        full = list(primals)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    _, pullback = torch.func.vjp(f, *[primals[i] for i in present])
    grads = iter(pullback(cotangent))
    return tuple(next(grads) if t is not None else None for t in primals)


def attention_backward(do, q, k, v, out, lse, key_zero, zero_scale, theta_q, theta_k, pos_q,
                       pos_k, radius, seqlens_k, *, zero_mode, causal, sm_scale, rotary_dim,
                       interleaved):
    def fn(q, k, v, theta_q, theta_k, radius, zero_scale):
        zs = zero_scale if zero_scale is not None else 1.0
        kw = _attention_kwargs(key_zero, zs, theta_q, theta_k, pos_q, pos_k, radius,
                               seqlens_k, zero_mode, causal, sm_scale, rotary_dim, interleaved)
        return reference.zero_soft_attention(q, k, v, **kw)

    zs = zero_scale if key_zero is not None else None
    return _vjp(fn, (q, k, v, theta_q, theta_k, radius, zs), do)


def rotary_forward(x, theta, positions, radius, *, rotary_dim, interleaved):
    return reference.f0_rotary(x, theta, positions, rotary_dim, interleaved, radius).contiguous()


def rotary_backward(dy, x, theta, positions, radius, *, rotary_dim, interleaved):
    def fn(x, theta, radius):
        return reference.f0_rotary(x, theta, positions, rotary_dim, interleaved, radius)

    return _vjp(fn, (x, theta, radius), dy)


BACKEND = Backend(
    name="reference",
    available=lambda: None,
    supports=lambda op, **call: None,
    attention_forward=attention_forward,
    attention_backward=attention_backward,
    rotary_forward=rotary_forward,
    rotary_backward=rotary_backward,
)
