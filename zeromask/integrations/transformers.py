"""Hugging Face transformers: ``attn_implementation="zeromask"`` runs every attention of a
model on the zeromask kernels.

    import zeromask.integrations.transformers as zt     # registers "zeromask"
    model = WhisperForConditionalGeneration.from_pretrained(path, attn_implementation="zeromask")
    # or, on a model already built: model.set_attn_implementation("zeromask")
    with zt.zero_tokens(silent_frames):                  # (B, T_enc) bool, optional
        out = model(input_features, decoder_input_ids=ids)

What the integration maps (transformers' ``AttentionInterface`` and ``AttentionMaskInterface``,
so no model code changes):

* **causal masks**: the module's ``is_causal`` (or the call's ``is_causal``) becomes the
  kernel's causal flag, aligned bottom-right as transformers' KV-cache decoding needs (the last
  query sits at the last key);
* **padding masks**: the mask function returns the 2-D ``(B, kv_len)`` padding mask (never an
  L x L tensor, as for flash-attention), and the attention turns it into the kernel's
  ``seqlens_k`` (keys past a row's length are never read). Only padding at the end of a row
  maps to lengths: a left-padded or holed mask raises ``ValueError`` (pad on the right, e.g.
  ``tokenizer.padding_side = "right"``), as do mask patterns other than causal and
  bidirectional (sliding windows, packed sequences) and user-built 4-D masks;
* **zero tokens** (opt-in, :func:`zero_tokens`): inside the block, every attention whose keys
  are the audio frames (the non-causal ones: encoder self-attention and decoder
  cross-attention) scales the given frames' attention by ``zero_scale`` (zero-soft attention,
  docs/design.md 3.3); causal (text) self-attention is left as it is;
* ``scaling`` becomes ``sm_scale``; GQA key/value heads pass through unrepeated.

Refused with a clear error rather than approximated: attention dropout > 0 while training
(set the config's ``attention_dropout`` to 0: the kernels have no dropout), ``softcap``,
attention sinks, position biases. ``output_attentions=True`` returns ``None`` weights with a
warning, as transformers' ``sdpa`` does.

``transformers`` is an optional dependency (``pip install zeromask[hf]``); importing this
module without it raises an ``ImportError`` that says so.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from typing import Optional, Union

import torch

from ..ops import zero_soft_attention

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,
                                            causal_mask_function, prepare_padding_mask)
except ImportError as exc:  # pragma: no cover - exercised by the packaging test
    raise ImportError("zeromask.integrations.transformers needs the transformers package: "
                      "pip install 'zeromask[hf]' (or pip install transformers)") from exc

Tensor = torch.Tensor

#: the name to pass as ``attn_implementation``
NAME = "zeromask"


@dataclasses.dataclass(frozen=True)
class ZeroTokens:
    """Zero tokens for the attentions over audio frames: ``key_zero`` ``(B, T)`` bool at the
    encoder's output rate, ``zero_scale`` s in (0, 1] (float or 0-dim tensor, may require
    grad), ``zero_mode`` "prob", "score" or "hard" (see :func:`zeromask.zero_soft_attention`)."""
    key_zero: Tensor
    zero_scale: Union[float, Tensor] = 1e-6
    zero_mode: str = "prob"


_ZERO_TOKENS: contextvars.ContextVar[Optional[ZeroTokens]] = contextvars.ContextVar(
    "zeromask_zero_tokens", default=None)


@contextlib.contextmanager
def zero_tokens(key_zero: Tensor, zero_scale: Union[float, Tensor] = 1e-6,
                zero_mode: str = "prob"):
    """Inside the block, the attentions over audio frames (encoder self-attention, decoder
    cross-attention: the modules whose ``is_causal`` is False) treat ``key_zero`` ``(B, T)``
    (True = a zero token: silence, padding) as zero tokens scaled by ``zero_scale``.

    ``T`` must be the number of keys those attentions see (Whisper: the encoder's output
    frames, half the log-mel frames); a call whose keys differ raises ``ValueError``.
    """
    if not torch.is_tensor(key_zero) or key_zero.dim() != 2:
        raise ValueError(f"zero_tokens: key_zero must be a (B, T) tensor, got "
                         f"{getattr(key_zero, 'shape', type(key_zero).__name__)}")
    token = _ZERO_TOKENS.set(ZeroTokens(key_zero.bool(), zero_scale, zero_mode))
    try:
        yield
    finally:
        _ZERO_TOKENS.reset(token)


def _seqlens_from_padding(mask: Tensor, batch: int, kv_length: int) -> Optional[Tensor]:
    """(B,) key lengths from a 2-D keep-mask (True/1 = a real key); None when nothing is
    masked. Raises unless each row is a run of real keys followed by padding."""
    if mask.dim() != 2 or mask.shape != (batch, kv_length):
        raise ValueError(f"zeromask attention: expected a (batch, kv_len) = ({batch}, "
                         f"{kv_length}) padding mask, got shape {tuple(mask.shape)}; 4-D masks "
                         "(arbitrary patterns) are not supported by the kernels, use "
                         "attn_implementation='sdpa' for them")
    keep = mask.bool()
    n = keep.sum(-1)
    if bool((n == kv_length).all()):
        return None
    prefix = torch.arange(kv_length, device=keep.device)[None, :] < n[:, None]
    if not torch.equal(keep, prefix):
        raise ValueError("zeromask attention: the padding mask has masked keys before real "
                         "ones (left padding or holes); the kernels mask only the keys past "
                         "each row's length, so pad on the right (tokenizer.padding_side = "
                         "'right') or use attn_implementation='sdpa'")
    return n.to(torch.int64)


def zeromask_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor,
                               value: Tensor, attention_mask: Optional[Tensor],
                               dropout: float = 0.0, scaling: Optional[float] = None,
                               is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function contract: ``query`` ``(B, Hq, Lq, D)``, ``key`` and
    ``value`` ``(B, Hkv, Lk, D)``, ``attention_mask`` None or the ``(B, Lk)`` padding mask of
    :func:`zeromask_mask`; returns ``(attn_output (B, Lq, Hq, D), None)``."""
    for name in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"zeromask attention does not support {name!r}; use "
                             "attn_implementation='eager' or 'sdpa' for this model")
    if dropout and dropout > 0:
        raise ValueError(f"zeromask attention has no dropout, but this call asks for "
                         f"{dropout}; set the model config's attention_dropout to 0 (e.g. "
                         "from_pretrained(..., attention_dropout=0.0)) before training")
    if kwargs.get("output_attentions"):
        warnings.warn("zeromask attention does not return attention weights "
                      "(output_attentions=True gives None); use attn_implementation='eager' "
                      "to see them", stacklevel=2)
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    seqlens_k = None
    if attention_mask is not None:
        seqlens_k = _seqlens_from_padding(attention_mask, B, Lk)
    zt = _ZERO_TOKENS.get()
    zkw = {}
    if zt is not None and not causal:
        if tuple(zt.key_zero.shape) != (B, Lk):
            raise ValueError(f"zero_tokens: key_zero has shape {tuple(zt.key_zero.shape)} but "
                             f"this attention ({type(module).__name__}) has ({B}, {Lk}) keys: "
                             "give the zero tokens at the encoder's output rate")
        zkw = dict(key_zero=zt.key_zero.to(query.device), zero_scale=zt.zero_scale,
                   zero_mode=zt.zero_mode)
    out = zero_soft_attention(query, key, value, causal=causal and Lq > 1,
                              sm_scale=scaling, seqlens_k=seqlens_k, **zkw)
    return out.transpose(1, 2).contiguous(), None


def zeromask_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                  kv_offset: int = 0, mask_function=causal_mask_function,
                  attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """transformers' mask-function contract for ``"zeromask"``: the ``(B, kv_length)`` bool
    padding mask of the keys in view (None when no key is padded), never an L x L tensor;
    causality is the attention module's ``is_causal``. Raises ``NotImplementedError`` for
    mask patterns the kernels cannot express (sliding windows, chunks, packed sequences)."""
    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise NotImplementedError(
            f"zeromask attention supports causal and bidirectional masks with padding, not "
            f"{getattr(mask_function, '__name__', mask_function)!r} (sliding windows, "
            "chunked or packed sequences); use attn_implementation='sdpa' for this model")
    if attention_mask is None:
        return None
    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    mask = mask[:, kv_offset:kv_offset + kv_length].bool()  # (B, kv_length): padded above
    if bool(mask.all()):
        return None
    return mask


def register(name: str = NAME) -> str:
    """Register the attention and mask functions under ``name`` (done on import for
    ``"zeromask"``; idempotent). Returns ``name``."""
    AttentionInterface.register(name, zeromask_attention_forward)
    AttentionMaskInterface.register(name, zeromask_mask)
    return name


register()

__all__ = ["NAME", "register", "zero_tokens", "ZeroTokens", "zeromask_attention_forward",
           "zeromask_mask"]
