"""nn.Modules: :class:`F0Rotary` and :class:`ZeroSoftAttention` (drop-in for MHA)."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .ops import (MIN_ZERO_SCALE, ZERO_MODES, _check_values, f0_rotary,
                  zero_soft_attention, zero_soft_attention_weights)

# the clamp of a learnable log zero scale: 1% above float32's smallest normal (exp rounds)
_LOG_MIN_ZERO_SCALE = math.log(MIN_ZERO_SCALE * 1.01)

Tensor = torch.Tensor

#: F0 (Hz) at which the echo mapping reaches t_max: theta = t_max at f0 = 300 Hz.
_ECHO_F0_REF = 300.0


def resample_contour(f0: Tensor, length: int) -> Tensor:
    """Resample an F0 contour ``(B, T)`` to ``(B, length)``; unvoiced (0/NaN) stays 0.

    Voiced values and the voicing mask are interpolated separately (linear, align_corners)
    so a voiced frame next to silence is not dragged toward 0 Hz; a resampled frame is
    voiced when more than half of what it interpolates is voiced.
    """
    if f0.shape[-1] == length:
        return torch.nan_to_num(f0, nan=0.0).clamp_min(0.0)
    voiced = torch.isfinite(f0) & (f0 > 0)
    values = torch.where(voiced, f0, torch.zeros_like(f0))
    stacked = torch.stack((values, voiced.to(f0.dtype)), dim=1)  # (B, 2, T)
    if f0.shape[-1] == 1:
        out = stacked.expand(-1, -1, length)
    else:
        out = F.interpolate(stacked, size=length, mode="linear", align_corners=True)
    weight = out[:, 1]
    mean = out[:, 0] / weight.clamp_min(1e-6)
    return torch.where(weight > 0.5, mean, torch.zeros_like(mean))


class F0Rotary(nn.Module):
    """F0 contour (Hz; 0 or NaN = unvoiced) -> per-position rotary theta (docs/design.md 3.2).

    ``mode="echo"``: ``theta = t_min + (t_max - t_min) * log1p(f0/700) / log1p(300/700)``
    with f0 clamped to ``[fmin, fmax]``; ``mode="additive"``: ``theta = theta_base + f0``.
    Unvoiced frames take ``theta_base``. ``t_min``, ``t_max`` and ``theta_base`` are
    learnable when ``learnable=True``. With no contour, :meth:`forward` returns the constant
    ``theta_base`` (standard RoPE with a learnable base). ``rotary_dim``, ``interleaved``
    and an optional learnable per-pair ``radius`` configure the rotation itself.
    """

    def __init__(self, mode: str = "echo", *, theta_base: float = 10000.0,
                 t_min: float = 800.0, t_max: float = 10000.0, fmin: float = 50.0,
                 fmax: float = 600.0, learnable: bool = True, rotary_dim: Optional[int] = None,
                 interleaved: bool = False, learnable_radius: bool = False):
        super().__init__()
        if mode not in ("echo", "additive"):
            raise ValueError(f"mode must be 'echo' or 'additive', got {mode!r}")
        if not (1.0 < t_min < t_max) or theta_base <= 1.0:
            raise ValueError("need 1 < t_min < t_max and theta_base > 1")
        if not 0 < fmin < fmax:
            raise ValueError("need 0 < fmin < fmax")
        if learnable_radius and rotary_dim is None:
            raise ValueError("learnable_radius needs rotary_dim (the radius has rotary_dim/2 "
                             "entries)")
        self.mode, self.fmin, self.fmax = mode, float(fmin), float(fmax)
        self.rotary_dim, self.interleaved = rotary_dim, interleaved

        def value(x):
            t = torch.tensor(float(x))
            return nn.Parameter(t) if learnable else t

        for name, x in (("theta_base", theta_base), ("t_min", t_min), ("t_max", t_max)):
            v = value(x)
            if isinstance(v, nn.Parameter):
                self.register_parameter(name, v)
            else:
                self.register_buffer(name, v)
        self.radius = nn.Parameter(torch.ones(rotary_dim // 2)) if learnable_radius else None

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, fmin={self.fmin}, fmax={self.fmax}, "
                f"rotary_dim={self.rotary_dim}, interleaved={self.interleaved}")

    def forward(self, f0: Optional[Tensor] = None, length: Optional[int] = None,
                batch: int = 1) -> Tensor:
        """theta ``(B, length)``; ``f0`` is ``(B, T)`` or ``(T,)``, resampled to length."""
        if f0 is None:
            if length is None:
                raise ValueError("F0Rotary needs an f0 contour or a length")
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise ValueError(f"length must be an int >= 0, got {length!r}")
            base = self.theta_base.clamp_min(1.0 + 1e-3)
            return base.expand(batch, length)
        if not torch.is_tensor(f0) or not f0.is_floating_point():
            raise TypeError("f0 must be a floating tensor in Hz (0 or NaN = unvoiced)")
        if f0.dim() == 1:
            f0 = f0.unsqueeze(0)
        if f0.dim() != 2:
            raise ValueError(f"f0 must be (B, T) or (T,), got shape {tuple(f0.shape)}")
        if _check_values(f0) and bool(torch.isinf(f0).any()):
            raise ValueError("f0 contains inf; use 0 or NaN for unvoiced frames")
        n = length if length is not None else f0.shape[-1]
        if n == 0:
            return torch.empty(f0.shape[0], 0, device=f0.device)
        if f0.shape[-1] == 0:
            raise ValueError(f"f0 is an empty contour (shape {tuple(f0.shape)}) but {n} "
                             "positions were asked for: pass at least one frame, or no f0 "
                             "for the constant theta_base")
        f0 = resample_contour(f0.float(), n)
        voiced = f0 > 0
        if self.mode == "echo":
            f = f0.clamp(self.fmin, self.fmax)
            frac = torch.log1p(f / 700.0) / math.log1p(_ECHO_F0_REF / 700.0)
            theta = self.t_min + (self.t_max - self.t_min) * frac
        else:
            theta = self.theta_base + f0
        theta = torch.where(voiced, theta, self.theta_base.expand_as(theta))
        return theta.clamp_min(1.0 + 1e-3)


class ZeroSoftAttention(nn.Module):
    """Drop-in replacement for ``nn.MultiheadAttention`` with zero-soft keys and f0 rotary.

    Same constructor arguments that matter (``embed_dim, num_heads, dropout=0, bias, kdim,
    vdim, batch_first``) and the same parameters and ``state_dict`` keys (with
    ``num_kv_heads == num_heads``), so ``from_module(mha)`` and ``load_state_dict`` work
    both ways. In ``forward``, ``key_padding_mask`` marks *zero tokens*: True keys are
    scaled by ``zero_scale`` (softly) rather than removed with -inf. Extras: ``num_kv_heads``
    (GQA), ``zero_scale``, ``learnable_zero_scale``, ``zero_mode`` ("prob", "score" or "hard"),
    ``rotary`` (an :class:`F0Rotary` or None) and ``backend``.

    Differences from MHA: ``need_weights`` defaults to False (weights need the L x L matrix
    the kernels avoid); ``attn_mask``, bool (True = not allowed) or float (added to the
    logits), ``(Lq, Lk)`` or ``(B * num_heads, Lq, Lk)`` as in MHA: the causal pattern (query
    i sees keys ``j <= i + Lk - Lq``) runs on the kernels in O(L) memory, any other pattern
    through :mod:`zeromask.reference` (Lq x Lk, as MHA itself); a query row whose every key is
    masked returns 0, not NaN; ``dropout``, ``add_bias_kv`` and ``add_zero_attn`` are not
    supported.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None,
                 batch_first: bool = False, device=None, dtype=None, *,
                 num_kv_heads: Optional[int] = None, zero_scale: float = 1e-6,
                 learnable_zero_scale: bool = False, zero_mode: str = "prob",
                 rotary: Optional[F0Rotary] = None, backend: Optional[str] = None):
        super().__init__()
        if dropout:
            raise ValueError("ZeroSoftAttention has no attention dropout (dropout must be 0); "
                             "apply dropout to its output instead")
        if add_bias_kv or add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads), ("kdim", kdim), ("vdim", vdim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if zero_mode not in ZERO_MODES:
            raise ValueError(f"zero_mode must be one of {ZERO_MODES}, got {zero_mode!r}")
        if not MIN_ZERO_SCALE <= zero_scale <= 1.0:
            raise ValueError(f"zero_scale must be in [{MIN_ZERO_SCALE:.4g}, 1] (float32's "
                             f"smallest normal number up to 1), got {zero_scale}")
        if rotary is not None and not isinstance(rotary, F0Rotary):
            raise TypeError("rotary must be a zeromask.F0Rotary or None")
        fk = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.head_dim = embed_dim // num_heads
        self.batch_first, self.dropout = batch_first, 0.0
        self.zero_mode, self.backend, self.rotary = zero_mode, backend, rotary
        kv_dim = num_kv_heads * self.head_dim
        self._qkv_same_embed_dim = (self.kdim == embed_dim and self.vdim == embed_dim
                                    and kv_dim == embed_dim)
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **fk))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **fk))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **fk))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        log_s = torch.tensor(math.log(zero_scale), device=device)
        if learnable_zero_scale:
            self.zero_scale_log = nn.Parameter(log_s)
        else:
            self.register_buffer("zero_scale_log", log_s, persistent=False)
        self.learnable_zero_scale = learnable_zero_scale
        # nn.TransformerEncoderLayer's inference fast path reads an attention module's
        # weights and runs plain MHA itself, bypassing this module (and so the zero tokens):
        # it is skipped whenever a submodule has a hook, so this one has a no-op hook
        self.register_forward_pre_hook(_no_fast_path, with_kwargs=True)
        self._reset_parameters()

    def _reset_parameters(self) -> None:  # as nn.MultiheadAttention
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight,
                  self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    @property
    def zero_scale(self) -> Tensor:
        """The current scale s in (0, 1] (``exp`` of a log parameter clamped to
        [ln(1.01 * MIN_ZERO_SCALE), 0]: s stays a normal float32)."""
        # a learned log can drift below float32's range: keep s a normal float32
        return self.zero_scale_log.clamp(min=_LOG_MIN_ZERO_SCALE, max=0.0).exp()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # an nn.MultiheadAttention state_dict has no zero_scale_log: keep ours.
        key = prefix + "zero_scale_log"
        if self.learnable_zero_scale and key not in state_dict:
            state_dict = dict(state_dict)
            state_dict[key] = self.zero_scale_log.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, **kwargs) -> "ZeroSoftAttention":
        """A ZeroSoftAttention with ``mha``'s configuration and a copy of its weights."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_module expects nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn modules cannot be converted")
        if mha.dropout:
            raise ValueError(f"the module has attention dropout {mha.dropout}; "
                             "ZeroSoftAttention has none (set mha.dropout = 0.0 to convert)")
        if kwargs.get("num_kv_heads") not in (None, mha.num_heads):
            raise ValueError(f"from_module copies the module's {mha.num_heads} key/value heads: "
                             f"num_kv_heads={kwargs['num_kv_heads']} has no weights to copy "
                             "(build ZeroSoftAttention(..., num_kv_heads=...) and train it)")
        p = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None,
                  kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device=p.device,
                  dtype=p.dtype, **kwargs)
        new.load_state_dict(mha.state_dict(), strict=True)
        return new

    def _projections(self) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor],
                                    Optional[Tensor]]:
        """(wq, wk, wv, bq, bk, bv) of the input projections (biases None without bias)."""
        if self._qkv_same_embed_dim:
            E = self.embed_dim
            w = self.in_proj_weight
            wq, wk, wv = w[:E], w[E:2 * E], w[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is None:
            return wq, wk, wv, None, None, None
        kv = self.num_kv_heads * self.head_dim
        return (wq, wk, wv) + tuple(self.in_proj_bias.split([self.embed_dim, kv, kv]))

    # the pieces of forward, public for KV-cache decoding -------------------------------
    # (inputs and outputs (B, L, E) in this module's layout: (L, B, E) unless batch_first;
    # the heads are always (B, heads, L, head_dim))
    def _as_batch_first(self, name: str, x, dim: int) -> Tensor:
        """``x`` ``(B, L, dim)`` (batch_first) or ``(L, B, dim)``, checked, as ``(B, L, dim)``."""
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] != dim:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            layout = "(B, L, {})" if self.batch_first else "(L, B, {})"
            raise ValueError(f"{name} must be {layout.format(dim)} (this module has "
                             f"batch_first={self.batch_first}), got {got}")
        return x if self.batch_first else x.transpose(0, 1)

    def _query_heads(self, query: Tensor) -> Tensor:
        wq, _, _, bq, _, _ = self._projections()
        B, L, _ = query.shape
        return F.linear(query, wq, bq).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def _key_value_heads(self, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
        _, wk, wv, _, bk, bv = self._projections()
        B, L = key.shape[:2]
        shape = (B, L, self.num_kv_heads, self.head_dim)
        k = F.linear(key, wk, bk).view(shape).transpose(1, 2)
        v = F.linear(value, wv, bv).view(value.shape[0], value.shape[1], self.num_kv_heads,
                                         self.head_dim).transpose(1, 2)
        return k, v

    def _merge_heads(self, heads: Tensor) -> Tensor:
        B, H, L, D = heads.shape
        return self.out_proj(heads.transpose(1, 2).reshape(B, L, H * D))

    def project_query(self, query: Tensor) -> Tensor:
        """Query heads ``(B, num_heads, Lq, head_dim)`` from a query ``(B, Lq, embed_dim)``
        (``(Lq, B, embed_dim)`` unless ``batch_first``): the input projection only; the
        rotary is applied in :meth:`attend`. Raises ValueError for another shape."""
        return self._query_heads(self._as_batch_first("query", query, self.embed_dim))

    def project_key_value(self, key: Tensor, value: Optional[Tensor] = None
                          ) -> Tuple[Tensor, Tensor]:
        """Key and value heads, each ``(B, num_kv_heads, Lk, head_dim)``, from keys ``(B, Lk,
        kdim)`` and values ``(B, Lk, vdim)`` (``(Lk, B, .)`` unless ``batch_first``; ``value``
        defaults to ``key``). They are not rotated: a KV cache keeps them as they are (the
        kernel rotates them at every step) or rotates each once with :meth:`rotate_keys`;
        either way it grows along dim 2. Raises ValueError for other shapes."""
        k = self._as_batch_first("key", key, self.kdim)
        v = k if value is None else self._as_batch_first("value", value, self.vdim)
        if v.shape[:2] != k.shape[:2]:
            raise ValueError(f"key and value must share (B, Lk), got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        return self._key_value_heads(k, v)

    def project_output(self, heads: Tensor) -> Tensor:
        """``(B, num_heads, Lq, head_dim)`` attention heads -> ``(B, Lq, embed_dim)``
        (``(Lq, B, embed_dim)`` unless ``batch_first``) through ``out_proj``. Raises
        ValueError for other heads."""
        if not torch.is_tensor(heads) or heads.dim() != 4 or heads.shape[1] != self.num_heads \
                or heads.shape[-1] != self.head_dim:
            got = tuple(heads.shape) if torch.is_tensor(heads) else type(heads).__name__
            raise ValueError(f"heads must be (B, {self.num_heads}, L, {self.head_dim}), the "
                             f"query heads of this module, got {got}")
        out = self._merge_heads(heads)
        return out if self.batch_first else out.transpose(0, 1)

    def _key_padding(self, mask: Optional[Tensor], B: int, Lk: int) -> Optional[Tensor]:
        """``key_padding_mask`` as bool ``(B, Lk)`` (True = zero token): bool, or MHA's float
        form (-inf = zero token, 0 = attend); TypeError / ValueError naming it otherwise."""
        if mask is None:
            return None
        if not torch.is_tensor(mask):
            raise TypeError(f"key_padding_mask must be a tensor, got {type(mask).__name__}")
        if mask.is_floating_point():
            # MHA's float form: -inf = padding, 0 = attend; other values are additive
            # biases, which zero-soft attention has no way to apply
            pad = torch.isneginf(mask)
            if bool((mask[~pad] != 0).any()):
                raise ValueError("key_padding_mask: a float mask may hold only 0 "
                                 "(attend) and -inf (zero token); other additive "
                                 "biases are not supported")
            mask = pad
        if mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be bool (True = zero token) or float "
                            f"(0 / -inf), got {mask.dtype}")
        if tuple(mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must be (B, Lk) = ({B}, {Lk}), got "
                             f"{tuple(mask.shape)}")
        return mask

    def _theta(self, name: str, f0: Optional[Tensor], L: int, B: int) -> Tensor:
        """The rotary's theta ``(B, L)`` for ``L`` positions from contour ``f0`` (resampled to
        ``L``; None: the constant base); ValueError naming ``name`` for a contour of another
        batch."""
        if torch.is_tensor(f0) and f0.dim() == 2 and f0.shape[0] not in (1, B):
            raise ValueError(f"{name} must be (B, T) with B = {B} (or (T,)), got "
                             f"{tuple(f0.shape)}")
        return self.rotary(f0, L, B)

    @staticmethod
    def _check_position(name: str, pos) -> None:
        if pos is None or torch.is_tensor(pos) or (
                isinstance(pos, numbers.Integral) and not isinstance(pos, bool)):
            return
        raise TypeError(f"{name} must be None, an int offset (a decoding step: its position) "
                        f"or an (L,) / (B, L) tensor, got {type(pos).__name__}")

    def attention_kwargs(self, B: int, Lq: int, Lk: int, *,
                         key_padding_mask: Optional[Tensor] = None, is_causal: bool = False,
                         f0: Optional[Tensor] = None, query_f0: Optional[Tensor] = None,
                         key_f0: Optional[Tensor] = None, query_pos=None, key_pos=None,
                         seqlens_k: Optional[Tensor] = None, keys_rotated: bool = False
                         ) -> dict:
        """The keyword arguments of :func:`zeromask.zero_soft_attention` this module passes
        for ``B`` sequences of ``Lq`` queries and ``Lk`` keys: zero tokens, scale and mode,
        causal flag, ``seqlens_k`` and, with a rotary, each side's theta (from ``query_f0`` /
        ``key_f0``, else ``f0``, else the constant base), positions, rotary dim, layout and
        radius. ``keys_rotated=True`` (keys from :meth:`rotate_keys`) leaves out the keys'
        theta and positions, so only the queries are rotated."""
        kw = dict(key_zero=self._key_padding(key_padding_mask, B, Lk),
                  zero_scale=self.zero_scale, zero_mode=self.zero_mode,
                  causal=bool(is_causal), seqlens_k=seqlens_k)
        if self.rotary is not None:
            self._check_position("query_pos", query_pos)
            qf, qname = (query_f0, "query_f0") if query_f0 is not None else (f0, "f0")
            kw.update(theta_q=self._theta(qname, qf, Lq, B), pos_q=query_pos,
                      rotary_dim=self.rotary.rotary_dim, interleaved=self.rotary.interleaved,
                      radius=self.rotary.radius)
            if not keys_rotated:
                self._check_position("key_pos", key_pos)
                kf, kname = (key_f0, "key_f0") if key_f0 is not None else (f0, "f0")
                kw.update(theta_k=self._theta(kname, kf, Lk, B), pos_k=key_pos)
        return kw

    def rotate_keys(self, k: Tensor, *, f0: Optional[Tensor] = None,
                    key_f0: Optional[Tensor] = None, key_pos=None) -> Tensor:
        """Key heads rotated by this module's rotary, once, for a KV cache that keeps them
        rotated (the usual RoPE cache: a decoding step then rotates only its query, instead
        of every cached key again; pass ``keys_rotated=True`` to :meth:`attend`).

        Args:
            k: ``(B, num_kv_heads, Lk, head_dim)`` from :meth:`project_key_value`.
            f0, key_f0: the contour of these ``Lk`` keys (Hz), resampled to ``Lk`` as in
                :meth:`forward`; None for the rotary's constant base. For one appended key
                pass its own frame (``zeromask.resample_contour(f0, T)[:, t:t + 1]`` for
                position ``t`` of ``T``): a whole contour would be resampled to one value.
            key_pos: their positions: None (``0 .. Lk-1``), an int offset (a decoding step
                at position ``t`` appends its key with ``key_pos=t``), ``(Lk,)`` or ``(B, Lk)``.

        Returns ``k`` unchanged without a rotary, else rotated keys of ``k``'s shape and
        dtype, equal to what :meth:`attend` would do to them. Differentiable.
        """
        if not torch.is_tensor(k) or k.dim() != 4 or k.shape[1] != self.num_kv_heads \
                or k.shape[-1] != self.head_dim:
            got = tuple(k.shape) if torch.is_tensor(k) else type(k).__name__
            raise ValueError(f"k must be (B, {self.num_kv_heads}, L, {self.head_dim}) heads "
                             f"of this module, got {got}")
        if not k.is_floating_point():
            raise TypeError(f"k must be a floating tensor, got {k.dtype}")
        if self.rotary is None:
            return k
        self._check_position("key_pos", key_pos)
        kf, kname = (key_f0, "key_f0") if key_f0 is not None else (f0, "f0")
        theta = self._theta(kname, kf, k.shape[2], k.shape[0])
        return f0_rotary(k, theta, positions=key_pos, rotary_dim=self.rotary.rotary_dim,
                         interleaved=self.rotary.interleaved, radius=self.rotary.radius,
                         backend=self.backend)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *,
               key_padding_mask: Optional[Tensor] = None, is_causal: bool = False,
               f0: Optional[Tensor] = None, query_f0: Optional[Tensor] = None,
               key_f0: Optional[Tensor] = None, query_pos=None, key_pos=None,
               seqlens_k: Optional[Tensor] = None, keys_rotated: bool = False) -> Tensor:
        """Zero-soft attention of projected heads, through ``out_proj``: ``(B, Lq,
        embed_dim)`` (``(Lq, B, embed_dim)`` unless ``batch_first``).

        Args:
            q: ``(B, num_heads, Lq, head_dim)`` from :meth:`project_query`.
            k, v: ``(B, num_kv_heads, Lk, head_dim)`` from :meth:`project_key_value` (a KV
                cache: the projections of every key so far; keys unrotated, or rotated once
                by :meth:`rotate_keys` with ``keys_rotated=True``).
            key_padding_mask: bool ``(B, Lk)``, True = zero token.
            is_causal: query ``i`` sees keys ``j <= i + Lk - Lq`` (a one-token step against a
                cache needs no mask: its query is the last position).
            f0, query_f0, key_f0, query_pos, key_pos: as in :meth:`forward`; each contour is
                resampled to the positions of its side (``Lq`` queries, ``Lk`` keys), so a
                decoding step at position ``t`` passes ``query_pos=t`` and the query's own
                frame, ``zeromask.resample_contour(f0, T)[:, t:t + 1]``, not the whole
                contour.
            seqlens_k: int ``(B,)`` hard key lengths (slots past them are never read).
            keys_rotated: True when ``k`` comes from :meth:`rotate_keys` (a cache of
                rotated keys): only ``q`` is rotated, ``key_f0``/``key_pos`` are unused.

        Equals ``forward`` on the unprojected inputs (``forward`` is built from these
        methods). Raises ValueError when the heads do not match the module.
        """
        for name, t, heads in (("q", q, self.num_heads), ("k", k, self.num_kv_heads),
                               ("v", v, self.num_kv_heads)):
            if not torch.is_tensor(t) or t.dim() != 4 or t.shape[1] != heads \
                    or t.shape[-1] != self.head_dim:
                got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"{name} must be (B, {heads}, L, {self.head_dim}) heads of "
                                 f"this module, got {got}")
        kw = self.attention_kwargs(q.shape[0], q.shape[2], k.shape[2],
                                   key_padding_mask=key_padding_mask, is_causal=is_causal,
                                   f0=f0, query_f0=query_f0, key_f0=key_f0,
                                   query_pos=query_pos, key_pos=key_pos, seqlens_k=seqlens_k,
                                   keys_rotated=keys_rotated)
        return self.project_output(zero_soft_attention(q, k, v, backend=self.backend, **kw))

    def _read_attn_mask(self, attn_mask: Optional[Tensor], is_causal: bool, B: int, lq: int,
                        lk: int) -> Tuple[bool, Optional[Tensor]]:
        """``(causal, bias)`` from MHA's ``attn_mask`` / ``is_causal``.

        No mask: ``is_causal``. The kernels' causal mask (query i sees keys ``j <= i + Lk -
        Lq``; MHA's causal mask when ``Lq == Lk``), bool or float: the kernels' causal flag,
        O(L). Any other mask, with or without the ``is_causal`` hint (MHA applies the mask as
        given): an additive ``(1 or B, 1 or H, Lq, Lk)`` float bias (bool True = not
        allowed -> -inf), computed by the reference (it materialises Lq x Lk, as MHA does).
        """
        if attn_mask is None:
            return bool(is_causal), None
        if not torch.is_tensor(attn_mask):
            raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
        H = self.num_heads
        shapes = ((lq, lk), (B * H, lq, lk))
        if tuple(attn_mask.shape) not in shapes:
            raise ValueError(f"attn_mask must have shape (Lq, Lk) = ({lq}, {lk}) or "
                             f"(B * num_heads, Lq, Lk) = ({B * H}, {lq}, {lk}), got "
                             f"{tuple(attn_mask.shape)}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = not allowed) or float (added to "
                            f"the logits), got {attn_mask.dtype}")
        if attn_mask.dim() == 2:
            want = reference.hard_mask(1, lq, lk, True, None, attn_mask.device)[0, 0]
            got = attn_mask if attn_mask.dtype == torch.bool else torch.isneginf(attn_mask)
            finite_ok = attn_mask.dtype == torch.bool or bool((attn_mask[~got] == 0).all())
            if finite_ok and torch.equal(got, want):
                return True, None
        # (B * H, Lq, Lk) -> (B, H, Lq, Lk); (Lq, Lk) -> (1, 1, Lq, Lk)
        bias = attn_mask.view(B, H, lq, lk) if attn_mask.dim() == 3 else attn_mask[None, None]
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, device=bias.device).masked_fill(bias, float("-inf"))
        return False, bias

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, f0: Optional[Tensor] = None,
                query_f0: Optional[Tensor] = None, key_f0: Optional[Tensor] = None,
                query_pos=None, key_pos=None,
                seqlens_k: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """As ``nn.MultiheadAttention.forward``; returns ``(output, weights or None)``.

        ``key_padding_mask`` (bool ``(B, Lk)``): True = zero token (soft-scaled, not
        removed). With a ``rotary``: ``f0`` is the contour for self-attention (both sides);
        ``query_f0``/``key_f0`` set each side separately (cross-attention); a side with no
        contour uses the constant ``theta_base``. ``seqlens_k`` hard-masks keys by length.
        """
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not torch.is_tensor(t):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) whatever batch_first says, as in MHA: one sequence
            if key.dim() != 2 or value.dim() != 2:
                raise ValueError("an unbatched (L, E) query needs unbatched key and value")
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError("query, key and value must be 3-D (batched) or 2-D (unbatched)")
        if self.batch_first and not unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # now (L, B, E), as MHA's internal layout
        Lq, B, E = query.shape
        Lk = key.shape[0]
        if E != self.embed_dim:
            raise ValueError(f"query has embed dim {E}, expected {self.embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must share (L, B), got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        causal, bias = self._read_attn_mask(attn_mask, is_causal, B, Lq, Lk)
        # batch-first views from here on
        q = self._query_heads(query.transpose(0, 1))                # (B, Hq, Lq, Dh)
        k, v = self._key_value_heads(key.transpose(0, 1), value.transpose(0, 1))
        kw = self.attention_kwargs(B, Lq, Lk, key_padding_mask=key_padding_mask,
                                   is_causal=causal, f0=f0, query_f0=query_f0, key_f0=key_f0,
                                   query_pos=query_pos, key_pos=key_pos, seqlens_k=seqlens_k)
        if bias is None:
            out = zero_soft_attention(q, k, v, backend=self.backend, **kw)  # (B, Hq, Lq, Dh)
        else:  # an arbitrary mask: the spec reads it (the kernels have no L x L input)
            out = reference.zero_soft_attention(q, k, v, attn_bias=bias, **kw)
        out = self._merge_heads(out)                                # (B, Lq, E)
        weights = None
        if need_weights:
            weights = (zero_soft_attention_weights(q, k, **kw) if bias is None else
                       reference.zero_soft_attention_weights(q, k, attn_bias=bias, **kw))
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1).contiguous()                  # (Lq, B, E), as MHA
        return out, weights


def _no_fast_path(module, args, kwargs):
    """A no-op forward pre-hook (see :class:`ZeroSoftAttention`'s constructor)."""
    return None


def swap_attention(model: nn.Module, *, drop_attention_dropout: bool = False,
                   **options) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by a :class:`ZeroSoftAttention`
    with its configuration and a copy of its weights (:meth:`ZeroSoftAttention.from_module`).

    ``options`` go to every new module (``zero_scale``, ``learnable_zero_scale``,
    ``zero_mode``, ``rotary``, ``backend``; a ``rotary`` module instance is shared). Works
    inside ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` and
    ``nn.Transformer``, whose calls (``key_padding_mask``, the causal ``attn_mask``,
    ``need_weights=False``) the module takes. ``ZeroSoftAttention`` has no attention
    dropout: a module with some raises ``ValueError`` unless ``drop_attention_dropout=True``,
    which drops it and says so in the report.

    Returns ``model`` itself (changed in place), with ``model.zeromask_report``: one line per
    replaced module (its name, dims, heads, layout), also logged at INFO (logger
    ``zeromask``). Raises ``ValueError`` when there is nothing to replace.
    """
    import logging
    report = []
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.MultiheadAttention)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.MultiheadAttention to replace")
    for name, mha in targets:
        note = ""
        if mha.dropout:
            if not drop_attention_dropout:
                raise ValueError(f"{name}: attention dropout {mha.dropout}; ZeroSoftAttention "
                                 "has none: pass drop_attention_dropout=True to drop it")
            note = f", attention dropout {mha.dropout} dropped"
            mha.dropout = 0.0
        new = ZeroSoftAttention.from_module(mha, **options)
        parent = model
        *path, leaf = name.split(".")
        for part in path:
            parent = getattr(parent, part)
        setattr(parent, leaf, new)
        report.append(f"{name}: nn.MultiheadAttention({mha.embed_dim}, {mha.num_heads}, "
                      f"batch_first={mha.batch_first}) -> ZeroSoftAttention{note}")
    model.zeromask_report = report
    log = logging.getLogger("zeromask")
    for line in report:
        log.info("zeromask: swapped %s", line)
    return model


__all__ = ["F0Rotary", "ZeroSoftAttention", "resample_contour", "swap_attention"]
