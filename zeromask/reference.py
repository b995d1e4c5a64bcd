"""The executable spec: naive PyTorch implementations of every zeromask op.

Everything here follows docs/design.md section 3 literally, materialises the full L x L score
matrix, works in any floating dtype (float64 is the test oracle) and is differentiable in
every input the kernels differentiate: q, k, v, theta_q, theta_k, radius and zero_scale.

These functions do no input validation; the public functionals in :mod:`zeromask.ops`
validate and normalise arguments before any backend (this one included) sees them.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

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


_ANGLE_DTYPE = [torch.float64]


@contextlib.contextmanager
def float32_angles():
    """Inside this block, form the rotary angles in float32 as the ``triton`` and ``cuda``
    kernels do: the precision rule allows it, and the kernel tests use it as one more
    same-dtype yardstick for those backends (``tests/cases.py``)."""
    _ANGLE_DTYPE.append(torch.float32)
    try:
        yield
    finally:
        _ANGLE_DTYPE.pop()


def f0_rotary(
    x: Tensor,
    theta: ThetaLike,
    positions: Optional[Union[Tensor, int]] = None,
    rotary_dim: Optional[int] = None,
    interleaved: bool = False,
    radius: Optional[Tensor] = None,
) -> Tensor:
    """Rotate x (B, H, L, D) by per-position angles (docs/design.md 3.1).

    The angles ``phi = pos * theta ** (-2i/R)`` and their cos/sin are formed in float64 (on
    MPS, which has none, float32) and rounded once to x's compute dtype: the precision rule
    every backend meets is a relative angle error of at most 2**-22 (float32's rounding of
    ``w`` and of the product); this one's is about 1e-16.

    theta: float, (L,) or (B, L); positions: None (arange(L)), an int offset, (L,) or (B, L);
    interleaved pairs dims (2i, 2i+1), otherwise (i, i + R/2); radius (R/2,) scales each pair.
    Dims >= rotary_dim pass through unchanged.
    """
    B, _, L, D = x.shape
    R = D if rotary_dim is None else rotary_dim
    compute = x.dtype if x.dtype == torch.float64 else torch.float32
    ref = x.to(compute)
    # the angles in float64 whatever x's dtype (docs/design.md 3.1's precision rule: the spec
    # at least as accurate as any kernel); MPS has no float64
    float32_asked = compute == torch.float32 and _ANGLE_DTYPE[-1] == torch.float32
    angle = torch.float32 if (x.device.type == "mps" or float32_asked) else torch.float64
    like = ref.new_empty((), dtype=angle)
    theta_bl = _as_bl(theta, B, L, like)
    if positions is None or isinstance(positions, int):
        offset = 0 if positions is None else positions
        positions = torch.arange(L, device=x.device, dtype=angle) + offset
    pos_bl = _as_bl(positions, B, L, like)
    phi = rotary_angles(theta_bl, pos_bl, R).unsqueeze(1)  # (B, 1, L, R/2)
    cos, sin = torch.cos(phi).to(compute), torch.sin(phi).to(compute)
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
    hard_keys: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """True where a score is -inf: causal (bottom-right aligned), beyond seqlens_k, and the
    keys of ``hard_keys`` (bool (B, Lk): zero tokens in hard mode). (B, 1, Lq, Lk)."""
    mask = None
    if hard_keys is not None:
        mask = hard_keys.to(device).view(batch, 1, 1, lk).expand(batch, 1, lq, lk)
    if causal:
        i = torch.arange(lq, device=device).unsqueeze(1)
        j = torch.arange(lk, device=device).unsqueeze(0)
        tri = (j > i + (lk - lq)).view(1, 1, lq, lk).expand(batch, 1, lq, lk)
        mask = tri if mask is None else (mask | tri)
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


def _scores(q: Tensor, k: Tensor, *, key_zero=None, zero_scale=1e-6, zero_mode="prob",
            causal=False, sm_scale=None, seqlens_k=None, theta_q=None, theta_k=None,
            pos_q=None, pos_k=None, rotary_dim=None, interleaved=False, radius=None):
    """(S, zero, ln_s, hard): the logits with score mode applied and -inf where hard-masked
    (hard mode: zero-token keys too), but prob mode's ``+ ln(s)`` on zero keys left out;
    ``zero`` (B, 1, 1, Lk) bool and ``ln_s`` (0-dim) where prob mode applies, else None;
    ``hard`` the :func:`hard_mask` (with hard mode's zero keys)."""
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
    zero = ln_s = None
    if zero_mode not in ("prob", "score", "hard"):
        raise ValueError(f"zero_mode must be 'prob', 'score' or 'hard', got {zero_mode!r}")
    mask = hard_mask(B, Lq, Lk, causal, seqlens_k, s.device, hard_keys=(
        key_zero if zero_mode == "hard" else None))
    if key_zero is not None and zero_mode != "hard":
        zero = key_zero.view(B, 1, 1, Lk)
        if torch.is_tensor(zero_scale):
            zs = zero_scale.to(device=s.device, dtype=compute)
        else:
            zs = torch.tensor(float(zero_scale), device=s.device, dtype=compute)
        if zero_mode == "score":
            s = torch.where(zero, s * zs, s)
            zero = None
        else:
            ln_s = torch.log(zs)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return s, zero, ln_s, mask


def zero_soft_scores(q: Tensor, k: Tensor, **kwargs) -> Tensor:
    """The masked logits S' of docs/design.md 3.3, shape (B, Hq, Lq, Lk), -inf where hard-masked.

    Keyword arguments: ``key_zero``, ``zero_scale`` (float or 0-dim tensor), ``zero_mode``,
    ``causal``, ``sm_scale``, ``seqlens_k``, ``theta_q``, ``theta_k``, ``pos_q``, ``pos_k``,
    ``rotary_dim``, ``interleaved``, ``radius`` (as :func:`zeromask.zero_soft_attention`).
    """
    s, zero, ln_s, _ = _scores(q, k, **kwargs)
    if zero is not None:
        s = s + torch.where(zero, ln_s, torch.zeros((), dtype=s.dtype, device=s.device))
    return s


def _logsumexp_or_neginf(x: Tensor):
    """(row logsumexp (..., 1), dead (..., 1)): -inf where every entry is -inf, with finite
    gradients there (logsumexp's own is NaN on such a row)."""
    dead = torch.isneginf(x).all(-1, keepdim=True)
    lse = torch.logsumexp(x.masked_fill(dead, 0.0), -1, keepdim=True)
    return lse.masked_fill(dead, float("-inf")), dead


def _prob_mode_softmax(s: Tensor, zero: Tensor, ln_s: Tensor,
                       hard: Optional[Tensor]) -> Tensor:
    """softmax(S + ln(s) on zero keys), written as the mixture it is.

    With N the non-zero keys and Z the zero keys of a row, the zero keys hold the mass
    ``z = sigmoid(ln s + lse_Z(S) - lse_N(S))`` and the rest ``1 - z = sigmoid(-(...))``;
    inside each group the weights are that group's softmax of S. The value is the softmax's,
    but ``ln s`` enters through one sigmoid only, so autograd's d/d ln(s) is
    ``z (1 - z) (sum_Z P_Z dP - sum_N P_N dP)`` (a product of accurate terms): exactly 0
    when a row's keys are all zero tokens (z = 1), and no difference of two nearly equal sums anywhere (the direct
    softmax's ``sum_Z dS`` is one, and divided by s = 1e-6 its float32 rounding gave 1.43
    for an exact 0: issue 12). The kernels sum the same quantity from the side with less
    mass. A row with every logit -inf is NaN, as the plain softmax; a row with no zero key
    (``hard``: the hard mask, True = -inf) adds nothing to d/d ln(s), even a NaN row.
    """
    neg = float("-inf")
    s_n, s_z = s.masked_fill(zero, neg), s.masked_fill(~zero, neg)
    lse_n, dead_n = _logsumexp_or_neginf(s_n)
    lse_z, dead_z = _logsumexp_or_neginf(s_z)
    p_n = torch.exp(s_n.masked_fill(dead_n, 0.0) - lse_n.masked_fill(dead_n, 0.0))
    p_z = torch.exp(s_z.masked_fill(dead_z, 0.0) - lse_z.masked_fill(dead_z, 0.0))
    live = True if hard is None else ~hard
    has_z = (zero & live).any(-1, keepdim=True)
    has_n = (~zero & live).any(-1, keepdim=True)
    # a row without zero keys holds no mass there whatever its other logits (NaN included),
    # one without other keys holds all of it; otherwise -inf - -inf (every logit overflowed
    # to -inf) is NaN, as the plain softmax gives
    inf = torch.full((), float("inf"), dtype=s.dtype, device=s.device)
    logit = torch.where(~has_z, -inf, torch.where(~has_n, inf, ln_s + lse_z - lse_n))
    # exp(log sigmoid(x)), not sigmoid(x): sigmoid's backward forms y (1 - y), which loses
    # all but a digit of 1 - y in float32 when y is 1 - 1e-6 (log sigmoid's does not)
    mass_z = torch.exp(F.logsigmoid(logit))
    mass_n = torch.exp(F.logsigmoid(-logit))
    return torch.where(zero, mass_z * p_z, mass_n * p_n)


def empty_rows(batch: int, lq: int, lk: int, causal: bool, seqlens_k: Optional[Tensor],
               device, hard_keys: Optional[Tensor] = None) -> Optional[Tensor]:
    """(B, 1, Lq, 1) True where every key of a query row is hard-masked (causal, seqlens_k,
    and the zero-token keys ``hard_keys`` (B, Lk) of hard mode).

    Only those rows are empty (out 0, lse -inf). A row whose unmasked logits are all -inf
    because ``q . k`` overflowed float32 is not empty: its softmax is NaN (README, "NaN, lengths and limits").
    """
    if hard_keys is not None:
        mask = hard_mask(batch, lq, lk, causal, seqlens_k, device, hard_keys=hard_keys)
        return mask.all(-1, keepdim=True).view(batch, 1, lq, 1)
    if not causal and seqlens_k is None:
        return None if lk > 0 else torch.ones(batch, 1, lq, 1, dtype=torch.bool,
                                              device=device)
    # row i keeps keys [0, min(length, i + Lk - Lq + 1)): empty when that is <= 0
    keys = torch.full((batch, 1), lk, device=device) if seqlens_k is None else \
        seqlens_k.to(device).view(batch, 1)
    if causal:
        keys = torch.minimum(keys, torch.arange(lq, device=device).view(1, lq) + (lk - lq) + 1)
    return (keys <= 0).expand(batch, lq).reshape(batch, 1, lq, 1)


def _hard_keys(kwargs: dict) -> Optional[Tensor]:
    """The zero-token keys that hard mode removes (bool (B, Lk)), else None."""
    return kwargs.get("key_zero") if kwargs.get("zero_mode") == "hard" else None


def zero_soft_attention_weights(q: Tensor, k: Tensor, *, attn_bias: Optional[Tensor] = None,
                                **kwargs) -> Tensor:
    """Attention probabilities P (B, Hq, Lq, Lk); rows with every key hard-masked are 0.

    ``attn_bias`` (float, broadcastable to (B, Hq, Lq, Lk)): an arbitrary additive mask on
    the logits (-inf = the key is hard-masked for that query), as ``nn.MultiheadAttention``'s
    float ``attn_mask``; the kernels have no such input (it costs an Lq x Lk tensor), so
    :class:`zeromask.ZeroSoftAttention` computes such calls here.
    """
    s, zero, ln_s, hard = _scores(q, k, **kwargs)
    empty = empty_rows(q.shape[0], q.shape[2], k.shape[2], kwargs.get("causal", False),
                       kwargs.get("seqlens_k"), s.device, _hard_keys(kwargs))
    if attn_bias is not None:
        bias = attn_bias.to(device=s.device, dtype=s.dtype)
        s = s + bias
        masked = torch.isneginf(bias)
        hard = masked if hard is None else hard | masked
        empty = hard.expand_as(s).all(-1, keepdim=True)  # the causal/length ones included
    if empty is not None:
        # Softmax over a row of -inf is NaN (and so is its gradient): give such rows finite
        # logits, then zero their probabilities.
        s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1) if zero is None else _prob_mode_softmax(s, zero, ln_s, hard)
    return p if empty is None else p.masked_fill(empty, 0.0)


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
    """O = softmax(S') V (docs/design.md 3.3); same kwargs as :func:`zero_soft_scores`."""
    p = zero_soft_attention_weights(q, k, **kwargs)  # attn_bias too
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
                       kwargs.get("seqlens_k"), lse.device, _hard_keys(kwargs))
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
    "float32_angles",
]
