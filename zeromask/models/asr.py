"""The reference speech model (docs/design.md section 5): per-feature encoders, gated decoder.

Encoder: for each feature in ``feature_order`` (spectrogram ``(B, T, n_mels)``, waveform
frames ``(B, T, hop)``, pitch ``(B, T, 3)`` = f0, energy, periodicity) its own front-end
(fixed input scaling, a linear layer, stride-2 convolutions down to ``T / downsample``) and
sinusoidal absolute positions (``abs_pos``), and its own stack of pre-LN transformer layers
whose self-attention is a
:class:`zeromask.ZeroSoftAttention` with an :class:`zeromask.F0Rotary` fed by the
utterance's F0 contour. Silent frames (``zeromask.zero.from_audio``: log-mel energy more
than ``silence_top_db`` below the utterance's loudest frame, or padding) are zero tokens; a
downsampled frame is a zero token when every frame it covers is one (``zero_tokens``
chooses fewer: padding only, or none; ``rotary=False`` removes every rotary).

Decoder: character embeddings, causal self-attention layers (id 0 — start, pad — is a
zero token; ``start_token="distinct"`` gives the start its own id, attended normally),
then one cross-attention stage per feature in ``feature_order``, each stage
reading that feature's encoder output; stage ``k`` maps ``x`` to ``stage_k(x)`` and the
result is blended ``x + sigmoid(g_k) * (stage_k(x) - x)`` with a learnable gate ``g_k``, so
every stage builds on the one before. Labels are the text followed by one 0 ("end");
:meth:`SpeechModel.generate` decodes greedily with a KV cache and stops at 0.

Every attention call goes through the zeromask dispatch with ``config.backend``; with
``zero_mode="hard"`` (or ``zero_scaling=False``) the same kernels hard-mask the zero tokens
(-inf) instead of scaling them (see :class:`ModelConfig`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import zero
from ..modules import F0Rotary, ZeroSoftAttention
from .config import ModelConfig

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------
# attention: the zeromask module's public face, whole sequences and KV-cache steps
# ----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """A :class:`ZeroSoftAttention` used through its public face.

    ``forward`` for a whole sequence; :meth:`step` for a KV-cache decoding step against keys
    and values projected once with ``ZeroSoftAttention.project_key_value``. Zero tokens are
    soft-scaled (``config.zero_mode`` "prob" or "score") or, with ``zero_scaling=False`` or
    ``zero_mode="hard"``, removed (-inf) by the same kernels.
    """

    def __init__(self, cfg: ModelConfig, rotary: Optional[F0Rotary]):
        super().__init__()
        self.attn = ZeroSoftAttention(
            cfg.d_model, cfg.num_heads, batch_first=True, num_kv_heads=cfg.num_kv_heads,
            zero_scale=cfg.zero_scale, learnable_zero_scale=cfg.learnable_zero_scale,
            zero_mode=cfg.effective_zero_mode, rotary=rotary, backend=cfg.backend)

    def forward(self, x: Tensor, mem: Tensor, key_zero: Optional[Tensor], causal: bool = False,
                query_f0: Optional[Tensor] = None, key_f0: Optional[Tensor] = None,
                weights: Optional[list] = None) -> Tensor:
        """Output ``(B, Lq, E)``; with a list ``weights``, appends the head-averaged
        attention probabilities ``(B, Lq, Lk)`` (materialised: for plots, not for speed)."""
        out, w = self.attn(x, mem, mem, key_padding_mask=key_zero, is_causal=causal,
                           query_f0=query_f0, key_f0=key_f0, need_weights=weights is not None)
        if weights is not None:
            weights.append(w)
        return out

    def step(self, x: Tensor, k: Tensor, v: Tensor, key_zero: Optional[Tensor], pos: int,
             key_f0: Optional[Tensor] = None, keys_rotated: bool = False) -> Tensor:
        """One query token ``x`` ``(B, 1, E)`` at position ``pos`` against cached key/value
        heads ``(B, Hkv, Lk, Dh)`` (rotated once by ``ZeroSoftAttention.rotate_keys`` when
        ``keys_rotated``, else unrotated and rotated by the kernel); ``(B, 1, E)``."""
        return self.attn.attend(self.attn.project_query(x), k, v, key_padding_mask=key_zero,
                                key_f0=key_f0, keys_rotated=keys_rotated,
                                query_pos=pos if self.attn.rotary is not None else None)


def sinusoid(length: int, dim: int, offset: int = 0, device=None,
             dtype=torch.float32) -> Tensor:
    """(length, dim) sinusoidal position table for positions ``offset ..``."""
    pos = torch.arange(offset, offset + length, device=device, dtype=torch.float32)[:, None]
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / max(1, half - 1)))
    ang = pos * freq[None]
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0:2 * half:2] = torch.sin(ang)
    table[:, 1:2 * half:2] = torch.cos(ang)
    return table.to(dtype)


def make_rotary(cfg: ModelConfig, contour: bool) -> F0Rotary:
    """An :class:`F0Rotary`; with ``contour=False`` (no F0 ever reaches it: text, or
    ``f0_rotary=False``) only its constant ``theta_base`` is learnable, ``t_min``/``t_max``
    become buffers so no parameter goes without a gradient (DDP needs that)."""
    rot = F0Rotary(cfg.rotary_mode)
    if not contour:
        for name in ("t_min", "t_max"):
            value = getattr(rot, name).detach().clone()
            delattr(rot, name)
            rot.register_buffer(name, value)
    return rot


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.ffn_mult * d), nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn_mult * d, d),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class ConvModule(nn.Module):
    """Conformer's convolution module (Gulati et al. 2020), residual: LayerNorm, pointwise
    conv to 2d + GLU, depthwise conv over time (``kernel`` frames, 'same' padding),
    LayerNorm (not BatchNorm: padded batches), SiLU, pointwise conv, dropout.
    ``(B, T, d) -> (B, T, d)``; padding frames are zeroed before the depthwise conv so they
    never leak into real frames."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 2 * d)
        self.dw = nn.Conv1d(d, d, cfg.conv_kernel, padding=cfg.conv_kernel // 2, groups=d)
        self.dw_norm = nn.LayerNorm(d)
        self.pw2 = nn.Linear(d, d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        h = F.glu(self.pw1(self.norm(x)), dim=-1)
        if valid is not None:
            h = h * valid[..., None]
        h = self.dw(h.transpose(1, 2)).transpose(1, 2)
        return x + self.drop(self.pw2(F.silu(self.dw_norm(h))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, make_rotary(cfg, contour=cfg.f0_rotary)
                              if cfg.rotary else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.conv = ConvModule(cfg) if cfg.conv_kernel else None
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, zero_mask: Tensor, f0: Optional[Tensor],
                valid: Optional[Tensor] = None) -> Tensor:
        h = self.norm(x)
        x = x + self.drop(self.attn(h, h, zero_mask, query_f0=f0, key_f0=f0))
        if self.conv is not None:
            x = self.conv(x, valid)
        return self.ffn(x)


class FrontEnd(nn.Module):
    """Input scaling, then subsampling to ``T / downsample`` frames of width ``d_model``.

    Scaling: fixed (``input_norm="fixed"``: dB to about [-2, 1.5], waveform x 4, pitch
    log-compressed), then with ``input_norm="utterance"`` each utterance normalised over
    its valid frames: per-channel mean and variance (CMVN) of the spectrogram and pitch,
    RMS of the waveform; so loudness, microphone tilt and a speaker's pitch range are
    taken out before the model sees them.

    Subsampling (``frontend``): ``"project"``, a per-frame linear layer then stride-2
    convolutions of width ``d_model``; ``"conv"``, stride-2 convolutions (kernel 3) straight
    on the input features (ESPnet's Conv1dSubsampling), no full-rate layer of width
    ``d_model``, about half the cost.
    """

    def __init__(self, feature: str, cfg: ModelConfig):
        super().__init__()
        self.feature = feature
        self.input_norm = cfg.input_norm
        in_dim = {"spectrogram": cfg.n_mels, "waveform": cfg.hop_length, "pitch": 3}[feature]
        d = cfg.d_model
        n_down = int(round(math.log2(cfg.downsample)))
        if cfg.frontend == "project" or n_down == 0:
            self.proj = nn.Linear(in_dim, d)
            widths = [d] * (n_down + 1)
        else:
            self.proj = None
            widths = [in_dim] + [d] * n_down
        self.convs = nn.ModuleList(nn.Conv1d(widths[i], d, 3, stride=2, padding=1)
                                   for i in range(n_down))
        self.norm = nn.LayerNorm(d)

    def scale(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """Scaled input ``(B, T, C)``; ``lengths`` ``(B,)`` valid frames (``input_norm``
        ``"utterance"``; default: all frames). Padding frames stay 0."""
        if self.feature == "spectrogram":  # dB, floor -100: roughly [-2, 1.5]
            x = (x + 40.0) / 30.0
        elif self.feature == "waveform":
            x = x * 4.0
        else:
            f0, energy, per = x.unbind(-1)
            f0n = torch.log1p(f0.clamp_min(0) / 700.0) / math.log1p(600.0 / 700.0)
            en = (torch.log(energy.clamp_min(0) + 1e-4) + 5.0) / 4.0
            x = torch.stack([f0n, en, per], dim=-1)
        if self.input_norm != "utterance":
            return x
        B, T = x.shape[:2]
        if lengths is None:
            lengths = torch.full((B,), T, device=x.device)
        valid = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[..., None]
        n = lengths.clamp_min(1).to(x.dtype)[:, None, None]
        if self.feature == "waveform":
            rms = ((x * x * valid).sum((1, 2), keepdim=True) / (n * x.shape[2])).sqrt()
            return x * valid / rms.clamp_min(1e-4)
        mean = (x * valid).sum(1, keepdim=True) / n
        var = (((x - mean) ** 2) * valid).sum(1, keepdim=True) / n
        return (x - mean) * valid / var.sqrt().clamp_min(0.05)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """``(B, T, C)`` features, ``lengths`` ``(B,)`` valid frames -> ``(B, T', d)``."""
        h = self.scale(x, lengths)
        if self.proj is not None:
            h = F.gelu(self.proj(h))
        h = h.transpose(1, 2)
        for conv in self.convs:
            h = F.gelu(conv(h))
        return self.norm(h.transpose(1, 2))


def downsample_mask(mask: Tensor, factor: int) -> Tensor:
    """(B, T) zero mask -> (B, ceil(T / factor)): zero where every covered frame is zero."""
    while factor > 1:
        if mask.shape[1] % 2:
            mask = F.pad(mask, (0, 1), value=True)
        mask = mask.view(mask.shape[0], -1, 2).all(dim=-1)
        factor //= 2
    return mask


class FeatureEncoder(nn.Module):
    def __init__(self, feature: str, cfg: ModelConfig):
        super().__init__()
        self.abs_pos = cfg.abs_pos
        self.front = FrontEnd(feature, cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers_for(feature)))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, zero_mask: Tensor, f0: Optional[Tensor],
                lengths: Optional[Tensor] = None,
                frame_lengths: Optional[Tensor] = None) -> Tensor:
        """``lengths`` ``(B,)``: valid frames after downsampling (for the conv modules);
        ``frame_lengths`` ``(B,)``: valid input frames (for ``input_norm``)."""
        h = self.front(x, frame_lengths)
        if self.abs_pos:
            h = h + sinusoid(h.shape[1], h.shape[2], device=h.device, dtype=h.dtype)
        valid = None
        if lengths is not None:
            valid = (torch.arange(h.shape[1], device=h.device)[None, :]
                     < lengths[:, None]).to(h.dtype)
        for layer in self.layers:
            h = layer(h, zero_mask, f0, valid)
        return self.norm(h)


class DecoderSelfLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, make_rotary(cfg, contour=False)  # text has no f0
                              if cfg.rotary else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.ffn = FeedForward(cfg)


class CrossLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, make_rotary(cfg, contour=cfg.f0_rotary)
                              if cfg.cross_rotary else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.ffn = FeedForward(cfg)


class CrossStage(nn.Module):
    """Cross-attention to one feature's encoder output, blended in by a learnable gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(cfg) for _ in range(cfg.dec_cross_layers))
        self.gate = nn.Parameter(torch.zeros(()))

    def blend(self, x: Tensor, y: Tensor) -> Tensor:
        return x + torch.sigmoid(self.gate) * (y - x)


def spec_augment(spec: Tensor, lengths: Tensor, freq_masks: int, freq_width: int,
                 time_masks: int, time_width_fraction: float,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """SpecAugment's frequency and time masking (Park et al. 2019, without time warping).

    ``spec`` ``(B, T, n_mels)`` log-mel (dB); ``lengths`` ``(B,)`` valid frames per row.
    Each row gets ``freq_masks`` bands of ``[0, freq_width]`` mel bins and ``time_masks``
    spans of ``[0, time_width_fraction * length]`` frames, set to the row's mean over its
    valid frames (so a mask is neither silence nor padding). Returns a new tensor.
    """
    B, T, M = spec.shape
    out = spec.clone()
    dev = spec.device

    def rand(n):
        return torch.rand(B, n, device=dev, generator=generator)

    valid = torch.arange(T, device=dev)[None, :] < lengths[:, None]          # (B, T)
    fill = ((spec * valid[..., None]).sum((1, 2)) /
            (valid.sum(1).clamp_min(1) * M))[:, None, None]                  # (B, 1, 1)
    bins = torch.arange(M, device=dev)[None, :]
    for _ in range(freq_masks):
        w = (rand(1) * (freq_width + 1)).floor().clamp_max(M)
        f0 = (rand(1) * (M - w + 1)).floor()
        band = (bins >= f0) & (bins < f0 + w)                                # (B, M)
        out = torch.where(band[:, None, :] & valid[:, :, None], fill, out)
    frames = torch.arange(T, device=dev)[None, :]
    for _ in range(time_masks):
        w = (rand(1) * (time_width_fraction * lengths[:, None].float() + 1)).floor()
        t0 = (rand(1) * (lengths[:, None].float() - w + 1).clamp_min(1)).floor()
        span = (frames >= t0) & (frames < t0 + w) & valid                    # (B, T)
        out = torch.where(span[:, :, None], fill, out)
    return out


def vtlp_warp(spec: Tensor, lengths: Tensor, max_warp: float, boundary: float = 0.8,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """Vocal tract length perturbation (Jaitly and Hinton 2013) on a log-mel ``(B, T, M)``.

    Each utterance draws ``alpha`` uniformly in ``[1 - max_warp, 1 + max_warp]`` and its mel
    axis is warped piecewise-linearly: bin ``f`` reads bin ``alpha f`` up to the boundary
    ``f_b = boundary (M - 1) min(alpha, 1) / alpha``, then a straight line that maps the top
    bin onto itself (so no band leaves the axis); values between bins are linearly
    interpolated. Speakers differ mostly in vocal tract length, which scales the formants:
    the model sees the same text with other formants every epoch. Padding frames (past
    ``lengths``) stay exactly 0. Returns a new tensor.
    """
    B, T, M = spec.shape
    dev = spec.device
    alpha = 1 + max_warp * (2 * torch.rand(B, 1, device=dev, generator=generator) - 1)
    top = float(M - 1)
    f = torch.arange(M, device=dev, dtype=spec.dtype)[None, :]                # (1, M)
    fb = boundary * top * torch.minimum(alpha, torch.ones_like(alpha)) / alpha  # (B, 1)
    low = f * alpha
    high = alpha * fb + (top - alpha * fb) * (f - fb) / (top - fb)
    src = torch.where(f <= fb, low, high).clamp(0, top)                       # (B, M)
    i0 = src.floor().long().clamp_max(M - 2)
    w = (src - i0)[:, None, :]
    idx0 = i0[:, None, :].expand(B, T, M)
    out = spec.gather(2, idx0) * (1 - w) + spec.gather(2, idx0 + 1) * w
    valid = torch.arange(T, device=dev)[None, :] < lengths[:, None]
    return out * valid[..., None]


def frame_lengths_of(x: Tensor) -> Tensor:
    """(B,) valid frames of a zero-padded ``(B, T, ...)`` batch: trailing all-zero frames are
    padding (the :func:`zeromask.data.collate` convention)."""
    nonzero = (x != 0).flatten(2).any(-1)                                    # (B, T)
    idx = torch.arange(1, x.shape[1] + 1, device=x.device)
    return (nonzero * idx).amax(dim=1)


def resample_time(x: Tensor, lengths: Tensor, factor: float, mode: str = "linear",
                  pad_multiple: int = 1) -> Tuple[Tensor, Tensor]:
    """Each utterance's valid frames ``x[i, :lengths[i]]`` of a ``(B, T, ...)`` batch
    resampled in time to ``max(1, round(lengths[i] * factor))`` frames (``factor`` > 1:
    slower, longer speech), zero-padded to the longest, rounded up to ``pad_multiple``.

    ``mode`` is ``"linear"`` (``F.interpolate``, ``align_corners=False``) or ``"nearest"``
    (for F0, where 0 = unvoiced must stay 0). Returns ``(y, new_lengths)``; dtype kept.
    Raises ValueError for a ``factor`` that is not a positive finite number or another mode.
    """
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a positive finite number, got {factor!r}")
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    new = torch.clamp(torch.round(lengths.double() * factor).long(), min=1)
    T = max(1, int(new.max())) if len(new) else 1
    T = -(-T // pad_multiple) * pad_multiple
    y = x.new_zeros((x.shape[0], T) + tuple(x.shape[2:]))
    for i in range(x.shape[0]):
        n, m = int(lengths[i]), int(new[i])
        if n < 1:
            continue
        seg = x[i, :n].reshape(1, n, -1).transpose(1, 2).float()          # (1, C, n)
        kw = {"align_corners": False} if mode == "linear" else {}
        out = F.interpolate(seg, size=m, mode=mode, **kw).transpose(1, 2)  # (1, m, C)
        y[i, :m] = out.reshape((m,) + tuple(x.shape[2:])).to(x.dtype)
    return y, new.to(lengths.dtype)


def downsampled_lengths(lengths: Tensor, factor: int) -> Tensor:
    """Frame counts after the front-end's stride-2 convolutions: ceil(L / 2) per halving."""
    while factor > 1:
        lengths = (lengths + 1) // 2
        factor //= 2
    return lengths


def ctc_token_log_likelihood(log_probs: Tensor, lengths: Tensor,
                             hyps: Sequence[Sequence[int]], blank: int = 0) -> Tensor:
    """(B,) float64 ``log P_ctc(hyp | x) / max(1, len(hyp))``: each hypothesis's CTC
    log-likelihood (``F.ctc_loss``, all alignments) per token, from ``log_probs`` ``(B, T,
    vocab)`` over ``lengths`` frames; ``-inf`` where no alignment fits the frames."""
    B = log_probs.shape[0]
    tl = torch.tensor([len(h) for h in hyps], dtype=torch.long)
    flat = [t for h in hyps for t in h]
    targets = torch.tensor(flat if flat else [blank + 1], dtype=torch.long)
    nll = F.ctc_loss(log_probs.transpose(0, 1).float().cpu(), targets, lengths.cpu(), tl,
                     blank=blank, reduction="none", zero_infinity=False).double()
    out = -nll / tl.clamp(min=1).double()
    return torch.where(torch.isfinite(out), out, torch.full((B,), -math.inf,
                                                            dtype=torch.float64))


def ctc_greedy(log_probs: Tensor, lengths: Tensor, blank: int = 0) -> List[List[int]]:
    """Best-path CTC decoding: argmax per frame, repeats collapsed, blanks dropped.

    ``log_probs`` ``(B, T, V)`` (or scores: only the argmax matters), ``lengths`` ``(B,)``.
    """
    best = log_probs.argmax(-1).tolist()
    out = []
    for row, n in zip(best, lengths.tolist()):
        ids, prev = [], blank
        for t in row[: int(n)]:
            if t != prev and t != blank:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


class CTCPrefixScorer:
    """CTC prefix scores of one growing hypothesis per row, for joint CTC/attention decoding.

    The prefix probability ``psi(h) = sum of P_ctc(y | x) over every label sequence y that
    starts with h`` (Watanabe, Hori, Kim, Hershey and Hayashi 2017, "Hybrid CTC/attention
    architecture for end-to-end speech recognition", Algorithm 2), from the forward variables
    ``r_t^n(h)`` (paths over frames ``0..t`` that output ``h`` and end in its last label) and
    ``r_t^b(h)`` (... and end in blank). Their recursions over frames,
    ``r_t^n(h) = (r_{t-1}^n(h) + phi_{t-1}) y_t^c`` and
    ``r_t^b(h) = (r_{t-1}^b(h) + r_{t-1}^n(h)) y_t^blank``, are linear, so they are solved in
    closed form with cumulative sums and ``torch.logcumsumexp`` (float64, log domain): no
    Python loop over frames.

    Args:
        log_probs: ``(B, T, V)`` CTC log-probabilities (any float dtype).
        lengths: ``(B,)`` valid frames per row (clamped to ``1..T``).
        blank: the blank id; it doubles as the end token (this model's id 0).

    :meth:`score` gives, for every id ``c`` at once, ``log psi(g + c) - log psi(g)`` of the
    current prefix ``g`` (for the end token: ``log P_ctc(g | x) - log psi(g)``, always finite
    while ``psi(g)`` is); :meth:`advance` appends one id per row. Summed over a hypothesis and
    its end token the scores give ``log P_ctc(y | x)`` (``-F.ctc_loss``, reduction="none").
    """

    def __init__(self, log_probs: Tensor, lengths: Tensor, blank: int = 0):
        x = log_probs.detach().double().transpose(0, 1)               # (T, B, V)
        T, B, _ = x.shape
        self.x, self.blank = x, int(blank)
        self.last_frame = (lengths.to(x.device).long().clamp(1, T) - 1)[None]   # (1, B)
        self.invalid = torch.arange(T, device=x.device)[:, None] > self.last_frame  # (T, B)
        self.cum_blank = x[:, :, self.blank].cumsum(0)                  # (T, B)
        self.r_n = x.new_full((T, B), -math.inf)                         # prefix = nothing
        self.r_b = self.cum_blank.clone()
        self.log_psi = x.new_zeros(B)
        self.last = torch.full((B,), -1, dtype=torch.long, device=x.device)
        self.started = False

    def _phi_and_first(self, xc: Tensor, ids: Tensor):
        """phi (T, B, K): path mass that a new label ``ids`` (B, K) may follow (a repeat of
        the prefix's last label must pass through a blank); the emission at frame 0."""
        repeat = (ids == self.last[:, None])[None]
        phi = torch.logaddexp(self.r_b[..., None],
                              self.r_n[..., None].masked_fill(repeat, -math.inf))
        first = torch.full_like(xc[0], -math.inf) if self.started else xc[0]
        return phi, first

    def _log_psi(self, xc: Tensor, phi: Tensor, first: Tensor) -> Tensor:
        terms = torch.cat([first[None], phi[:-1] + xc[1:]], 0)
        return terms.masked_fill(self.invalid[..., None], -math.inf).logsumexp(0)

    def score(self) -> Tensor:
        """``(B, V)`` float64: ``log psi(g + c) - log psi(g)`` for every id ``c`` (for the
        blank/end id: ``log P_ctc(g | x) - log psi(g)``)."""
        ids = torch.arange(self.x.shape[-1], device=self.x.device).expand(self.x.shape[1], -1)
        phi, first = self._phi_and_first(self.x, ids)
        log_psi = self._log_psi(self.x, phi, first)
        end = torch.logaddexp(self.r_n, self.r_b).gather(0, self.last_frame)[0]
        log_psi[:, self.blank] = end
        return log_psi - self.log_psi[:, None]

    def advance(self, ids: Tensor, keep: Optional[Tensor] = None) -> None:
        """Append ``ids`` ``(B,)`` (never the blank/end id) to the rows where ``keep``
        ``(B,)`` bool is True (default: all); the other rows stay as they are."""
        T, B = self.x.shape[0], ids.shape[0]
        keep = torch.ones(B, dtype=torch.bool, device=ids.device) if keep is None else keep
        ids = ids.masked_fill(~keep, 0 if self.blank else 1)  # any non-blank id for frozen rows
        xc = self.x.gather(2, ids[None, :, None].expand(T, B, 1))       # (T, B, 1)
        phi, first = self._phi_and_first(xc, ids[:, None])
        log_psi = self._log_psi(xc, phi, first)[:, 0]
        xc, phi, first = xc[..., 0], phi[..., 0], first[:, 0]
        cum = xc.cumsum(0)    # r_t^n = e^cum_t (r_0^n e^-cum_0 + sum_{s<=t} phi_{s-1} e^-cum_{s-1})
        r_n = cum + torch.logcumsumexp(torch.cat([(first - cum[0])[None],
                                                  phi[:-1] - cum[:-1]], 0), 0)
        r_b = self.cum_blank + torch.logcumsumexp(     # r_t^b = sum_{s<=t} r_{s-1}^n y_s..t^b
            torch.cat([torch.full_like(r_n[:1], -math.inf),
                       r_n[:-1] - self.cum_blank[:-1]], 0), 0)
        self.r_n = torch.where(keep[None], r_n, self.r_n)
        self.r_b = torch.where(keep[None], r_b, self.r_b)
        self.log_psi = torch.where(keep, log_psi, self.log_psi)
        self.last = torch.where(keep, ids, self.last)
        self.started = True

    def reorder(self, index: Tensor) -> None:
        """Row ``r`` takes the prefix state of row ``index[r]`` (``(B,)`` long), for beam
        search, where a beam continues another beam's prefix. Only the prefix state moves:
        ``index[r]`` must read the same utterance's frames as ``r`` (a beam of the same
        utterance)."""
        self.r_n = self.r_n.index_select(1, index)
        self.r_b = self.r_b.index_select(1, index)
        self.log_psi = self.log_psi.index_select(0, index)
        self.last = self.last.index_select(0, index)


def ctc_targets(labels: Tensor) -> Tuple[Tensor, Tensor]:
    """(concatenated targets, lengths) for :func:`F.ctc_loss` from decoder labels
    (text ids, then 0 = end, then -100 padding): the text ids only."""
    keep = labels > 0
    return labels[keep], keep.sum(1)


class SpeechModel(nn.Module):
    """Encoder/decoder ASR of docs/design.md section 5 (see the module doc)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoders = nn.ModuleDict({f: FeatureEncoder(f, cfg) for f in cfg.feature_order})
        # start_token="distinct": one more row, id vocab_size, read at position 0 only
        self.embed = nn.Embedding(cfg.vocab_size + (cfg.start_token == "distinct"),
                                  cfg.d_model)
        self.self_layers = nn.ModuleList(DecoderSelfLayer(cfg)
                                         for _ in range(cfg.dec_self_layers))
        self.stages = nn.ModuleDict({f: CrossStage(cfg) for f in cfg.feature_order})
        self.out_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        if cfg.ctc_weight > 0:
            self.ctc_norm = nn.LayerNorm(cfg.d_model)
            self.ctc_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # curriculum -----------------------------------------------------------------------
    def active_features(self, step: Optional[int] = None) -> List[str]:
        """Features (in ``feature_order``) enabled at training ``step`` (default: own step).

        With ``curriculum_steps = c > 0`` stage k is enabled from step ``k * c`` on.
        """
        order = list(self.config.feature_order)
        c = self.config.curriculum_steps
        if c <= 0:
            return order
        s = int(self.step) if step is None else int(step)
        return order[: min(len(order), 1 + s // c)]

    def set_step(self, step: int) -> None:
        self.step.fill_(int(step))

    # encoder --------------------------------------------------------------------------
    def zero_mask(self, spectrogram: Tensor, frame_lengths: Optional[Tensor] = None) -> Tensor:
        """(B, T) frame-rate zero tokens: silent (log-mel) or padding frames; with
        ``zero_tokens="padding"`` the frames past ``frame_lengths`` (default: inferred from
        the exact-zero padding) only, with ``"none"`` no frame."""
        c = self.config
        if c.zero_tokens == "silence":
            return zero.from_audio(spectrogram, spectrogram, top_db=c.silence_top_db,
                                   threshold_db=c.silence_threshold_db)
        if c.zero_tokens == "none":
            return torch.zeros(spectrogram.shape[:2], dtype=torch.bool,
                               device=spectrogram.device)
        if frame_lengths is None:
            frame_lengths = frame_lengths_of(spectrogram)
        return zero.lengths_to_zero(frame_lengths.to(spectrogram.device), spectrogram.shape[1])

    def text_zero_mask(self, ids: Tensor) -> Tensor:
        """(B, N) zero tokens of decoder input ids (as :meth:`decoder_ids` gives them): id
        0 with ``zero_tokens="silence"``, none otherwise (a real token's causal keys are
        never text padding)."""
        if self.config.zero_tokens == "silence":
            return zero.from_ids(ids)
        return torch.zeros_like(ids, dtype=torch.bool)

    def decoder_ids(self, input_ids: Tensor, offset: int = 0) -> Tensor:
        """The ids the decoder reads for ``input_ids`` at positions ``offset ..``: position 0
        (the start token) becomes ``config.start_id`` (a no-op for ``start_token="zero"``)."""
        if offset == 0 and self.config.start_token == "distinct" and input_ids.shape[1]:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.config.start_id
        return input_ids

    def encode(self, spectrogram: Tensor, waveform: Optional[Tensor] = None,
               pitch: Optional[Tensor] = None, f0: Optional[Tensor] = None,
               features: Optional[Sequence[str]] = None,
               frame_lengths: Optional[Tensor] = None) -> Dict[str, Tuple[Tensor, Tensor]]:
        """{feature: (memory (B, T', d), zero mask (B, T'))} for the active features.

        The spectrogram is always needed, even when it is not in ``feature_order``: the zero
        tokens of every stream come from its log-mel energy (one hop rate for all). In
        training mode the spectrogram stream gets VTLP (``config.vtlp``) and SpecAugment
        (``config.spec_augment``)
        after the zero tokens are taken, so a mask never turns speech into zero tokens.
        """
        feats = list(features) if features is not None else self.active_features()
        if frame_lengths is None:  # every caller (training, decoding) sees the same lengths
            frame_lengths = frame_lengths_of(spectrogram)
        zero_mask = self.zero_mask(spectrogram, frame_lengths)
        if self.training and self.config.vtlp > 0:
            spectrogram = vtlp_warp(spectrogram, frame_lengths, self.config.vtlp)
        if self.training and self.config.spec_augment is not None:
            spectrogram = spec_augment(spectrogram, frame_lengths, *self.config.spec_augment)
        inputs = {"spectrogram": spectrogram, "waveform": waveform, "pitch": pitch}
        mask = downsample_mask(zero_mask, self.config.downsample)
        lengths = downsampled_lengths(frame_lengths, self.config.downsample)
        contour = f0 if (self.config.rotary and self.config.f0_rotary) else None
        out = {}
        for f in feats:
            x = inputs[f]
            if x is None:
                raise ValueError(f"feature {f!r} is in feature_order but was not given")
            mem = self.encoders[f](x, mask, contour, lengths, frame_lengths)
            if mem.shape[1] != mask.shape[1]:  # an internal invariant of the front-end
                raise RuntimeError(f"{f} encoder gave {mem.shape[1]} frames, mask has "
                                   f"{mask.shape[1]}")
            out[f] = (mem, mask)
        return out

    # decoder --------------------------------------------------------------------------
    def _key_f0(self, f0: Optional[Tensor]) -> Optional[Tensor]:
        return f0 if (self.config.cross_rotary and self.config.f0_rotary) else None

    def _embed(self, ids: Tensor, offset: int = 0) -> Tensor:
        x = self.embed(ids)
        if self.config.abs_pos:
            x = x + sinusoid(ids.shape[1], x.shape[-1], offset, device=x.device, dtype=x.dtype)
        return x

    def decode(self, input_ids: Tensor, memories: Dict[str, Tuple[Tensor, Tensor]],
               f0: Optional[Tensor] = None,
               cross_weights: Optional[Dict[str, list]] = None) -> Tensor:
        """Logits; ``cross_weights`` (a dict) receives ``{feature: [per cross layer
        (B, N, T') head-averaged attention]}``."""
        input_ids = self.decoder_ids(input_ids)
        x = self._embed(input_ids)
        text_zero = self.text_zero_mask(input_ids)
        for layer in self.self_layers:
            h = layer.norm(x)
            x = x + layer.drop(layer.attn(h, h, text_zero, causal=True))
            x = layer.ffn(x)
        kf0 = self._key_f0(f0)
        for f in self.config.feature_order:
            if f not in memories:
                continue  # curriculum: stage not enabled yet
            mem, mask = memories[f]
            stage = self.stages[f]
            y = x
            w = None
            if cross_weights is not None:
                w = cross_weights.setdefault(f, [])
            for layer in stage.layers:
                y = y + layer.drop(layer.attn(layer.norm(y), mem, mask, key_f0=kf0, weights=w))
                y = layer.ffn(y)
            x = stage.blend(x, y)
        return self.head(self.out_norm(x))

    def forward(self, spectrogram: Tensor, waveform: Optional[Tensor] = None,
                pitch: Optional[Tensor] = None, f0: Optional[Tensor] = None,
                input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                frame_lengths: Optional[Tensor] = None, **_ignored) -> Dict[str, Tensor]:
        """Logits ``(B, N, vocab)``; with ``labels`` (-100 ignored) also ``loss``:
        ``(1 - w) * ce_loss + w * ctc_loss`` with ``w = config.ctc_weight``.

        ``frame_lengths`` ``(B,)``: valid frames per utterance (default: inferred from the
        exact-zero padding). With a CTC head the output also has ``ctc_log_probs``
        ``(B, T', vocab)`` and ``ctc_lengths`` ``(B,)``. Extra batch keys (``text``, ``id``)
        are accepted and ignored, so ``model(**batch)`` works on a
        :func:`zeromask.data.collate` batch.
        """
        if input_ids is None:
            raise ValueError("input_ids are required (start token 0, then the text)")
        if frame_lengths is None:
            frame_lengths = frame_lengths_of(spectrogram)
        memories = self.encode(spectrogram, waveform, pitch, f0, frame_lengths=frame_lengths)
        logits = self.decode(input_ids, memories, f0)
        out = {"logits": logits}
        if self.config.ctc_weight > 0:
            out["ctc_log_probs"] = self.ctc_log_probs(memories)
            out["ctc_lengths"] = downsampled_lengths(frame_lengths, self.config.downsample)
        if labels is not None:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                 labels.reshape(-1), ignore_index=-100,
                                 label_smoothing=self.config.label_smoothing)
            out["ce_loss"] = ce
            out["loss"] = ce
            if self.config.ctc_weight > 0:
                targets, target_lengths = ctc_targets(labels)
                ctc = F.ctc_loss(out["ctc_log_probs"].transpose(0, 1), targets,
                                 out["ctc_lengths"], target_lengths, blank=0,
                                 reduction="mean", zero_infinity=True)
                out["ctc_loss"] = ctc
                w = self.config.ctc_weight
                out["loss"] = (1 - w) * ce + w * ctc
        return out

    def ctc_log_probs(self, memories: Dict[str, Tuple[Tensor, Tensor]]) -> Tensor:
        """(B, T', vocab) float32 CTC log-probabilities from ``config.ctc_input``: the sum of
        the encoder outputs, or one feature's encoder."""
        if self.config.ctc_weight <= 0:
            raise ValueError("this model has no CTC head (ctc_weight=0)")
        src = self.config.ctc_input
        if src == "sum":
            h = sum(mem for mem, _ in memories.values())
        elif src in memories:
            h = memories[src][0]
        else:
            raise ValueError(f"ctc_input {src!r} is not among the encoded features "
                             f"{list(memories)}")
        return F.log_softmax(self.ctc_head(self.ctc_norm(h)).float(), dim=-1)

    @torch.no_grad()
    def ctc_generate(self, spectrogram: Tensor, waveform: Optional[Tensor] = None,
                     pitch: Optional[Tensor] = None, f0: Optional[Tensor] = None,
                     frame_lengths: Optional[Tensor] = None, **_ignored) -> List[List[int]]:
        """Greedy (best-path) CTC token ids per utterance, from the encoder alone."""
        if frame_lengths is None:
            frame_lengths = frame_lengths_of(spectrogram)
        memories = self.encode(spectrogram, waveform, pitch, f0, frame_lengths=frame_lengths)
        lengths = downsampled_lengths(frame_lengths, self.config.downsample)
        return ctc_greedy(self.ctc_log_probs(memories), lengths)

    @torch.no_grad()
    def cross_attention_weights(self, spectrogram: Tensor, waveform: Optional[Tensor] = None,
                                pitch: Optional[Tensor] = None, f0: Optional[Tensor] = None,
                                input_ids: Optional[Tensor] = None,
                                **_ignored) -> Dict[str, List[Tensor]]:
        """{feature: [(B, N, T') attention of each cross layer]} for plots (text x frames)."""
        memories = self.encode(spectrogram, waveform, pitch, f0)
        out: Dict[str, List[Tensor]] = {}
        self.decode(input_ids, memories, f0, cross_weights=out)
        return out

    # greedy decoding ------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, spectrogram: Tensor, waveform: Optional[Tensor] = None,
                 pitch: Optional[Tensor] = None, f0: Optional[Tensor] = None,
                 max_len: Optional[int] = None, use_cache: bool = True,
                 **_ignored) -> List[List[int]]:
        """Greedy token ids per utterance, stopping when the model emits 0 (not included).

        ``use_cache=True`` keeps each self-attention layer's keys/values and each
        cross-attention layer's projected memory, so a step costs one token's worth of work;
        ``use_cache=False`` re-runs the full decoder each step (the check for the cache).
        """
        memories = self.encode(spectrogram, waveform, pitch, f0)
        return self._greedy(memories, f0, spectrogram.shape[0], max_len, use_cache)

    def _greedy(self, memories, f0, B: int, max_len: Optional[int],
                use_cache: bool = True, limits: Optional[Tensor] = None,
                unended: Optional[list] = None,
                ctc: Optional[Tuple["CTCPrefixScorer", float]] = None) -> List[List[int]]:
        """Greedy ids per row; ``limits`` (B,) caps each row's length (else ``max_len``);
        ``unended`` (a list) receives one bool per row: stopped by the cap, not by the end
        token. ``ctc = (scorer, w)``: joint decoding, each step's choice maximises
        ``(1 - w) log p_att + w`` the scorer's CTC prefix score (:meth:`_joint_greedy`)."""
        max_len = max_len or self.config.max_decode_len
        device = next(iter(memories.values()))[0].device
        ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cap = torch.full((B,), max_len, dtype=torch.long, device=device)
        if limits is not None:
            cap = torch.minimum(cap, limits.to(device).clamp_min(1))
        max_len = int(cap.max())
        if use_cache:
            step_fn = self._cached_stepper(memories, f0, B, device)
        for t in range(max_len):
            if use_cache:
                logits = step_fn(ids[:, -1:], t)
            else:
                logits = self.decode(ids, memories, f0)[:, -1]
            if ctc is not None:
                scorer, w = ctc
                logits = (1 - w) * F.log_softmax(logits.double(), dim=-1) + w * scorer.score()
            nxt = logits.argmax(-1).masked_fill(done, 0)
            if ctc is not None:
                scorer.advance(nxt, keep=nxt != 0)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= (nxt == 0) | (t + 1 >= cap)
            if bool(done.all()):
                break
        out = []
        for b, row in enumerate(ids[:, 1:].tolist()):
            row = row[: int(cap[b])]
            ended = 0 in row
            out.append(row[: row.index(0)] if ended else row)
            if unended is not None:
                unended.append(not ended)
        return out

    @torch.no_grad()
    def transcribe(self, spectrogram: Tensor, waveform: Optional[Tensor] = None,
                   pitch: Optional[Tensor] = None, f0: Optional[Tensor] = None,
                   frame_lengths: Optional[Tensor] = None, max_len: Optional[int] = None,
                   ctc_weight: Optional[float] = None,
                   tempo_factors: Optional[Sequence[float]] = None, beam: int = 1,
                   **_ignored) -> Dict[str, List[List[int]]]:
        """Token ids per utterance from every decoder, on one encoding of the batch:

        * ``"attention"``: the decoder's greedy output (:meth:`generate`), each at most as
          long as its encoder output (``"unended"``: one bool per utterance, True where that
          cap, or ``max_len``, stopped it before the end token);
        * ``"ctc"``: best-path CTC (:func:`ctc_greedy`), when the model has a CTC head;
        * ``"joint"``: one-pass joint CTC/attention greedy decoding (:meth:`_joint_greedy`):
          each step takes the id with the highest ``(1 - w) log p_att(c | g) + w (log psi(g +
          c) - log psi(g))``, the score of Kim, Hori and Watanabe (2017) with CTC prefix
          probabilities ``psi`` (:class:`CTCPrefixScorer`) and a beam of one; ``w =
          ctc_weight`` in ``[0, 1]``, default ``config.ctc_weight``; with ``beam > 1``,
          a beam search over the same score instead (:meth:`_joint_beam`: ``beam``
          hypotheses per utterance, about ``beam`` times the decoder's work).

        With ``tempo_factors`` (test-time tempo search, e.g. ``(0.65, 0.8, 1.0, 1.25,
        1.5)``): the features are resampled in time by each factor (:func:`resample_time`:
        linear for the spectrogram and waveform frames, nearest for pitch and F0), all three
        decoders run on each, and per utterance the outputs of the factor whose joint
        hypothesis has the highest CTC log-likelihood per token are kept (ties: the earlier
        factor); ``"tempo"`` gives the factor chosen per utterance. It costs one decoding
        per factor and undoes speaking rates outside the training range (README, shifted/).

        Raises:
            ValueError: ``ctc_weight`` outside ``[0, 1]``; ``tempo_factors`` empty, not
                positive finite numbers, or given to a model without a CTC head; ``beam``
                not an int >= 1, or > 1 for a model without a CTC head.
        """
        if ctc_weight is not None and not 0.0 <= float(ctc_weight) <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
        if frame_lengths is None:
            frame_lengths = frame_lengths_of(spectrogram)
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise ValueError(f"beam must be an int >= 1, got {beam!r}")
        if beam > 1 and self.config.ctc_weight <= 0:
            raise ValueError("beam > 1 searches the joint CTC/attention score and needs a "
                             "CTC head (ctc_weight > 0); this model has none")
        if tempo_factors is not None:
            return self._tempo_search(spectrogram, waveform, pitch, f0, frame_lengths,
                                      max_len, ctc_weight, tempo_factors, beam)
        return self._transcribe(spectrogram, waveform, pitch, f0, frame_lengths, max_len,
                                ctc_weight, beam)[0]

    def _tempo_search(self, spectrogram, waveform, pitch, f0, frame_lengths, max_len,
                      ctc_weight, factors, beam: int = 1) -> Dict[str, list]:
        factors = [factors] if isinstance(factors, (int, float)) else list(factors)
        if not factors or not all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0
                                  for r in factors):
            raise ValueError("tempo_factors must be a non-empty list of positive finite "
                             f"numbers, got {factors!r}")
        if self.config.ctc_weight <= 0:
            raise ValueError("tempo_factors needs a CTC head (ctc_weight > 0) to score "
                             "each tempo; this model has none")
        pad = 32  # the loaders' padding (oneDNN builds a convolution per new length)
        best: Dict[str, list] = {}
        best_score: List[float] = []
        for r in factors:
            if float(r) == 1.0:
                feats, lengths = (spectrogram, waveform, pitch, f0), frame_lengths
            else:  # (same lengths, factor and padding: every stream gets the same frames)
                spec, lengths = resample_time(spectrogram, frame_lengths, float(r),
                                              pad_multiple=pad)
                feats = (spec,) + tuple(None if x is None else resample_time(
                    x, frame_lengths, float(r), mode=mode, pad_multiple=pad)[0]
                    for x, mode in ((waveform, "linear"), (pitch, "nearest"),
                                    (f0, "nearest")))
            out, log_probs, out_lengths = self._transcribe(*feats, lengths, max_len,
                                                           ctc_weight, beam)
            score = ctc_token_log_likelihood(log_probs, out_lengths, out["joint"])
            out["tempo"] = [float(r)] * len(out["joint"])
            if not best:
                best, best_score = out, score.tolist()
                continue
            for i, sc in enumerate(score.tolist()):
                if sc > best_score[i]:
                    best_score[i] = sc
                    for key in best:
                        best[key][i] = out[key][i]
        return best

    def _transcribe(self, spectrogram, waveform, pitch, f0, frame_lengths, max_len,
                    ctc_weight, beam: int = 1):
        """(outputs, CTC log-probs or None, encoder lengths) of :meth:`transcribe`."""
        memories = self.encode(spectrogram, waveform, pitch, f0, frame_lengths=frame_lengths)
        B = spectrogram.shape[0]
        # no transcript is longer than the encoder has frames (CTC's own bound): a decoder
        # that never emits the end token stops there, and is reported as unended
        lengths = downsampled_lengths(frame_lengths, self.config.downsample)
        unended: List[bool] = []
        att = self._greedy(memories, f0, B, max_len, limits=lengths, unended=unended)
        out = {"attention": att, "unended": unended}
        if self.config.ctc_weight <= 0:
            return out, None, lengths
        w = self.config.ctc_weight if ctc_weight is None else float(ctc_weight)
        log_probs = self.ctc_log_probs(memories)
        ctc = ctc_greedy(log_probs, lengths)
        out["ctc"] = ctc
        if beam > 1:
            out["joint"] = self._joint_beam(memories, f0, log_probs, lengths, w, max_len, beam)
        else:
            out["joint"] = self._joint_greedy(memories, f0, log_probs, lengths, w, max_len)
        return out, log_probs, lengths

    def _joint_greedy(self, memories, f0, log_probs: Tensor, lengths: Tensor, w: float,
                      max_len: Optional[int]) -> List[List[int]]:
        """One-pass joint CTC/attention greedy decoding (one hypothesis per row): each step
        appends the id with the highest ``(1 - w) log p_att(c | g) + w (log psi(g + c) -
        log psi(g))`` over the whole vocabulary (:class:`CTCPrefixScorer`; for the end token
        the CTC term is ``log P_ctc(g | x) - log psi(g)``), Kim, Hori and Watanabe (2017)'s
        score with a beam of one. A row stops at the end token or at its cap."""
        ctc = (CTCPrefixScorer(log_probs, lengths), w) if w > 0 else None
        return self._greedy(memories, f0, log_probs.shape[0], max_len, limits=lengths, ctc=ctc)

    def _joint_beam(self, memories, f0, log_probs: Tensor, lengths: Tensor, w: float,
                    max_len: Optional[int], beam: int,
                    scores: Optional[list] = None) -> List[List[int]]:
        """Joint CTC/attention beam search: ``beam`` hypotheses per utterance (Watanabe et
        al. 2017, Algorithm 1 with the CTC prefix scores of Algorithm 2; ESPnet's joint
        decoding, no length bonus). A hypothesis scores the sum over its ids of ``(1 - w)
        log p_att(c | g) + w (log psi(g + c) - log psi(g))``, the score :meth:`_joint_greedy`
        maximises one step at a time; the end token (id 0) closes it, and then the CTC terms
        sum to ``log P_ctc(y | x)``. Each step keeps the ``beam`` best open extensions of the
        utterance's beams (over the whole vocabulary) and the best closed hypothesis seen.
        Every term is <= 0, so an utterance stops once its best closed hypothesis scores at
        least its best open one; at its cap (its encoder's length, or ``max_len``) the best
        closed one is kept, else the best open one; ``scores`` (a list) receives each
        output's summed score. (One beam is not :meth:`_joint_greedy`: that follows its one
        path to its own end token, this may return a hypothesis closed earlier.)"""
        B, K = log_probs.shape[0], int(beam)
        device = log_probs.device

        def rep(x):
            return None if x is None else x.repeat_interleave(K, dim=0)

        step = self._cached_stepper({f: (rep(m), rep(mask)) for f, (m, mask) in
                                     memories.items()}, rep(f0), B * K, device)
        scorer = CTCPrefixScorer(rep(log_probs), rep(lengths)) if w > 0 else None
        cap = torch.full((B,), max_len or self.config.max_decode_len, dtype=torch.long)
        cap = torch.minimum(cap, lengths.cpu().long().clamp_min(1))
        score = torch.full((B, K), -math.inf, dtype=torch.float64, device=device)
        score[:, 0] = 0.0  # one live beam at the start, not K copies of it
        prefix = torch.zeros(B * K, 0, dtype=torch.long, device=device)
        tok = torch.zeros(B * K, 1, dtype=torch.long, device=device)
        closed = torch.full((B,), -math.inf, dtype=torch.float64)
        best: List[Optional[List[int]]] = [None] * B
        done = torch.zeros(B, dtype=torch.bool)
        base = torch.arange(B, device=device)[:, None] * K
        for t in range(int(cap.max())):
            joint = (1 - w) * F.log_softmax(step(tok, t).double(), dim=-1)
            if scorer is not None:
                joint = joint + w * scorer.score()
            V = joint.shape[-1]
            cand = (score.reshape(-1, 1) + joint).view(B, K, V)
            c_best, c_k = cand[:, :, 0].max(1)
            c_best, c_k = c_best.cpu(), c_k.cpu()
            for b in ((c_best > closed) & ~done).nonzero().flatten().tolist():
                closed[b] = c_best[b]
                best[b] = prefix[b * K + int(c_k[b])].tolist()
            top, flat = cand[:, :, 1:].reshape(B, -1).topk(K, dim=1)
            origin, ids = flat // (V - 1), flat % (V - 1) + 1
            index = (base + origin).reshape(-1)
            finished = done | (t + 1 >= cap) | (closed >= top[:, 0].cpu())
            for b in (finished & ~done).nonzero().flatten().tolist():
                if best[b] is None:  # never closed within its cap: the best open one
                    best[b] = prefix[int(index[b * K])].tolist() + [int(ids[b, 0])]
                    closed[b] = top[b, 0]
            done = finished
            if bool(done.all()):
                break
            prefix = torch.cat([prefix.index_select(0, index), ids.reshape(-1, 1)], dim=1)
            score = top
            tok = ids.reshape(-1, 1)
            step.reorder(index)
            if scorer is not None:
                scorer.reorder(index)
                scorer.advance(ids.reshape(-1))
        if scores is not None:
            scores.extend(closed.tolist())
        return [list(h) for h in best]

    def _cached_stepper(self, memories, f0, B, device):
        kf0 = self._key_f0(f0)
        self_cache = []
        for layer in self.self_layers:
            a = layer.attn.attn
            empty = torch.zeros(B, a.num_kv_heads, 0, a.head_dim, device=device)
            self_cache.append([empty, empty.clone()])
        cross = {}
        for f in self.config.feature_order:
            if f in memories:
                mem, _ = memories[f]
                cross[f] = [layer.attn.attn.project_key_value(mem)
                            for layer in self.stages[f].layers]
        state = {"zero": torch.zeros(B, 0, dtype=torch.bool, device=device)}

        def step(tok: Tensor, t: int) -> Tensor:
            tok = self.decoder_ids(tok, t)
            x = self._embed(tok, t)
            state["zero"] = torch.cat([state["zero"], self.text_zero_mask(tok)], dim=1)
            for layer, cache in zip(self.self_layers, self_cache):
                h = layer.norm(x)
                k, v = layer.attn.attn.project_key_value(h)
                # the cache keeps keys rotated (text has a constant theta): each step
                # rotates its new key once and its query, not every cached key again
                k = layer.attn.attn.rotate_keys(k, key_pos=t)
                cache[0] = torch.cat([cache[0], k], dim=2)
                cache[1] = torch.cat([cache[1], v], dim=2)
                x = x + layer.attn.step(h, cache[0], cache[1], state["zero"], t,
                                        keys_rotated=True)
                x = layer.ffn(x)
            for f in self.config.feature_order:
                if f not in memories:
                    continue
                _, mask = memories[f]
                stage = self.stages[f]
                y = x
                for layer, (k, v) in zip(stage.layers, cross[f]):
                    y = y + layer.attn.step(layer.norm(y), k, v, mask, t, key_f0=kf0)
                    y = layer.ffn(y)
                x = stage.blend(x, y)
            return self.head(self.out_norm(x))[:, -1]

        def reorder(index: Tensor) -> None:
            """Row ``r`` takes row ``index[r]``'s self-attention cache (beam search; the
            cross-attention memories are per utterance, and ``index`` stays within one)."""
            for cache in self_cache:
                cache[0] = cache[0].index_select(0, index)
                cache[1] = cache[1].index_select(0, index)
            state["zero"] = state["zero"].index_select(0, index)

        step.reorder = reorder
        return step


__all__ = ["SpeechModel", "Attention", "FeatureEncoder", "FrontEnd", "CrossStage",
           "downsample_mask", "spec_augment", "vtlp_warp", "ctc_greedy", "ctc_targets",
           "CTCPrefixScorer", "downsampled_lengths", "frame_lengths_of", "resample_time",
           "ctc_token_log_likelihood"]
