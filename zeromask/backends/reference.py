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


def attention_backward(do, q, k, v, out, lse, key_zero, zero_scale, theta_q, theta_k, pos_q,
                       pos_k, radius, seqlens_k, *, zero_mode, causal, sm_scale, rotary_dim,
                       interleaved):
    def leaf(t):
        return None if t is None else t.detach().requires_grad_(True)

    q_, k_, v_ = leaf(q), leaf(k), leaf(v)
    tq, tk, rad = leaf(theta_q), leaf(theta_k), leaf(radius)
    zs = leaf(zero_scale) if key_zero is not None else zero_scale
    with torch.enable_grad():
        kw = _attention_kwargs(key_zero, zs, tq, tk, pos_q, pos_k, rad, seqlens_k, zero_mode,
                               causal, sm_scale, rotary_dim, interleaved)
        o = reference.zero_soft_attention(q_, k_, v_, **kw)
        inputs = [t for t in (q_, k_, v_, tq, tk, rad, zs if key_zero is not None else None)]
        present = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(o, present, do, allow_unused=True))
    result = []
    for t in inputs:
        g = next(grads) if t is not None else None
        if t is not None and g is None:
            g = torch.zeros_like(t)
        result.append(g)
    return tuple(result)


def rotary_forward(x, theta, positions, radius, *, rotary_dim, interleaved):
    return reference.f0_rotary(x, theta, positions, rotary_dim, interleaved, radius).contiguous()


def rotary_backward(dy, x, theta, positions, radius, *, rotary_dim, interleaved):
    x_ = x.detach().requires_grad_(True)
    t_ = theta.detach().requires_grad_(True)
    r_ = None if radius is None else radius.detach().requires_grad_(True)
    with torch.enable_grad():
        y = reference.f0_rotary(x_, t_, positions, rotary_dim, interleaved, r_)
        present = [x_, t_] + ([r_] if r_ is not None else [])
        grads = torch.autograd.grad(y, present, dy)
    return grads[0], grads[1], (grads[2] if r_ is not None else None)


BACKEND = Backend(
    name="reference",
    available=lambda: None,
    supports=lambda op, **call: None,
    attention_forward=attention_forward,
    attention_backward=attention_backward,
    rotary_forward=rotary_forward,
    rotary_backward=rotary_backward,
)
