"""The executable spec: naive PyTorch implementations of every zeromask op.

Everything here follows DESIGN.md section 3 literally, materialises the full L x L score
matrix, works in any floating dtype (float64 is the test oracle) and is differentiable in
every input the kernels differentiate: q, k, v, theta_q, theta_k, radius and zero_scale.

These functions do no input validation; the public functionals in :mod:`zeromask.ops`
validate and normalise arguments before any backend (this one included) sees them.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

Tensor = torch.Tensor
ThetaLike = Union[Tensor, float, None]


def _as_bl(value, batch: int, length: int, like: Tensor) -> Tensor:
    """Broadcast a float, a (L,) or a (B, L) tensor to a (B, L) tensor of like's dtype."""
    if not torch.is_tensor(value):
        return torch.full((batch, length), float(value), dtype=like.dtype, device=like.device)
    value = value.to(dtype=like.dtype)
    if value.dim() == 0 or value.dim() == 1:
        value = value.expand(length) if value.dim() == 0 else value
        return value.unsqueeze(0).expand(batch, length)
    return value.expand(batch, length)


def rotary_angles(theta: Tensor, positions: Tensor, rotary_dim: int) -> Tensor:
    """phi_i(b, t) = pos(b, t) * theta(b, t) ** (-2i / R), shape (B, L, R/2)."""
    half = rotary_dim // 2
    exponents = torch.arange(half, device=theta.device, dtype=theta.dtype) * (-2.0 / rotary_dim)
    w = theta.unsqueeze(-1) ** exponents  # (B, L, R/2)
    return positions.unsqueeze(-1) * w


def f0_rotary(
    x: Tensor,
    theta: ThetaLike,
    positions: Optional[Union[Tensor, int]] = None,
    rotary_dim: Optional[int] = None,
    interleaved: bool = False,
    radius: Optional[Tensor] = None,
) -> Tensor:
    """Rotate x (B, H, L, D) by per-position angles (DESIGN.md 3.1).

    theta: float, (L,) or (B, L); positions: None (arange(L)), an int offset, (L,) or (B, L);
    interleaved pairs dims (2i, 2i+1), otherwise (i, i + R/2); radius (R/2,) scales each pair.
    Dims >= rotary_dim pass through unchanged.
    """
    B, _, L, D = x.shape
    R = D if rotary_dim is None else rotary_dim
    compute = x.dtype if x.dtype == torch.float64 else torch.float32
    ref = x.to(compute)
    theta_bl = _as_bl(theta, B, L, ref)
    if positions is None or isinstance(positions, int):
        offset = 0 if positions is None else positions
        positions = torch.arange(L, device=x.device, dtype=compute) + offset
    pos_bl = _as_bl(positions, B, L, ref)
    phi = rotary_angles(theta_bl, pos_bl, R).unsqueeze(1)  # (B, 1, L, R/2)
    cos, sin = torch.cos(phi), torch.sin(phi)
    xr, rest = ref[..., :R], ref[..., R:]
    if interleaved:
        xa, xb = xr[..., 0::2], xr[..., 1::2]
    else:
        xa, xb = xr[..., : R // 2], xr[..., R // 2 :]
    ya = xa * cos - xb * sin
    yb = xa * sin + xb * cos
    if radius is not None:
        rho = radius.to(compute)
        ya, yb = ya * rho, yb * rho
    if interleaved:
        yr = torch.stack((ya, yb), dim=-1).flatten(-2)
    else:
        yr = torch.cat((ya, yb), dim=-1)
    return torch.cat((yr, rest), dim=-1).to(x.dtype)


def hard_mask(
    batch: int,
    lq: int,
    lk: int,
    causal: bool,
    seqlens_k: Optional[Tensor],
    device,
) -> Optional[Tensor]:
    """True where a score is -inf: causal (bottom-right aligned) and beyond seqlens_k. (B,1,Lq,Lk)."""
    mask = None
    if causal:
        i = torch.arange(lq, device=device).unsqueeze(1)
        j = torch.arange(lk, device=device).unsqueeze(0)
        mask = (j > i + (lk - lq)).view(1, 1, lq, lk).expand(batch, 1, lq, lk)
    if seqlens_k is not None:
        j = torch.arange(lk, device=device).view(1, 1, 1, lk)
        beyond = j >= seqlens_k.to(device).view(batch, 1, 1, 1)
        beyond = beyond.expand(batch, 1, lq, lk)
        mask = beyond if mask is None else (mask | beyond)
    return mask


def keys_within_length(x: Tensor, seqlens_k: Optional[Tensor]) -> Tensor:
    """``x`` (B, H, Lk, D) with the slots at or past each row's ``seqlens_k`` set to 0.

    Those slots are garbage by contract (a KV cache's unwritten tail, a padded batch): no
    op may read them, so NaN there must not reach an output, and their gradient is exactly
    0 (``torch.where`` passes none to the slots it replaces).
    """
    if seqlens_k is None:
        return x
    j = torch.arange(x.shape[2], device=x.device).view(1, 1, -1, 1)
    valid = j < seqlens_k.to(x.device).view(-1, 1, 1, 1)
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def zero_soft_scores(
    q: Tensor,
    k: Tensor,
    *,
    key_zero: Optional[Tensor] = None,
    zero_scale: Union[float, Tensor] = 1e-6,
    zero_mode: str = "prob",
    causal: bool = False,
    sm_scale: Optional[float] = None,
    seqlens_k: Optional[Tensor] = None,
    theta_q: ThetaLike = None,
    theta_k: ThetaLike = None,
    pos_q=None,
    pos_k=None,
    rotary_dim: Optional[int] = None,
    interleaved: bool = False,
    radius: Optional[Tensor] = None,
) -> Tensor:
    """The masked logits S' of DESIGN.md 3.3, shape (B, Hq, Lq, Lk), -inf where hard-masked."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    compute = q.dtype if q.dtype == torch.float64 else torch.float32
    scale = D**-0.5 if sm_scale is None else sm_scale
    k = keys_within_length(k, seqlens_k)
    if theta_q is not None:
        q = f0_rotary(q, theta_q, pos_q, rotary_dim, interleaved, radius)
    if theta_k is not None:
        k = f0_rotary(k, theta_k, pos_k, rotary_dim, interleaved, radius)
    q, k = q.to(compute), k.to(compute)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
    s = scale * torch.matmul(q, k.transpose(-1, -2))
    if key_zero is not None:
        zero = key_zero.view(B, 1, 1, Lk)
        if torch.is_tensor(zero_scale):
            zs = zero_scale.to(device=s.device, dtype=compute)
        else:
            zs = torch.tensor(float(zero_scale), device=s.device, dtype=compute)
        if zero_mode == "prob":
            s = s + torch.where(zero, torch.log(zs), torch.zeros((), dtype=compute, device=s.device))
        elif zero_mode == "score":
            s = torch.where(zero, s * zs, s)
        else:
            raise ValueError(f"zero_mode must be 'prob' or 'score', got {zero_mode!r}")
    mask = hard_mask(B, Lq, Lk, causal, seqlens_k, s.device)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return s


def empty_rows(batch: int, lq: int, lk: int, causal: bool, seqlens_k: Optional[Tensor],
               device) -> Optional[Tensor]:
    """(B, 1, Lq, 1) True where every key of a query row is hard-masked (causal, seqlens_k).

    Only those rows are empty (out 0, lse -inf). A row whose unmasked logits are all -inf
    because ``q . k`` overflowed float32 is not empty: its softmax is NaN (README, "NaN, lengths and limits").
    """
    if not causal and seqlens_k is None:
        return None if lk > 0 else torch.ones(batch, 1, lq, 1, dtype=torch.bool,
                                              device=device)
    # row i keeps keys [0, min(length, i + Lk - Lq + 1)): empty when that is <= 0
    keys = torch.full((batch, 1), lk, device=device) if seqlens_k is None else \
        seqlens_k.to(device).view(batch, 1)
    if causal:
        keys = torch.minimum(keys, torch.arange(lq, device=device).view(1, lq) + (lk - lq) + 1)
    return (keys <= 0).expand(batch, lq).reshape(batch, 1, lq, 1)


def zero_soft_attention_weights(q: Tensor, k: Tensor, **kwargs) -> Tensor:
    """Attention probabilities P (B, Hq, Lq, Lk); rows with every key hard-masked are 0."""
    s = zero_soft_scores(q, k, **kwargs)
    empty = empty_rows(q.shape[0], q.shape[2], k.shape[2], kwargs.get("causal", False),
                       kwargs.get("seqlens_k"), s.device)
    if empty is None:
        return torch.softmax(s, dim=-1)
    # Softmax over a row of -inf is NaN (and so is its gradient): give such rows finite
    # logits, then zero their probabilities.
    s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1)
    return p.masked_fill(empty, 0.0)


def _masked_matmul(p: Tensor, v: Tensor) -> Tensor:
    """P V where a key with P = 0 exactly contributes nothing, even a NaN or inf value.

    A plain matmul makes 0 x NaN = NaN: a causally masked key's value would reach rows that
    cannot see it. The fix costs two extra products, paid only when v has non-finite values.
    """
    out = torch.matmul(p, v)
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return out
    clean = torch.matmul(p, torch.where(finite, v, torch.zeros((), dtype=v.dtype,
                                                                device=v.device)))
    hits = torch.matmul((p != 0).to(v.dtype), (~finite).to(v.dtype)) > 0
    return torch.where(hits, out, clean)


def zero_soft_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """O = softmax(S') V (DESIGN.md 3.3); same kwargs as :func:`zero_soft_scores`."""
    p = zero_soft_attention_weights(q, k, **kwargs)
    v = keys_within_length(v, kwargs.get("seqlens_k"))
    Hq, Hkv = q.shape[1], v.shape[1]
    if Hq != Hkv:
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    return _masked_matmul(p, v.to(p.dtype)).to(q.dtype)


def zero_soft_attention_lse(q: Tensor, k: Tensor, **kwargs) -> Tensor:
    """Row logsumexp of S' (natural log), (B, Hq, Lq) float32/64; -inf for empty rows,
    NaN for a row that is not empty but whose logits all overflowed to -inf."""
    lse = torch.logsumexp(zero_soft_scores(q, k, **kwargs), dim=-1)
    empty = empty_rows(q.shape[0], q.shape[2], k.shape[2], kwargs.get("causal", False),
                       kwargs.get("seqlens_k"), lse.device)
    live = torch.ones_like(lse, dtype=torch.bool) if empty is None else ~empty[..., 0]
    return torch.where(live & torch.isneginf(lse), torch.full_like(lse, float("nan")), lse)


def sdpa_equivalent_mask(key_zero: Tensor, zero_scale: float, dtype=torch.float32) -> Tensor:
    """The additive (B, 1, 1, Lk) mask that makes SDPA compute prob mode: ln(s) on zero keys."""
    B, Lk = key_zero.shape
    bias = torch.zeros(B, 1, 1, Lk, dtype=dtype, device=key_zero.device)
    return bias.masked_fill(key_zero.view(B, 1, 1, Lk), math.log(zero_scale))


__all__ = [
    "f0_rotary",
    "rotary_angles",
    "hard_mask",
    "keys_within_length",
    "empty_rows",
    "zero_soft_scores",
    "zero_soft_attention_weights",
    "zero_soft_attention",
    "zero_soft_attention_lse",
    "sdpa_equivalent_mask",
]
