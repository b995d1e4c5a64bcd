"""Random inputs and the backend-vs-reference check shared by every kernel test.

``attention_case`` builds fresh random q/k/v (never zeros), zero tokens, an f0-derived
theta with voiced and unvoiced stretches, positions and radius; ``check_attention`` runs a
backend's forward and every gradient and compares them with :mod:`tests.tolerance` against
the float64 reference, with the same-dtype reference as the yardstick.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

import zeromask
from zeromask import reference
from zeromask.modules import F0Rotary

from tolerance import assert_grad_close, assert_output_close


def kernel_backends():
    """``(name, device)`` of every kernel backend this machine runs: ``cpp`` (CPU) where
    built, ``triton`` (compiled on a GPU, else its CPU interpreter under
    ``TRITON_INTERPRET=1``), ``cuda`` on a GPU."""
    gpu = torch.cuda.is_available()
    out = []
    for name in ("cpp", "triton", "cuda"):
        if zeromask.available_backends().get(name) is not None:
            continue
        if name == "triton" and not gpu and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        if name == "cuda" and not gpu:
            continue
        out.append((name, "cpu" if name == "cpp" else "cuda" if gpu else "cpu"))
    return out


def f0_contour(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A speech-like F0 contour (Hz): voiced glides between 90 and 280 Hz, unvoiced gaps (0)."""
    t = torch.linspace(0, 1, length, dtype=torch.float64)
    rows = []
    for _ in range(batch):
        base = 90 + 150 * torch.rand((), generator=generator, dtype=torch.float64)
        glide = 40 * torch.sin(2 * math.pi * (t * (1 + 2 * torch.rand((), generator=generator,
                                                                    dtype=torch.float64))))
        f0 = base + glide
        voiced = torch.ones(length, dtype=torch.bool)
        for _ in range(max(1, length // 12)):  # a few unvoiced gaps
            start = int(torch.randint(0, length, (1,), generator=generator))
            voiced[start:start + int(torch.randint(1, 4, (1,), generator=generator))] = False
        rows.append(torch.where(voiced, f0, torch.zeros_like(f0)))
    return torch.stack(rows)


def f0_theta(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """theta (B, L) float64 from a speech-like contour through the default F0Rotary."""
    with torch.no_grad():
        return F0Rotary()(f0_contour(batch, length, generator)).double()


def attention_case(B=2, Hq=4, Hkv=2, Lq=17, Lk=17, D=32, *, rotary=True, zero_frac=0.25,
                   causal=False, zero_mode="prob", zero_scale=0.05, seqlens=False,
                   rotary_dim=None, interleaved=False, radius=False, seed=0) -> dict:
    """Everything for one zero_soft_attention call, in float64 (the oracle's dtype).

    The zero scale defaults to 0.05 rather than 1e-6 so that the zero keys' share, and
    so the test's sensitivity to it, is not rounded away.
    """
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    case = dict(
        q=torch.randn(B, Hq, Lq, D, generator=g, dtype=dt),
        k=torch.randn(B, Hkv, Lk, D, generator=g, dtype=dt),
        v=torch.randn(B, Hkv, Lk, D, generator=g, dtype=dt),
        key_zero=torch.rand(B, Lk, generator=g) < zero_frac,
        zero_scale=torch.tensor(zero_scale, dtype=dt),
        zero_mode=zero_mode,
        causal=causal,
    )
    if seqlens:
        case["seqlens_k"] = torch.randint(max(1, Lk // 2), Lk + 1, (B,), generator=g)
    if rotary:
        case["theta_q"] = f0_theta(B, Lq, g)
        case["theta_k"] = f0_theta(B, Lk, g)
        case["rotary_dim"] = rotary_dim
        case["interleaved"] = interleaved
        if radius:
            R = D if rotary_dim is None else rotary_dim
            case["radius"] = 0.5 + torch.rand(R // 2, generator=g, dtype=dt)
    return case


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

#: name -> (attention_case kwargs, dtype). Shapes are small: the Triton interpreter runs them
CASES = {
    "prob": (dict(), F32),
    "prob-fp16": (dict(), F16),
    "prob-bf16": (dict(), BF16),
    "score": (dict(zero_mode="score"), F32),
    "score-causal-fp16": (dict(zero_mode="score", causal=True), F16),
    "causal": (dict(causal=True), F32),
    "causal-radius-fp16": (dict(causal=True, radius=True), F16),
    "causal-gqa4-bf16": (dict(causal=True, Hq=4, Hkv=1), BF16),
    "mha": (dict(Hq=3, Hkv=3), F32),
    "mqa": (dict(Hq=4, Hkv=1), F32),
    "seqlens": (dict(seqlens=True), F32),
    "seqlens-causal": (dict(seqlens=True, causal=True), F32),
    "seqlens-causal-score-fp16": (dict(seqlens=True, causal=True, zero_mode="score"), F16),
    "cross-lq5-lk131": (dict(Lq=5, Lk=131), F32),
    "cross-lq5-lk131-bf16": (dict(Lq=5, Lk=131), BF16),
    "cross-lq131-lk17": (dict(Lq=131, Lk=17), F32),
    "cross-lq17-lk5-score": (dict(Lq=17, Lk=5, zero_mode="score"), F32),
    "cross-causal-lq40-lk17": (dict(Lq=40, Lk=17, causal=True), F32),  # 23 empty rows
    "cross-causal-lq17-lk131": (dict(Lq=17, Lk=131, causal=True), F32),
    "lq1": (dict(Lq=1, Lk=17), F32),
    # the CPU kernel's small-query path (<= 4 query rows per kv head: decoding steps)
    "decode-lq2-gqa2-causal": (dict(Lq=2, Lk=19, causal=True), F32),
    "decode-lq1-score-seqlens": (dict(Lq=1, Lk=40, Hq=2, Hkv=2, zero_mode="score",
                                      seqlens=True), F32),
    "decode-lq1-hard-causal": (dict(Lq=1, Lk=9, zero_mode="hard", causal=True,
                                    zero_frac=0.5), F32),
    "decode-lq4-causal-bf16": (dict(Lq=4, Lk=33, Hq=2, Hkv=2, causal=True), BF16),
    # (keys rotated VL at a time in a transposed block: the model's D = 24, several blocks
    # and a partial one; interleaved pairs with radius on part of an odd head dim)
    "decode-lq1-d24-lk70-radius": (dict(Lq=1, Lk=70, D=24, radius=True), F32),
    "decode-lq1-d17-rot12-interleaved-radius-fp16": (dict(Lq=1, Lk=21, D=17, rotary_dim=12,
                                                          interleaved=True, radius=True), F16),
    "decode-lq2-mqa-score-causal": (dict(Lq=2, Lk=23, Hq=2, Hkv=1, zero_mode="score",
                                         causal=True), F32),
    "lq1-causal-fp16": (dict(Lq=1, Lk=17, causal=True), F16),
    # a single key: softmax is exactly 1 and the exact dS is 0 (fp16: fp32's rounding of
    # dP - delta there is beyond a floor built for nonzero gradients)
    "lk1-fp16": (dict(Lq=17, Lk=1), F16),
    "l1-fp16": (dict(Lq=1, Lk=1, B=1, Hq=2, Hkv=1), F16),
    "l131": (dict(Lq=131, Lk=131, B=1, Hq=2, Hkv=1, D=16, seed=131), F32),
    "l131-causal": (dict(Lq=131, Lk=131, B=1, Hq=1, Hkv=1, D=16, causal=True, seed=131), F32),
    "l131-seqlens-k": (dict(Lq=17, Lk=131, Hq=2, Hkv=1, D=16, seqlens=True), F32),
    # the CPU forward's transposed path (not causal, D padded by >= 1/4 of its vectors: D =
    # 24 with AVX-512, D = 12 and 17 with AVX2 too): two query blocks, two key tiles, GQA,
    # seqlens, score and hard modes, odd D, partial rotary, empty rows
    "d24-lq70-lk150": (dict(D=24, Lq=70, Lk=150, seed=24), F32),
    "d24-seqlens-score": (dict(D=24, Lq=20, Lk=45, seqlens=True, zero_mode="score"), F32),
    "d24-hard-all-zero-tokens-bf16": (dict(D=24, zero_mode="hard", zero_frac=1.1), BF16),
    "d12-mqa-radius-interleaved": (dict(D=12, Hq=4, Hkv=1, Lq=33, Lk=20, radius=True,
                                        interleaved=True), F32),
    "d17-rot10-fp16": (dict(D=17, rotary_dim=10, Lq=9, Lk=30), F16),
    "d16-fp16": (dict(D=16), F16),
    # the CPU backward's dK'^T / dV^T on causal diagonal tiles (K in steps of VL queries):
    # the decoder's D = 24, two query blocks and two key tiles, and an odd D with Lq < Lk
    "d24-causal-l150": (dict(D=24, Lq=150, Lk=150, B=1, Hq=2, Hkv=1, causal=True, seed=25), F32),
    "d17-rot16-causal-lq40-lk70": (dict(D=17, rotary_dim=16, Lq=40, Lk=70, causal=True,
                                        zero_mode="score"), F32),
    "d40": (dict(D=40, Lq=33, Lk=70, seed=40), F32),
    "d40-bf16": (dict(D=40, B=1), BF16),
    "d64": (dict(D=64, Lq=33, Lk=70, seed=64), F32),
    "d128": (dict(D=128, B=1, Hq=2, Hkv=1), F32),
    "d128-causal-bf16": (dict(D=128, B=1, Hq=1, Hkv=1, causal=True), BF16),
    "d128-rot64-interleaved-fp16": (dict(D=128, B=1, Hq=2, Hkv=1, rotary_dim=64,
                                         interleaved=True, radius=True), F16),
    "d256": (dict(D=256, B=1, Hq=1, Hkv=1), F32),
    "no-rotary": (dict(rotary=False), F32),
    "radius": (dict(radius=True), F32),
    "rot16-of-d40": (dict(D=40, rotary_dim=16), F32),
    "interleaved-radius": (dict(interleaved=True, radius=True), F32),
    "interleaved-radius-bf16": (dict(interleaved=True, radius=True), BF16),
    "interleaved-rot32-of-d64-score": (dict(D=64, rotary_dim=32, interleaved=True,
                                            zero_mode="score"), F32),
    "all-zero-tokens": (dict(zero_frac=1.1), F32),
    "no-zero-tokens": (dict(zero_frac=0.0), F32),
    "tiny-zero-scale": (dict(zero_scale=1e-6), F32),
    "scale-one-score": (dict(zero_scale=1.0, zero_mode="score"), F32),
    "hard": (dict(zero_mode="hard"), F32),
    # zero keys first in some rows' view: the rows that see only zero tokens are empty
    "hard-causal-seqlens-fp16": (dict(zero_mode="hard", causal=True, seqlens=True,
                                      zero_frac=0.5), F16),
    "hard-cross-causal": (dict(zero_mode="hard", Lq=40, Lk=17, causal=True, zero_frac=0.4),
                          F32),
    "hard-all-zero-tokens": (dict(zero_mode="hard", zero_frac=1.1), F32),
}


def case_named(name):
    """The case ``CASES[name]`` (fresh random inputs in float64) and its dtype."""
    kwargs, dtype = CASES[name]
    case = attention_case(**kwargs)
    if kwargs.get("zero_frac") == 0.0:
        # no key_zero at all (the kernels' no-zero-token path): zero_scale then has no
        # gradient, so it is left at its default float
        case.pop("key_zero")
        case.pop("zero_scale")
    return case, dtype



#: backends whose kernels form rotary angles in float32 (docs/design.md 3.1's rule allows it)
FLOAT32_ANGLES = ("triton", "cuda")
_DIFF = ("q", "k", "v", "theta_q", "theta_k", "radius", "zero_scale")


def normalised_args(case: dict, dtype: torch.dtype = torch.float32, device="cpu"):
    """The record the backends take (:class:`zeromask.backends.AttentionArgs`) for a case,
    q/k/v in ``dtype`` and everything on ``device``, built by the public API's validation."""
    from zeromask.ops import _normalise_call
    kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in case.items()
              if k not in ("q", "k", "v")}
    return _normalise_call(*(case[n].to(device=device, dtype=dtype) for n in "qkv"), **kwargs)


def _run(case: dict, dtype: torch.dtype, device, backend: Optional[str],
         flip_v: bool = False):
    """Forward + backward of one backend on a copy of case cast to dtype (inputs only).

    ``flip_v``: run with v's features (and so the output's and dout's) in reverse order and
    flip the output and dv back: the same result, with every P V and dO V^T sum taken in
    another order."""
    args = {}
    for key, value in case.items():
        if torch.is_tensor(value) and value.is_floating_point():
            if key in ("q", "k", "v"):
                value = value.to(dtype)
            value = value.to(device).detach().requires_grad_(key in _DIFF)
        elif torch.is_tensor(value):
            value = value.to(device)
        args[key] = value
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    v_in = v.detach().flip(-1).requires_grad_(True) if flip_v else v
    out = zeromask.zero_soft_attention(q, k, v_in, backend=backend, **args)
    g = torch.Generator().manual_seed(1234)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if flip_v:
        dout = dout.flip(-1)
    # hard mode has no zero_scale in its math: nothing flows back to it
    leaves = {"q": q, "k": k, "v": v_in, **{n: args[n] for n in _DIFF[3:] if torch.is_tensor(
        args.get(n)) and args[n].requires_grad and not (
            n == "zero_scale" and args.get("zero_mode") == "hard")}}
    grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), dout,
                                                 allow_unused=True)))
    if flip_v:
        out, grads["v"] = out.flip(-1), grads["v"].flip(-1)
    return out.detach(), grads


def keys_reversed(case: dict) -> Optional[dict]:
    """The same call with the keys in reverse order (k, v, key_zero, theta_k and explicit
    positions pos_k reversed together): the same attention, summed in another order. None
    where the order means something (causal, seqlens_k)."""
    if case.get("causal") or case.get("seqlens_k") is not None:
        return None
    rev = dict(case)
    for key in ("k", "v"):
        rev[key] = case[key].flip(2)
    if case.get("key_zero") is not None:
        rev["key_zero"] = case["key_zero"].flip(1)
    if case.get("theta_k") is not None:
        B, Lk = case["theta_k"].shape
        rev["theta_k"] = case["theta_k"].flip(1)
        rev["pos_k"] = torch.arange(Lk, dtype=torch.float64).flip(0).expand(B, Lk).contiguous()
    return rev


def _unreverse(grads: dict) -> dict:
    dims = {"k": 2, "v": 2, "theta_k": 1}
    return {n: (g.flip(dims[n]) if n in dims and g is not None else g) for n, g in grads.items()}


def check_attention(case: dict, dtype: torch.dtype, backend: str, device="cpu") -> None:
    """Assert ``backend`` matches the reference: output and every gradient.

    Yardstick: the reference run with inputs in ``dtype`` (its own rounding), against the
    reference in float64. One such run is one sample of that rounding error, and for a
    scalar that cancels to a small value (the zero_scale gradient) a single sample can
    happen to be far below its typical size. So the reference also runs with v's features
    reversed (every P V and dO V^T sum in another order) and, where the key order is free
    (not causal, no seqlens_k), with the keys reversed; the yardstick is the largest error.
    For the backends that form rotary angles in float32 (``FLOAT32_ANGLES``, as the
    precision rule of docs/design.md 3.1 allows) the reference with float32 angles is one more.
    """
    oracle_out, oracle_g = _run(case, torch.float64, "cpu", "reference")
    same_out, same_g = _run(case, dtype, device, "reference")
    flip_out, flip_g = _run(case, dtype, device, "reference", flip_v=True)
    same_outs, same_gs = [same_out.cpu(), flip_out.cpu()], [same_g, flip_g]
    rev = keys_reversed(case)
    if rev is not None:
        rev_out, rev_g = _run(rev, dtype, device, "reference")
        same_outs.append(rev_out.cpu())
        same_gs.append(_unreverse(rev_g))
    if backend in FLOAT32_ANGLES and dtype != torch.float64:
        with reference.float32_angles():
            f32_out, f32_g = _run(case, dtype, device, "reference")
        same_outs.append(f32_out.cpu())
        same_gs.append(f32_g)
    out, grads = _run(case, dtype, device, backend)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert_output_close("out", out.cpu(), oracle_out, same_outs, dtype)
    assert set(grads) == set(oracle_g), f"gradients for {set(grads)} vs {set(oracle_g)}"
    for name, g in grads.items():
        assert g is not None, f"no gradient for {name}"
        assert_grad_close(f"d{name}", g.cpu(), oracle_g[name],
                          [sg[name].cpu() for sg in same_gs], dtype)

