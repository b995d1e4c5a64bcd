"""The attention providers: every way of computing zero-soft attention + f0 rotary (or the
nearest thing) the benchmarks time side by side (docs/design.md section 6, issue 15).

* ``zeromask[<backend>]`` for every backend :func:`zeromask.available_backends` lists
  (a backend that cannot run here is a row marked unavailable, with the reason);
* ``sdpa``: plain ``F.scaled_dot_product_attention`` (no rotary, no zero scaling: the speed
  of light for the shape; forced to the flash backend on CUDA in fp16/bf16);
* ``sdpa+bias+rope``: a separate PyTorch rotary, then SDPA with the additive mask ln(s) on
  zero keys (== ``zero_mode="prob"``);
* ``flex+rope``: a separate PyTorch rotary, then ``torch.compile(flex_attention)`` with a
  score_mod multiplying zero keys' logits by s (== ``zero_mode="score"``, the Echo code);
* ``naive``: :mod:`zeromask.reference` (materialises Lq x Lk; skipped by a memory estimate
  where it does not fit).

Causal is bottom-right aligned everywhere (query i sees keys ``j <= i + Lk - Lq``, as
zeromask computes it and as decoding needs it), and the queries' rotary positions start at
``Lk - Lq`` when causal; a shape without rotary (cross-attention) has none in any provider.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch
import torch.nn.functional as F

import zeromask
from runner import (Inputs, Provider, Unavailable, Workload, attention_reference_kwargs,
                    causal_keep, query_offset, require_backend, thetas)
from zeromask import reference


def _zeromask_attention(backend: str) -> Provider:
    def build(w: Workload, x: Inputs):
        require_backend(backend, w)
        theta_q, theta_k = thetas(w, x)

        def fn():
            return zeromask.zero_soft_attention(
                x.q, x.k, x.v, key_zero=x.key_zero, zero_scale=w.zero_scale,
                zero_mode=w.zero_mode, causal=w.causal, theta_q=theta_q, theta_k=theta_k,
                backend=backend)
        return fn

    materialises = (4.0, 6.0) if backend == "reference" else None
    how = ("dispatched to zeromask.reference, which materialises L x L" if backend == "reference"
           else "fused kernel: rotary applied inside the attention kernel, no L x L buffer")
    return Provider(f"zeromask[{backend}]", "attention",
                    f"zeromask.zero_soft_attention(backend={backend!r}): zero-soft attention "
                    f"(--zero-mode, default prob) + f0 rotary on q and k in one call; {how}",
                    build,
                    lambda w, x: attention_reference_kwargs(w.zero_mode, True)(w, x),
                    materialises)


def _sdpa_context(w: Workload):
    if w.device == "cuda" and w.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def _sdpa_plain(w: Workload, x: Inputs):
    # SDPA's is_causal is top-left aligned: it is the causal mask only where Lq = Lk; a
    # single last-position query (a decode step) sees every key; otherwise a bool mask
    is_causal = w.causal and w.lq == w.lk
    mask = causal_keep(w) if (w.causal and w.lq != w.lk and w.lq > 1) else None

    def fn():
        with _sdpa_context(w):
            return F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=mask,
                                                  is_causal=is_causal)
    return fn


def _rope(w: Workload, x: Inputs):
    """The separate PyTorch f0 rotary of the +rope providers: (q, k) -> rotated (q, k)."""
    theta_q, theta_k = thetas(w, x)
    if theta_q is None:
        return lambda q, k: (q, k)
    offset = query_offset(w)
    if theta_k is None:  # a cache of rotated keys: the query alone
        return lambda q, k: (reference.f0_rotary(q, theta_q, offset), k)
    return lambda q, k: (reference.f0_rotary(q, theta_q, offset),
                         reference.f0_rotary(k, theta_k))


def _sdpa_bias_rope(w: Workload, x: Inputs):
    if w.zero_mode != "prob":
        raise Unavailable("an additive SDPA mask can only express zero_mode='prob' "
                          "(logit + ln s), not 'score'")
    bias = reference.sdpa_equivalent_mask(x.key_zero, w.zero_scale, w.dtype)  # (B,1,1,Lk)
    if w.causal and w.lq > 1:  # SDPA takes attn_mask or is_causal, not both: fold it in
        causal = torch.zeros(w.lq, w.lk, dtype=w.dtype, device=w.device)
        bias = bias + causal.masked_fill(~causal_keep(w), float("-inf"))
    rope = _rope(w, x)

    def fn():
        q, k = rope(x.q, x.k)
        return F.scaled_dot_product_attention(q, k, x.v, attn_mask=bias)
    return fn


_FLEX_COMPILED = None


def _flex_compiled():
    """One ``torch.compile(flex_attention)``; recompiles per shape (excluded from timing)."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def _flex_rope(w: Workload, x: Inputs):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention: {exc}")
    flex = _flex_compiled()
    kz, s = x.key_zero, w.zero_scale

    def score_mod(score, b, h, q_idx, kv_idx):  # Echo's "score" zero mode
        return torch.where(kz[b, kv_idx], score * s, score)

    block_mask = None
    if w.causal:
        shift = w.lk - w.lq

        def causal(b, h, q_idx, kv_idx):
            return q_idx + shift >= kv_idx
        block_mask = create_block_mask(causal, None, None, w.lq, w.lk, device=w.device)
    rope = _rope(w, x)

    def fn():
        q, k = rope(x.q, x.k)
        return flex(q, k, x.v, score_mod=score_mod, block_mask=block_mask)
    return fn


def _naive_attention(w: Workload, x: Inputs):
    kw = attention_reference_kwargs(w.zero_mode, True)(w, x)

    def fn():
        return reference.zero_soft_attention(x.q, x.k, x.v, **kw)
    return fn


def providers(zero_mode: str = "prob") -> List[Provider]:
    """Every attention provider; ``zeromask[<b>]`` for every backend dispatch knows."""
    mode_name = f"zero_mode={zero_mode!r}"
    return [_zeromask_attention(b) for b in zeromask.available_backends()] + [
        Provider("sdpa", "attention", "plain F.scaled_dot_product_attention: no rotary, no "
                 "zero keys (speed of light; flash backend forced on CUDA fp16/bf16)",
                 _sdpa_plain, attention_reference_kwargs(None, False)),
        Provider("sdpa+bias+rope", "attention", "PyTorch f0 rotary on q and k, then SDPA with "
                 "additive mask ln(s) on zero keys (== zero_mode='prob'); no rotary where the "
                 "shape has none (cross-attention)",
                 _sdpa_bias_rope, attention_reference_kwargs("prob", True)),
        Provider("flex+rope", "attention", "PyTorch f0 rotary on q and k, then "
                 "torch.compile(flex_attention) with score_mod s*score on zero keys "
                 "(== zero_mode='score', the Echo code); compile time excluded",
                 _flex_rope, attention_reference_kwargs("score", True)),
        Provider("naive", "attention", f"zeromask.reference ({mode_name} + f0 rotary, "
                 "materialises the L x L matrices)", _naive_attention,
                 lambda w, x: attention_reference_kwargs(w.zero_mode, True)(w, x), (4.0, 6.0)),
    ]
