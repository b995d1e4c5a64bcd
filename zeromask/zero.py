"""Which tokens are zero tokens (docs/design.md 3.4).

Every helper returns a bool tensor, True where the token is a zero token, ready to pass as
``key_zero`` to :func:`zeromask.zero_soft_attention` or as ``key_padding_mask`` to
:class:`zeromask.ZeroSoftAttention`.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def from_ids(ids: Tensor, zero_id: int = 0) -> Tensor:
    """Text: ``ids == zero_id`` (pad, start and end all use id 0). Shape of ``ids``."""
    if not torch.is_tensor(ids) or ids.is_floating_point():
        raise TypeError("ids must be an integer tensor of token ids")
    return ids == zero_id


#: the absolute silence floor of :func:`from_audio`, dB (log-mel power, reference 1.0)
SILENCE_FLOOR_DB = -80.0


def frame_energy_db(log_mel: Tensor, mel_dim: int = -1) -> Tensor:
    """Per-frame energy in dB of a log-mel spectrogram in dB (``10 log10`` power).

    The mean of the mel bands' power, back in dB: ``10 log10(mean_m 10**(x_m / 10))``.
    """
    ln10 = torch.log(torch.tensor(10.0, dtype=log_mel.dtype, device=log_mel.device))
    natural = log_mel * (ln10 / 10.0)
    n = log_mel.shape[mel_dim]
    mean_ln = torch.logsumexp(natural, dim=mel_dim) - torch.log(
        torch.tensor(float(n), dtype=log_mel.dtype, device=log_mel.device))
    return mean_ln * (10.0 / ln10)


def from_audio(
    features: Tensor,
    log_mel: Optional[Tensor] = None,
    *,
    top_db: Optional[float] = 50.0,
    threshold_db: Optional[float] = SILENCE_FLOOR_DB,
    feature_dim: int = -1,
    mel_dim: int = -1,
) -> Tensor:
    """Audio: silent frames and padding frames.

    features: ``(B, T, F)`` (or ``(T, F)``) frames; a frame whose features are all exactly 0
    is padding and therefore a zero token. ``log_mel`` (dB, ``(B, T, n_mels)`` by default,
    ``mel_dim`` says where the bands are): a frame is silent when its energy
    (:func:`frame_energy_db`) is below ``threshold_db`` (absolute; default
    ``SILENCE_FLOOR_DB`` = -80 dB, so digital silence, -100 dB at the features' floor, and
    16-bit dither, about -93 dB, are always zero tokens, even in an utterance with no speech
    at all), or more than ``top_db`` below the loudest non-padding frame of its utterance.
    ``None`` turns either rule off. ``log_mel`` may be ``features`` itself. Returns bool
    ``(B, T)``.
    """
    if not torch.is_tensor(features) or not features.is_floating_point():
        raise TypeError("features must be a floating tensor of frames")
    zero = (features == 0).all(dim=feature_dim)
    if log_mel is None:
        return zero
    energy = frame_energy_db(log_mel, mel_dim=mel_dim)
    if energy.shape != zero.shape:
        raise ValueError(f"log_mel gives {tuple(energy.shape)} frames but features give "
                         f"{tuple(zero.shape)}; check feature_dim/mel_dim")
    silent = torch.zeros_like(zero)
    if threshold_db is not None:
        silent |= energy < threshold_db
    if top_db is not None:
        loudest = energy.masked_fill(zero, float("-inf")).amax(dim=-1, keepdim=True)
        silent |= energy < loudest - top_db
    return zero | silent


def from_keys(k: Tensor) -> Tensor:
    """Echo-compatible: a key is a zero token when its first feature is exactly 0.

    ``k`` is ``(B, L, D)`` (token embeddings) or ``(B, H, L, D)`` (per-head keys; a key is
    zero when ``k[..., 0] == 0`` in every head). Returns bool ``(B, L)``.
    """
    if not torch.is_tensor(k) or k.dim() not in (3, 4):
        raise ValueError("k must be a (B, L, D) or (B, H, L, D) tensor")
    first = k[..., 0] == 0
    return first.all(dim=1) if k.dim() == 4 else first


def lengths_to_zero(lengths: Tensor, max_len: int) -> Tensor:
    """Padding from lengths: True at positions ``>= lengths[b]``. Shape ``(B, max_len)``."""
    pos = torch.arange(max_len, device=lengths.device)
    return pos.unsqueeze(0) >= lengths.unsqueeze(1)


__all__ = ["from_ids", "from_audio", "from_keys", "frame_energy_db", "lengths_to_zero"]
