"""Audio features (librosa + parselmouth): log-mel, waveform frames, f0, energy, periodicity.

See :mod:`zeromask.audio.features` for the definitions and the choice of F0 estimator.
"""
from .features import (F0_METHODS, FEATURES, OUTPUTS, FeatureCache, FeatureConfig,
                       cache_features, extract_batch, extract_features, load_audio, num_frames,
                       resample_contour)

__all__ = ["FeatureConfig", "FeatureCache", "extract_features", "extract_batch", "cache_features",
           "load_audio", "resample_contour", "num_frames", "FEATURES", "OUTPUTS", "F0_METHODS"]
