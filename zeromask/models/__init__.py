"""The reference speech model: per-feature ZeroSoftAttention encoders, gated decoder,
joint CTC/attention training."""
from .asr import (Attention, CTCPrefixScorer, CrossStage, FeatureEncoder, FrontEnd, SpeechModel, ctc_greedy,
                  ctc_targets, ctc_token_log_likelihood, downsample_mask,
                  downsampled_lengths, frame_lengths_of, resample_time, spec_augment,
                  vtlp_warp)
from .config import ModelConfig

__all__ = ["ModelConfig", "SpeechModel", "Attention", "FeatureEncoder", "FrontEnd",
           "CrossStage", "CTCPrefixScorer", "downsample_mask", "spec_augment", "vtlp_warp", "ctc_greedy", "ctc_targets",
           "downsampled_lengths", "frame_lengths_of", "resample_time",
           "ctc_token_log_likelihood"]
