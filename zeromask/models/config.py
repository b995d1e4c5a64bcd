"""Configuration of the reference speech model (one dataclass, JSON round-trip)."""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, Optional, Tuple

from ..audio.features import FEATURES
from ..ops import ZERO_MODES
from ..zero import SILENCE_FLOOR_DB


#: ``ModelConfig.input_norm``: fixed input scaling, or per-utterance normalisation on top
INPUT_NORMS = ("fixed", "utterance")
#: ``ModelConfig.frontend``: how each feature is subsampled (see ``FrontEnd``)
FRONTENDS = ("project", "conv")
#: ``ModelConfig.zero_tokens``: which keys are zero tokens (see its docstring)
ZERO_TOKENS = ("silence", "padding", "none")
#: ``ModelConfig.start_token``: the decoder's start token (see its docstring)
START_TOKENS = ("zero", "distinct")


@dataclasses.dataclass
class ModelConfig:
    """Everything that shapes :class:`zeromask.models.SpeechModel`.

    Comparison switches (issue 7's experiments):

    ``zero_mode``       "prob" (zero-token weight x ``zero_scale``), "score" (Echo's logit
                        x ``zero_scale``) or "hard" (zero tokens removed with -inf; a row
                        with no key left gives 0), see docs/design.md 3.3; every mode runs
                        on the same kernels.
    ``zero_scaling``    False: the same as ``zero_mode="hard"`` (kept for the earlier
                        configs and the experiments' ``--no-zero-scaling``).
    ``zero_tokens``     which keys are zero tokens: ``"silence"`` (silent and padding
                        audio frames, and text id 0, so the start token too), ``"padding"``
                        (only the audio frames past an utterance's end: silence and the
                        start token are attended normally; text needs no mask, causal
                        attention never reaches the text padding from a real token) or
                        ``"none"`` (no key at all, the batch padding is attended too, so an
                        utterance's output depends on what it is batched with). Every
                        attention stays a ZeroSoftAttention.
    ``start_token``     ``"zero"``: the decoder's start token is id 0, a zero token (pad and
                        end are 0 too); ``"distinct"``: the embedding has one more row, id
                        ``vocab_size`` (:attr:`start_id`), used at position 0 of every decoder
                        input whatever id is there (so ``[0, text...]`` inputs work
                        unchanged); it is no zero token, and it is never predicted (the output
                        layers keep ``vocab_size`` ids; 0 stays pad and end).
    ``rotary``          False: no attention rotates (encoder, decoder self-attention, cross
                        attention; ``f0_rotary`` is then unused): positions come from
                        ``abs_pos`` (and the convolutions) alone.
    ``f0_rotary``       True: encoder self-attention rotates with theta from the utterance's
                        F0 contour (:class:`zeromask.F0Rotary`); False: constant learnable
                        theta (standard RoPE with a learnable base).
    ``feature_order``   which audio features the model uses and the order of the decoder's
                        cross-attention stages (a subset of spectrogram, waveform, pitch).
    ``abs_pos``         add sinusoidal absolute positions to each encoder's front-end output
                        and to the decoder's embeddings (as Whisper): rotary gives
                        self-attention relative positions, but cross-attention needs to know
                        where in the utterance a frame is to align text with audio.
    ``curriculum_steps`` > 0: feature stage k (in ``feature_order``) is enabled from training
                        step ``k * curriculum_steps`` on; 0: all stages always on.

    Training recipe (issue 11's measurements decide the defaults; see the README):

    ``ctc_weight``      weight ``w`` of the CTC loss in joint CTC/attention training (Kim, Hori
                        and Watanabe 2017): ``loss = (1 - w) * CE + w * CTC``; the CTC head
                        reads the sum of the active feature encoders' outputs, blank = id 0.
                        0 removes the head.
    ``label_smoothing`` of the decoder's cross-entropy (Szegedy et al. 2016).
    ``spec_augment``    SpecAugment (Park et al. 2019) on the log-mel input while training:
                        ``(freq_masks, freq_width, time_masks, time_width_fraction)``, each mask
                        up to that many mel bins / that fraction of the frames; ``None``: off.
    ``conv_kernel``     > 0: every encoder layer gets a Conformer convolution module
                        (Gulati et al. 2020) with a depthwise kernel of that many frames
                        (odd); 0: none.
    ``ctc_input``       what the CTC head reads: ``"sum"`` of the feature encoders' outputs,
                        or one feature's encoder (e.g. ``"spectrogram"``).
    ``vtlp``            > 0: vocal tract length perturbation of the log-mel input while
                        training, warp factors in ``[1 - vtlp, 1 + vtlp]`` (Jaitly and Hinton
                        2013; see :func:`zeromask.models.vtlp_warp`); 0: off.
    ``input_norm``      ``"fixed"`` input scaling, or ``"utterance"``: each utterance's
                        features normalised over its valid frames (CMVN of spectrogram and
                        pitch, RMS of the waveform), see :class:`zeromask.models.FrontEnd`.
    ``frontend``        ``"project"`` (per-frame linear layer, then stride-2 convolutions) or
                        ``"conv"`` (stride-2 convolutions straight on the input features).
    ``encoder_layers``  layers per feature encoder, e.g. ``{"spectrogram": 4, "pitch": 1}``;
                        a feature not named gets ``enc_layers``.
    """
    vocab_size: int = 29
    d_model: int = 96
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    ffn_mult: int = 4
    enc_layers: int = 2          # per feature
    dec_self_layers: int = 2
    dec_cross_layers: int = 1    # per feature stage
    dropout: float = 0.1
    feature_order: Tuple[str, ...] = ("spectrogram", "pitch", "waveform")
    n_mels: int = 80
    hop_length: int = 160        # samples per waveform frame (= the feature hop)
    downsample: int = 4          # encoder frame-rate reduction, a power of 2
    zero_mode: str = "prob"
    zero_scaling: bool = True
    zero_scale: float = 1e-6
    learnable_zero_scale: bool = False
    zero_tokens: str = "silence"
    start_token: str = "zero"
    rotary: bool = True
    f0_rotary: bool = True
    rotary_mode: str = "echo"
    cross_rotary: bool = False   # rotate text queries / audio keys in cross-attention too
    abs_pos: bool = True         # sinusoidal absolute positions on encoder and decoder inputs
    silence_top_db: Optional[float] = 50.0
    silence_threshold_db: Optional[float] = SILENCE_FLOOR_DB  # absolute floor (zero.from_audio)
    curriculum_steps: int = 0
    max_decode_len: int = 200
    backend: Optional[str] = None
    ctc_weight: float = 0.3
    label_smoothing: float = 0.1
    spec_augment: Optional[Tuple[int, int, int, float]] = (2, 15, 2, 0.05)
    encoder_layers: Optional[Dict[str, int]] = None
    conv_kernel: int = 0
    ctc_input: str = "sum"
    input_norm: str = "fixed"
    vtlp: float = 0.0
    frontend: str = "project"

    def __post_init__(self):
        self.feature_order = tuple(self.feature_order)
        if not self.feature_order:
            raise ValueError("feature_order must name at least one feature")
        bad = [f for f in self.feature_order if f not in FEATURES]
        if bad or len(set(self.feature_order)) != len(self.feature_order):
            raise ValueError(f"feature_order must be distinct names from {FEATURES}, "
                             f"got {self.feature_order}")
        if self.zero_mode not in ZERO_MODES:
            raise ValueError(f"zero_mode must be one of {ZERO_MODES}, got {self.zero_mode!r}")
        if self.zero_tokens not in ZERO_TOKENS:
            raise ValueError(f"zero_tokens must be one of {ZERO_TOKENS}, "
                             f"got {self.zero_tokens!r}")
        if self.start_token not in START_TOKENS:
            raise ValueError(f"start_token must be one of {START_TOKENS}, "
                             f"got {self.start_token!r}")
        if self.cross_rotary and not self.rotary:
            raise ValueError("cross_rotary needs rotary (rotary=False turns every rotary off)")
        if self.d_model % self.num_heads:
            raise ValueError("d_model must be divisible by num_heads")
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError("downsample must be a power of 2 (1, 2, 4, ...)")
        if self.rotary_mode not in ("echo", "additive"):
            raise ValueError("rotary_mode must be 'echo' or 'additive'")
        if self.curriculum_steps < 0:
            raise ValueError("curriculum_steps must be >= 0")
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1], got {self.ctc_weight}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.spec_augment is not None:
            sa = tuple(self.spec_augment)
            if (len(sa) != 4 or min(sa) < 0 or sa[3] >= 1
                    or any(int(x) != x for x in sa[:3])):
                raise ValueError("spec_augment must be (freq_masks, freq_width, time_masks, "
                                 f"time_width_fraction < 1), all >= 0; got {self.spec_augment}")
            self.spec_augment = (int(sa[0]), int(sa[1]), int(sa[2]), float(sa[3]))
        if not 0.0 <= self.vtlp < 0.5:
            raise ValueError(f"vtlp must be in [0, 0.5), got {self.vtlp}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}, got {self.frontend!r}")
        if self.conv_kernel < 0 or (self.conv_kernel and self.conv_kernel % 2 == 0):
            raise ValueError(f"conv_kernel must be 0 or odd, got {self.conv_kernel}")
        if self.ctc_input != "sum" and self.ctc_input not in self.feature_order:
            raise ValueError(f"ctc_input must be 'sum' or one of feature_order "
                             f"{self.feature_order}, got {self.ctc_input!r}")
        if self.encoder_layers is not None:
            layers = dict(self.encoder_layers)
            bad = [f for f in layers if f not in FEATURES]
            if bad or any(int(n) != n or n < 0 for n in layers.values()):
                raise ValueError(f"encoder_layers must map names from {FEATURES} to layer "
                                 f"counts >= 0, got {self.encoder_layers}")
            self.encoder_layers = {f: int(n) for f, n in layers.items()}

    @property
    def effective_zero_mode(self) -> str:
        """The attention's ``zero_mode``: ``"hard"`` when ``zero_scaling`` is False."""
        return self.zero_mode if self.zero_scaling else "hard"

    @property
    def start_id(self) -> int:
        """The id the decoder reads at position 0: 0, or ``vocab_size`` when
        ``start_token="distinct"``."""
        return self.vocab_size if self.start_token == "distinct" else 0

    def layers_for(self, feature: str) -> int:
        """Encoder layers of ``feature`` (``encoder_layers`` or else ``enc_layers``)."""
        return (self.encoder_layers or {}).get(feature, self.enc_layers)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["feature_order"] = list(self.feature_order)
        if self.spec_augment is not None:
            d["spec_augment"] = list(self.spec_augment)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))


__all__ = ["ModelConfig"]
