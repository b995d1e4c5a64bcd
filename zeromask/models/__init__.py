"""The reference speech model: per-feature ZeroSoftAttention encoders, gated decoder."""
from .asr import (Attention, CrossStage, FeatureEncoder, FrontEnd, SpeechModel,
                  downsample_mask)
from .config import ModelConfig

__all__ = ["ModelConfig", "SpeechModel", "Attention", "FeatureEncoder", "FrontEnd",
           "CrossStage", "downsample_mask"]
