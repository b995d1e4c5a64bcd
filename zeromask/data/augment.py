"""Waveform augmentation for synthesized speech: coloured noise at a set SNR, and reverberation
by a synthetic room impulse response. numpy only (``scipy.signal.fftconvolve`` when scipy is
importable, as it is wherever librosa is).

* :func:`colored_noise` / :func:`add_noise`: white, pink (power ~ 1/f) or brown (~ 1/f^2)
  Gaussian noise, flat below ``f_min`` (20 Hz, so brown noise is not all sub-audible rumble),
  scaled to an exact SNR against the power of a reference (by default the whole clip; the
  data pipeline passes the speech part, so silences do not lower the reference).
* :func:`synthetic_rir` / :func:`reverberate`: a unit direct path followed, after a short gap,
  by Gaussian noise whose amplitude decays by 60 dB over ``rt60`` seconds (an exponentially
  decaying diffuse tail). The tail starts at a fixed level, so a longer RT60 also means more
  reverberant energy (a lower direct-to-reverberant ratio), as in a real room.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

NOISE_COLORS = ("white", "pink", "brown")
_EXPONENT = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectral density ~ 1 / f^k


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def colored_noise(n: int, color: str = "white", rng=None, *, sample_rate: int = 16000,
                  f_min: float = 20.0) -> np.ndarray:
    """``n`` samples of zero-mean, unit-RMS Gaussian noise of a colour (float64)."""
    if color not in _EXPONENT:
        raise ValueError(f"color must be one of {NOISE_COLORS}, not {color!r}")
    n = int(n)
    if n <= 0:
        return np.zeros(0)
    white = _rng(rng).standard_normal(n)
    k = _EXPONENT[color]
    if k == 0.0 or n < 4:
        out = white
    else:
        spec = np.fft.rfft(white)
        f = np.fft.rfftfreq(n, d=1.0 / sample_rate)
        spec *= np.maximum(f, f_min) ** (-k / 2.0)
        spec[0] = 0.0
        out = np.fft.irfft(spec, n)
    out = out - out.mean()
    rms = float(np.sqrt(np.mean(out ** 2)))
    return out / rms if rms > 0 else out


def add_noise(wav: np.ndarray, snr_db: float, color: str = "white", rng=None, *,
              ref_power: Optional[float] = None, sample_rate: int = 16000) -> np.ndarray:
    """``wav`` plus noise of ``color`` over its whole length, at ``snr_db`` below ``ref_power``.

    ``ref_power`` is the mean square the SNR is measured against (default: ``wav``'s own);
    the noise's mean square is exactly ``ref_power / 10**(snr_db / 10)``. Returns float32.
    """
    wav = np.asarray(wav, dtype=np.float64)
    power = float(np.mean(wav ** 2)) if ref_power is None else float(ref_power)
    if power <= 0:
        raise ValueError("cannot set an SNR against a silent signal")
    noise = colored_noise(len(wav), color, rng, sample_rate=sample_rate)
    noise *= np.sqrt(power / 10.0 ** (snr_db / 10.0))
    return (wav + noise).astype(np.float32)


def synthetic_rir(rt60: float, sample_rate: int = 16000, rng=None, *, gap_ms: float = 2.5,
                  tail_level: float = 0.05) -> np.ndarray:
    """A room impulse response: 1 at t=0, then from ``gap_ms`` on, Gaussian noise of initial
    standard deviation ``tail_level`` (at 16 kHz; scaled with the rate so the tail energy does
    not depend on it) whose amplitude decays by 60 dB at ``rt60`` seconds (where it ends)."""
    if not rt60 > 0:
        raise ValueError("rt60 must be > 0")
    n = max(2, int(round(rt60 * sample_rate)))
    t = np.arange(n) / sample_rate
    decay = np.exp(-3.0 * np.log(10.0) * t / rt60)  # 20 log10(decay(rt60)) = -60 dB
    h = _rng(rng).standard_normal(n) * decay * tail_level * np.sqrt(16000.0 / sample_rate)
    h[: max(1, int(gap_ms * 1e-3 * sample_rate))] = 0.0
    h[0] = 1.0
    return h


def direct_to_reverberant_db(rir: np.ndarray) -> float:
    """10 log10(direct energy / tail energy) of an RIR from :func:`synthetic_rir`."""
    tail = float(np.sum(np.asarray(rir[1:], dtype=np.float64) ** 2))
    return float(10 * np.log10(rir[0] ** 2 / tail)) if tail > 0 else float("inf")


def _convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    try:
        from scipy.signal import fftconvolve
    except ImportError:  # numpy FFT convolution
        n = len(x) + len(h) - 1
        size = 1 << (n - 1).bit_length()
        return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]
    return fftconvolve(x, h)


def reverberate(wav: np.ndarray, rt60: float, rng=None, *, sample_rate: int = 16000,
                rir: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(``wav`` convolved with a synthetic RIR and cut to ``len(wav)``, the RIR); float32.

    The tail past the clip's end is dropped, so the clip keeps its length (and its
    transcript's alignment); the trailing silence of a synthesized clip holds most of it.
    """
    h = synthetic_rir(rt60, sample_rate, rng) if rir is None else np.asarray(rir, np.float64)
    y = _convolve(np.asarray(wav, dtype=np.float64), h)[: len(wav)]
    return y.astype(np.float32), h


def estimate_rt60(rir: np.ndarray, sample_rate: int = 16000) -> float:
    """RT60 of an RIR's tail by Schroeder backward integration, line fit from -5 to -25 dB."""
    tail = np.asarray(rir[1:], dtype=np.float64) ** 2
    edc = np.cumsum(tail[::-1])[::-1]
    edc_db = 10 * np.log10(np.maximum(edc / edc[0], 1e-30))
    idx = np.nonzero((edc_db <= -5) & (edc_db >= -25))[0]
    if len(idx) < 2:
        raise ValueError("the RIR's decay does not span -5 to -25 dB")
    slope, _ = np.polyfit(idx / sample_rate, edc_db[idx], 1)
    return float(-60.0 / slope)


__all__ = ["NOISE_COLORS", "colored_noise", "add_noise", "synthetic_rir", "reverberate",
           "direct_to_reverberant_db", "estimate_rt60"]
