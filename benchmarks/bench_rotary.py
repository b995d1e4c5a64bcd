"""The rotary providers: the f0 rotary op alone.

* ``zeromask[<backend>]``: ``zeromask.f0_rotary(backend=...)`` for every backend;
* ``rope-table``: standard (GPT-NeoX/LLaMA) RoPE applied from a cos/sin table built
  outside the timed region, with the same angles: the speed of light;
* ``naive``: ``zeromask.reference.f0_rotary`` (angles and cos/sin each call, in PyTorch).
"""
from __future__ import annotations

from typing import List

import torch

import zeromask
from runner import Inputs, Provider, Workload, require_backend
from zeromask import reference


def _zeromask_rotary(backend: str) -> Provider:
    def build(w: Workload, x: Inputs):
        require_backend(backend, w)
        return lambda: zeromask.f0_rotary(x.q, x.theta, backend=backend)
    how = ("dispatched to zeromask.reference (PyTorch)" if backend == "reference"
           else "the backend's rotary kernel")
    return Provider(f"zeromask[{backend}]", "rotary",
                    f"zeromask.f0_rotary(backend={backend!r}); {how}", build, lambda w, x: {})


def _rope_table(w: Workload, x: Inputs):
    """Standard (GPT-NeoX/LLaMA) RoPE from a precomputed per-position cos/sin table."""
    with torch.no_grad():
        phi = reference.rotary_angles(x.theta, torch.arange(w.length, device=w.device,
                                      dtype=torch.float32).expand_as(x.theta), w.head_dim)
        phi = torch.cat((phi, phi), dim=-1).unsqueeze(1)  # (B, 1, L, D)
        cos, sin = phi.cos().to(w.dtype), phi.sin().to(w.dtype)
    half = w.head_dim // 2

    def fn():
        xx = x.q
        rot = torch.cat((-xx[..., half:], xx[..., :half]), dim=-1)
        return xx * cos + rot * sin
    return fn


def _naive_rotary(w: Workload, x: Inputs):
    return lambda: reference.f0_rotary(x.q, x.theta)


def providers(zero_mode: str = "prob") -> List[Provider]:
    """Every rotary provider (``zero_mode`` does not apply to the rotary op)."""
    return [_zeromask_rotary(b) for b in zeromask.available_backends()] + [
        Provider("rope-table", "rotary", "standard RoPE from a cos/sin table built outside "
                 "the timed region (speed of light; same angles)", _rope_table,
                 lambda w, x: {}),
        Provider("naive", "rotary", "zeromask.reference.f0_rotary (angles and cos/sin each "
                 "call, in PyTorch)", _naive_rotary, lambda w, x: {}),
    ]
