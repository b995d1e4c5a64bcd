"""Audio features for the reference speech model (docs/design.md section 5).

:func:`extract_features` turns a waveform into five time-aligned streams at one hop rate
(frame ``i`` is centred on sample ``i * hop_length``, ``1 + len(wav) // hop_length`` frames,
as librosa's ``center=True``):

``spectrogram`` ``(T, n_mels)``
    log-mel power in dB (``10 log10``, reference 1.0, floor ``amin``), librosa.
``waveform`` ``(T, hop_length)``
    the raw samples, one hop-long frame centred on each frame time (zero-padded at the ends).
``f0`` ``(T,)``
    fundamental frequency in Hz; unvoiced and silent frames are 0, never NaN.
``energy`` ``(T,)``
    RMS of the ``n_fft``-long frame (librosa.feature.rms, linear amplitude).
``periodicity`` ``(T,)``
    voicing strength in [0, 1]: the best normalised-autocorrelation peak among the voiced
    pitch candidates of the frame (0 in silence, near 1 on a clean periodic signal).
``pitch`` ``(T, 3)``
    ``f0``, ``energy`` and ``periodicity`` stacked in that order.

F0 estimator
------------
Default ``f0_method="parselmouth"`` (Praat's autocorrelation pitch tracker with its Viterbi
path, through ``praat-parselmouth``). Chosen by measurement on this 2-core CPU:

============================  =========  ======================================================
estimator                     ms per s   accuracy / what it gives
============================  =========  ======================================================
parselmouth ``to_pitch_ac``   1.8-3.3    110/220 Hz tones and a 100-300 Hz glide exact to
                                         0.1 Hz; on espeak-ng speech median 0.5% from pyin,
                                         95.5% voicing agreement; gives a strength per frame
librosa.pyin                  106-960    the slow reference; voicing probability
librosa.yin                   3.4        no voicing decision at all (every frame gets an f0)
pyworld dio+stonemask         5.3        accurate, 0 when unvoiced, no strength; and pyworld
                                         0.3.5 imports ``pkg_resources``, which the setuptools
                                         here (84) no longer ships, so it does not import
============================  =========  ======================================================

parselmouth is the fastest estimator that gives both a voicing decision and a strength
(our periodicity), and it is as accurate as pyin on the checks above. ``f0_method="pyin"``
stays available (librosa only, no extra package), slower by two orders of magnitude.
Estimators that pull torchaudio (torchcrepe, PESTO, torchfcpe) are avoided on purpose:
torchaudio pins another torch.

Batch extraction (:func:`extract_batch`, :class:`FeatureCache`) stores one ``.npz`` per
utterance under a cache folder, keyed by the file's path, size and mtime and the feature
configuration, so a dataset is featurised once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

FEATURES = ("spectrogram", "waveform", "pitch")
OUTPUTS = ("spectrogram", "waveform", "f0", "energy", "periodicity", "pitch")
F0_METHODS = ("parselmouth", "pyin")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Everything that decides the features (and therefore the cache key)."""
    sample_rate: int = 16000
    n_fft: int = 400            # 25 ms at 16 kHz: mel window and RMS frame
    hop_length: int = 160       # 10 ms
    n_mels: int = 80
    mel_fmin: float = 0.0
    mel_fmax: Optional[float] = None
    amin: float = 1e-10         # dB floor: 10 log10(amin) = -100 dB
    f0_method: str = "parselmouth"
    f0_min: float = 50.0
    f0_max: float = 600.0

    def __post_init__(self):
        if self.f0_method not in F0_METHODS:
            raise ValueError(f"f0_method must be one of {F0_METHODS}, got {self.f0_method!r}")
        if self.hop_length <= 0 or self.n_fft < self.hop_length:
            raise ValueError("need 0 < hop_length <= n_fft")
        if not 0 < self.f0_min < self.f0_max:
            raise ValueError("need 0 < f0_min < f0_max")

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _librosa():
    try:
        import librosa
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("zeromask.audio needs librosa: pip install 'zeromask[audio]'") from exc
    return librosa


def num_frames(num_samples: int, hop_length: int) -> int:
    """Frames of a ``num_samples`` signal at ``hop_length`` (librosa ``center=True``)."""
    return 1 + num_samples // hop_length


def _pcm_to_float(wav: np.ndarray) -> np.ndarray:
    """Integer PCM to float64 in [-1, 1): signed by 2**(bits-1) (int16 / 32768, as
    soundfile and scipy), unsigned with its midpoint removed (uint8: (x - 128) / 128)."""
    info = np.iinfo(wav.dtype)
    scale = float(info.max) + 1.0
    if info.min == 0:  # unsigned: offset binary
        half = scale / 2.0
        return (wav.astype(np.float64) - half) / half
    return wav.astype(np.float64) / scale


def _as_mono_float(wav) -> np.ndarray:
    """1-D float64 samples from a 1-D or 2-D (channels x samples either way) float or
    integer array/tensor. Integer PCM is scaled per channel before channels are averaged;
    NaN or inf samples are refused (a ValueError), never silently replaced."""
    try:
        import torch
        if torch.is_tensor(wav):
            wav = wav.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    wav = np.asarray(wav)
    if wav.dtype == np.bool_ or not (np.issubdtype(wav.dtype, np.floating)
                                     or np.issubdtype(wav.dtype, np.integer)):
        raise TypeError(f"wav must be a float or integer PCM array, got {wav.dtype}")
    if wav.ndim not in (1, 2):
        raise ValueError(f"wav must be 1-D (or 2-D multichannel), got shape {wav.shape}")
    if np.issubdtype(wav.dtype, np.integer):
        wav = _pcm_to_float(wav)
    wav = wav.astype(np.float64)
    if wav.ndim == 2:  # (channels, samples) or (samples, channels): average the short axis
        wav = wav.mean(axis=0 if wav.shape[0] < wav.shape[1] else 1)
    bad = ~np.isfinite(wav)
    if bad.any():
        raise ValueError(f"wav has {int(bad.sum())} NaN or inf samples (first at sample "
                         f"{int(np.argmax(bad))}); fix or drop the recording")
    return wav


def _check_rate(sr) -> int:
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"sr must be a positive integer sample rate in Hz, got {sr!r}")
    return int(sr)


def _align(values: np.ndarray, voiced: np.ndarray, src_times: np.ndarray,
           dst_times: np.ndarray) -> np.ndarray:
    """Interpolate a contour onto new times; voiced values and the mask separately."""
    if len(src_times) == 0:
        return np.zeros(len(dst_times))
    w = np.interp(dst_times, src_times, voiced.astype(np.float64))
    s = np.interp(dst_times, src_times, np.where(voiced, values, 0.0))
    out = s / np.maximum(w, 1e-9)
    return np.where(w > 0.5, out, 0.0)


def _f0_parselmouth(wav: np.ndarray, cfg: FeatureConfig, times: np.ndarray):
    try:
        import parselmouth
    except ImportError as exc:
        raise ImportError("f0_method='parselmouth' needs praat-parselmouth (pip install "
                          "praat-parselmouth), or use f0_method='pyin'") from exc
    sr, dt = cfg.sample_rate, cfg.hop_length / cfg.sample_rate
    # Praat needs 3 periods of f0_min per analysis window; pad so short signals still work
    need = int(np.ceil(3.0 / cfg.f0_min * sr)) + 2 * cfg.hop_length
    pad = max(0, need - len(wav))
    snd = parselmouth.Sound(np.pad(wav, (0, pad)), sampling_frequency=sr)
    pitch = snd.to_pitch_ac(time_step=dt, pitch_floor=cfg.f0_min, pitch_ceiling=cfg.f0_max)
    xs = np.asarray(pitch.xs())
    sel = pitch.selected_array
    freq = np.nan_to_num(np.asarray(sel["frequency"], dtype=np.float64), nan=0.0)
    cand = pitch.to_array()  # (n_candidates, n_frames) of (frequency, strength)
    strength = np.where(cand["frequency"] > 0, cand["strength"], 0.0).max(axis=0)
    voiced = freq > 0
    f0 = _align(freq, voiced, xs, times)
    per = np.interp(times, xs, np.clip(strength, 0.0, 1.0)) if len(xs) else np.zeros(len(times))
    return f0, per


def _f0_pyin(wav: np.ndarray, cfg: FeatureConfig, n: int):
    librosa = _librosa()
    frame = max(cfg.n_fft, int(2 ** np.ceil(np.log2(2.5 * cfg.sample_rate / cfg.f0_min))))
    f0, voiced, prob = librosa.pyin(wav, fmin=cfg.f0_min, fmax=cfg.f0_max, sr=cfg.sample_rate,
                                    frame_length=frame, hop_length=cfg.hop_length, center=True)
    f0 = np.where(voiced & np.isfinite(f0), f0, 0.0)
    return _fit(f0, n), _fit(np.nan_to_num(prob, nan=0.0), n)


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) >= n:
        return x[:n]
    return np.pad(x, (0, n - len(x)), mode="edge" if len(x) else "constant")


def extract_features(wav, sr: int, config: Optional[FeatureConfig] = None,
                     **overrides) -> Dict[str, np.ndarray]:
    """All features of one utterance at one hop rate (see the module doc).

    ``wav``: 1-D float (or integer PCM) array or tensor, or 2-D multichannel (averaged to
    mono after integer PCM is scaled: int16 / 32768, uint8 (x - 128) / 128); NaN or inf
    samples raise ``ValueError``. ``sr``: its sample rate in Hz (a positive int, else
    ``ValueError``), resampled to ``config.sample_rate`` when different. ``overrides`` replace fields of ``config``
    (``extract_features(wav, sr, hop_length=320)``). Returns float32 numpy arrays, time
    first; ``f0`` is 0 on unvoiced frames and nothing is ever NaN.
    """
    cfg = config or FeatureConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    librosa = _librosa()
    sr = _check_rate(sr)
    wav = _as_mono_float(wav)
    if sr != cfg.sample_rate:
        wav = librosa.resample(wav, orig_sr=sr, target_sr=cfg.sample_rate)
    hop, sr = cfg.hop_length, cfg.sample_rate
    n = num_frames(len(wav), hop)
    times = np.arange(n) * (hop / sr)

    mel = librosa.feature.melspectrogram(y=wav, sr=sr, n_fft=cfg.n_fft, hop_length=hop,
                                         win_length=cfg.n_fft, n_mels=cfg.n_mels,
                                         fmin=cfg.mel_fmin, fmax=cfg.mel_fmax, center=True,
                                         power=2.0)
    spec = librosa.power_to_db(mel, ref=1.0, amin=cfg.amin, top_db=None).T[:n]
    energy = librosa.feature.rms(y=wav, frame_length=cfg.n_fft, hop_length=hop,
                                 center=True)[0][:n]
    padded = np.pad(wav, (hop // 2, hop * 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, hop)[::hop][:n]
    if cfg.f0_method == "parselmouth":
        f0, per = _f0_parselmouth(wav, cfg, times)
    else:
        f0, per = _f0_pyin(wav, cfg, n)
    f0 = np.clip(np.nan_to_num(f0, nan=0.0), 0.0, None)
    per = np.clip(np.nan_to_num(per, nan=0.0), 0.0, 1.0)
    out = {
        "spectrogram": spec,
        "waveform": frames,
        "f0": f0,
        "energy": energy,
        "periodicity": per,
    }
    out["pitch"] = np.stack([f0, energy, per], axis=-1)
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    for k, v in out.items():
        if v.shape[0] != n or not np.isfinite(v).all():  # an internal invariant
            raise RuntimeError(f"feature {k} has shape {v.shape} / non-finite values; "
                               f"expected {n} finite frames")
    return out


def resample_contour(f0, length: int):
    """Resample an F0 contour (``(T,)`` or ``(B, T)``; numpy or torch) to ``length`` frames.

    Unvoiced frames (0/NaN) stay 0 and are not interpolated into voiced ones (see
    :func:`zeromask.modules.resample_contour`, which this wraps). Returns the input's kind.
    """
    import torch
    from ..modules import resample_contour as _rc
    is_np = not torch.is_tensor(f0)
    t = torch.as_tensor(np.asarray(f0, dtype=np.float32)) if is_np else f0
    squeeze = t.dim() == 1
    if squeeze:
        t = t.unsqueeze(0)
    out = _rc(t.float(), int(length))
    if squeeze:
        out = out.squeeze(0)
    return out.numpy() if is_np else out


def load_audio(path: Union[str, os.PathLike], sample_rate: int = 16000) -> np.ndarray:
    """Read a wav/flac file as mono float32 at ``sample_rate`` (soundfile + librosa)."""
    try:
        import soundfile as sf
    except ImportError as exc:  # pragma: no cover
        raise ImportError("reading audio needs soundfile: pip install soundfile") from exc
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, EOFError) as exc:  # corrupt, truncated, foreign
        why = str(exc).replace(f"'{path}'", "it")  # soundfile names the file too
        raise ValueError(f"cannot read audio file {path}: {why}") from exc
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        wav = _librosa().resample(wav, orig_sr=sr, target_sr=sample_rate)
    return wav.astype(np.float32)


class FeatureCache:
    """On-disk cache of :func:`extract_features` results, one ``.npz`` per audio file.

    The key hashes the absolute path, size and modification time of the file and the
    :class:`FeatureConfig`, so an edited file or a changed configuration is featurised again.
    """

    def __init__(self, root: Union[str, os.PathLike], config: Optional[FeatureConfig] = None):
        self.root = Path(root)
        self.config = config or FeatureConfig()

    def path_for(self, audio_path: Union[str, os.PathLike]) -> Path:
        p = Path(audio_path).resolve()
        st = p.stat()
        raw = f"{p}|{st.st_size}|{st.st_mtime_ns}|{self.config.key()}"
        h = hashlib.sha1(raw.encode()).hexdigest()
        return self.root / h[:2] / f"{h}.npz"

    def load(self, audio_path) -> Optional[Dict[str, np.ndarray]]:
        cp = self.path_for(audio_path)
        if not cp.exists():
            return None
        try:
            with np.load(cp) as z:
                return {k: z[k] for k in OUTPUTS}
        except (OSError, KeyError, ValueError):  # a torn write: featurise again
            return None

    def get(self, audio_path) -> Dict[str, np.ndarray]:
        """Features of ``audio_path``, computed and stored on a miss."""
        feats = self.load(audio_path)
        if feats is not None:
            return feats
        wav = load_audio(audio_path, self.config.sample_rate)
        feats = extract_features(wav, self.config.sample_rate, self.config)
        cp = self.path_for(audio_path)
        cp.parent.mkdir(parents=True, exist_ok=True)
        tmp = cp.with_name(f"{cp.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **feats)
        os.replace(tmp, cp)  # atomic: concurrent workers never see half a file
        return feats


#: what reading or featurising a broken audio file raises (corrupt, truncated, NaN samples)
AUDIO_ERRORS = (OSError, ValueError, RuntimeError, EOFError)


def audio_failure(path, exc: BaseException) -> str:
    """The reason a file failed, naming the file once."""
    return str(exc) if str(path) in str(exc) else f"{path}: {exc}"


def _cache_one(args):
    """Fill the cache for one file; (path, None) or (path, the reason it failed)."""
    root, cfg, path = args
    try:
        FeatureCache(root, cfg).get(path)
    except AUDIO_ERRORS as exc:
        return path, audio_failure(path, exc)
    return path, None


def cache_features(paths: Sequence[Union[str, os.PathLike]], cache_dir: Union[str, os.PathLike],
                   config: Optional[FeatureConfig] = None, num_workers: int = 0,
                   progress: bool = False) -> Dict[str, str]:
    """Featurise every file not yet in the cache; never stops on a bad file.

    Returns ``{path: reason}`` for the files that could not be read or featurised (a
    corrupt or truncated wav, NaN samples, ...); everything else is cached.
    ``num_workers > 0`` uses that many processes; ``progress`` shows a tqdm bar.
    """
    cache = FeatureCache(cache_dir, config)
    missing = [p for p in paths if not cache.path_for(p).exists()]
    jobs = [(cache.root, cache.config, p) for p in missing]
    if num_workers > 0 and len(jobs) > 1:
        pool = ProcessPoolExecutor(num_workers)
        it: Iterable = pool.map(_cache_one, jobs, chunksize=8)
    else:
        pool = None
        it = map(_cache_one, jobs)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(jobs), desc="features", unit="utt")
    try:
        return {str(path): why for path, why in it if why is not None}
    finally:
        if pool is not None:
            pool.shutdown()


def extract_batch(paths: Sequence[Union[str, os.PathLike]], cache_dir: Union[str, os.PathLike],
                  config: Optional[FeatureConfig] = None, num_workers: int = 0,
                  progress: bool = False) -> List[Dict[str, np.ndarray]]:
    """Features for many files through a :class:`FeatureCache` (computed once, then read).

    ``num_workers > 0`` fills the cache with that many processes first.
    """
    paths = list(paths)
    bad = cache_features(paths, cache_dir, config, num_workers=num_workers, progress=progress)
    if bad:
        path, why = next(iter(bad.items()))
        raise ValueError(f"{len(bad)} of {len(paths)} audio files could not be featurised; "
                         f"first: {path}: {why}")
    cache = FeatureCache(cache_dir, config)
    return [cache.get(p) for p in paths]


__all__ = ["FeatureConfig", "FeatureCache", "extract_features", "extract_batch",
           "cache_features", "load_audio",
           "resample_contour", "num_frames", "FEATURES", "OUTPUTS", "F0_METHODS"]
