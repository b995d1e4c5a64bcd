"""The reference backend: :mod:`zeromask.reference` behind the kernel contract.

:mod:`zeromask.ops` runs the reference with PyTorch's own autograd (so float64 and double
backward work); the contract functions below exist so the custom-op glue can be tested
against the spec with no compiled kernel present.
"""
from __future__ import annotations

import torch

from .. import reference
from . import AttentionArgs, Backend, RotaryArgs


def attention_forward(a: AttentionArgs):
    kw = a.keywords()
    out = reference.zero_soft_attention(a.q, a.k, a.v, **kw).contiguous()
    lse = reference.zero_soft_attention_lse(a.q, a.k, **kw).float()
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


def attention_backward(do, out, lse, a: AttentionArgs):
    def fn(q, k, v, theta_q, theta_k, radius, zero_scale):
        zs = zero_scale if zero_scale is not None else 1.0
        b = a._replace(q=q, k=k, v=v, theta_q=theta_q, theta_k=theta_k, radius=radius,
                       zero_scale=zs)
        return reference.zero_soft_attention(q, k, v, **b.keywords())

    zs = a.zero_scale if a.key_zero is not None else None
    return _vjp(fn, (a.q, a.k, a.v, a.theta_q, a.theta_k, a.radius, zs), do)


def _rotary(r: RotaryArgs, x, theta, radius):
    return reference.f0_rotary(x, theta, r.positions, rotary_dim=r.rotary_dim,
                               interleaved=r.interleaved, radius=radius)


def rotary_forward(r: RotaryArgs):
    return _rotary(r, r.x, r.theta, r.radius).contiguous()


def rotary_backward(dy, r: RotaryArgs):
    return _vjp(lambda x, theta, radius: _rotary(r, x, theta, radius), (r.x, r.theta, r.radius),
                dy)


BACKEND = Backend(
    name="reference",
    available=lambda: None,
    supports=lambda op, args: None,
    attention_forward=attention_forward,
    attention_backward=attention_backward,
    rotary_forward=rotary_forward,
    rotary_backward=rotary_backward,
)
