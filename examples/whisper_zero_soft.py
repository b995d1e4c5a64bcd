"""Whisper on the zeromask kernels, with the silent frames of an utterance as zero tokens.

Builds a tiny WhisperForConditionalGeneration from a config (nothing is downloaded), swaps
its attention to ``"zeromask"``, synthesizes an utterance (espeak-ng when installed, else a
harmonic tone) with silence around it, marks the silent frames as zero tokens, and prints
the encoder's attention mass on them before and after: the mass is measured by the kernel
itself, as the attention output for a value vector that is 1 on the silent frames.

Run: python examples/whisper_zero_soft.py       (needs: pip install 'zeromask[hf,audio]')
"""
import shutil
import subprocess
import tempfile

import numpy as np
import torch
from transformers import (AttentionInterface, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration)
from transformers.masking_utils import AttentionMaskInterface

import zeromask
import zeromask.integrations.transformers as zt
from zeromask.audio import extract_features, load_audio
from zeromask.models import downsample_mask

SR, SECONDS, N_MELS = 16000, 3, 80


def utterance() -> np.ndarray:
    """3 s at 16 kHz: 0.8 s of silence, speech, silence."""
    if shutil.which("espeak-ng"):
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            subprocess.run(["espeak-ng", "-w", f.name, "the quiet fox sleeps"], check=True)
            speech = load_audio(f.name, SR)[: int(1.6 * SR)]
    else:
        t = np.arange(int(1.2 * SR)) / SR
        speech = sum(np.sin(2 * np.pi * 140 * h * t) / h for h in range(1, 8)) * 0.1
    wav = np.zeros(SECONDS * SR, dtype=np.float32)
    start = int(0.8 * SR)
    wav[start:start + len(speech)] = speech
    return wav


wav = utterance()
# Whisper's own log-mel input (its feature extractor, built here, not downloaded)
fe = WhisperFeatureExtractor(feature_size=N_MELS, chunk_length=SECONDS)
features = torch.tensor(fe(wav, sampling_rate=SR, return_tensors="np").input_features)
# zero tokens: silent frames of the dB log-mel at the same 10 ms hop, at the encoder's rate
log_mel = torch.tensor(extract_features(wav, SR)["spectrogram"])[None, : features.shape[-1]]
silent = downsample_mask(zeromask.zero.from_audio(log_mel, log_mel), 2)  # conv2 has stride 2

config = WhisperConfig(vocab_size=64, d_model=64, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=N_MELS,
                       max_source_positions=SECONDS * 50, max_target_positions=32,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       decoder_start_token_id=1, attention_dropout=0.0)
torch.manual_seed(0)
model = WhisperForConditionalGeneration(config).eval()
model.set_attn_implementation("zeromask")      # every attention now runs on the kernels

# a probe: the same attention, plus its mass on the silent keys (attention of a value that
# is 1 on them), recorded for the encoder's self-attention
masses = []


def probe(module, query, key, value, attention_mask, **kw):
    out = zt.zeromask_attention_forward(module, query, key, value, attention_mask, **kw)
    if not module.is_causal and key.shape[2] == silent.shape[1] and query.shape[2] == key.shape[2]:
        ones = silent[:, None, :, None].to(value.dtype).expand_as(value).contiguous()
        mass, _ = zt.zeromask_attention_forward(module, query, key, ones, attention_mask, **kw)
        masses.append(mass.mean().item())  # every feature of the output is the mass
    return out


AttentionInterface.register("zeromask_probe", probe)
AttentionMaskInterface.register("zeromask_probe", zt.zeromask_mask)
model.set_attn_implementation("zeromask_probe")

ids = torch.tensor([[1, 5, 9, 12]])
print(f"{silent.float().mean().item():.0%} of the {silent.shape[1]} encoder frames are silent")
for label, block in (("plain attention", None), ("zero tokens, s = 1e-6", 1e-6)):
    masses.clear()
    with torch.no_grad():
        if block is None:
            model(input_features=features, decoder_input_ids=ids)
        else:
            with zt.zero_tokens(silent, zero_scale=block):
                model(input_features=features, decoder_input_ids=ids)
    print(f"{label:>22}: encoder attention mass on silent frames, per layer: "
          + ", ".join(f"{m:.2e}" for m in masses))
