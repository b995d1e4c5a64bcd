"""Find labelled utterances on disk and turn them into padded model batches.

Two layouts are read as they are:

* a folder (searched recursively) of ``NAME.wav`` (or ``.flac``) next to ``NAME.txt`` holding
  the transcript, as written by ``zeromask-make-data``;
* the LibriSpeech layout: ``SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` with one
  ``UTTERANCE-ID transcript`` line per utterance and ``UTTERANCE-ID.flac`` (or ``.wav``)
  beside it.

:func:`find_utterances` picks the layout by itself (a folder with any ``*.trans.txt`` is
LibriSpeech-style). :class:`SpeechDataset` featurises through a
:class:`zeromask.audio.FeatureCache` and :func:`collate` pads a batch with exact zeros,
which :mod:`zeromask.zero` reads as padding zero tokens.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .text import CharTokenizer

logger = logging.getLogger("zeromask")
AUDIO_EXTS = (".wav", ".flac")
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Utterance:
    id: str
    audio: str
    text: str


def _audio_for(stem: Path) -> Optional[Path]:
    for ext in AUDIO_EXTS:
        p = stem.with_suffix(ext)
        if p.exists():
            return p
    return None


def _read_text(path: Path) -> Optional[str]:
    """A transcript as UTF-8, or None (logged with the file's name) when it is not."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        logger.warning("zeromask: skipping %s: not UTF-8 text (%s)", path, exc.reason)
    except OSError as exc:
        logger.warning("zeromask: skipping %s: %s", path, exc)
    return None


def load_librispeech(root: Union[str, os.PathLike]) -> List[Utterance]:
    """Utterances of a LibriSpeech-style tree (``*.trans.txt`` + ``ID.flac``/``ID.wav``).
    A transcript file that is not UTF-8 is skipped and named in a warning."""
    root = Path(root)
    out, missing = [], 0
    for trans in sorted(root.rglob("*.trans.txt")):
        content = _read_text(trans)
        if content is None:
            continue
        for line in content.splitlines():
            line = line.strip()
            if not line:
                continue
            uid, _, text = line.partition(" ")
            audio = _audio_for(trans.parent / uid)
            if audio is None:
                missing += 1
                continue
            out.append(Utterance(uid, str(audio), text.strip()))
    if missing:
        logger.warning("zeromask: %d transcript lines under %s have no audio file", missing, root)
    return out


def load_folder(root: Union[str, os.PathLike]) -> List[Utterance]:
    """Utterances of a folder of ``NAME.wav``/``NAME.flac`` + ``NAME.txt`` (recursive).
    A transcript that is not UTF-8 is skipped and named in a warning."""
    root = Path(root)
    out, unlabelled = [], 0
    for audio in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTS):
        txt = audio.with_suffix(".txt")
        if not txt.exists():
            unlabelled += 1
            continue
        content = _read_text(txt)
        if content is None:
            continue
        text = " ".join(content.split())
        uid = str(audio.relative_to(root).with_suffix("")).replace(os.sep, "/")
        out.append(Utterance(uid, str(audio), text))
    if unlabelled:
        logger.warning("zeromask: %d audio files under %s have no .txt transcript (skipped)",
                       unlabelled, root)
    return out


def find_utterances(root: Union[str, os.PathLike]) -> List[Utterance]:
    """Utterances under ``root`` in either layout; a clear error when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if next(root.rglob("*.trans.txt"), None) is not None:
        utts = load_librispeech(root)
    else:
        utts = load_folder(root)
    if not utts:
        raise ValueError(f"no labelled utterances under {root}: expected NAME.wav + NAME.txt "
                         "pairs or a LibriSpeech-style tree with *.trans.txt files")
    return utts


class SpeechDataset(torch.utils.data.Dataset):
    """Utterances -> (features, token ids), featurised once through an on-disk cache.

    ``cache_dir=None`` extracts on every access (fine for tests; slow for training).
    ``max_frames`` drops longer utterances (logged). ``speed_perturb = x > 0`` (training):
    each access changes the utterance's tempo by a factor drawn log-uniformly in
    ``[1 / (1 + x), 1 + x]`` from torch's global RNG (:func:`change_tempo`), so every epoch
    hears other speaking rates (speed perturbation, Ko et al. 2015, on the features).
    """

    def __init__(self, utterances: Sequence[Utterance], tokenizer: CharTokenizer,
                 cache_dir: Optional[Union[str, os.PathLike]] = None, feature_config=None,
                 max_frames: Optional[int] = None, speed_perturb: float = 0.0):
        from ..audio import FeatureCache, FeatureConfig
        if not 0.0 <= speed_perturb < 2.0:
            raise ValueError(f"speed_perturb must be in [0, 2), got {speed_perturb}")
        self.tokenizer = tokenizer
        self.config = feature_config or FeatureConfig()
        self.cache = FeatureCache(cache_dir, self.config) if cache_dir is not None else None
        self.utterances = list(utterances)
        self.max_frames = max_frames
        self.speed_perturb = float(speed_perturb)

    def __len__(self) -> int:
        return len(self.utterances)

    def features(self, i: int) -> Dict[str, np.ndarray]:
        from ..audio import extract_features, load_audio
        u = self.utterances[i]
        if self.cache is not None:
            return self.cache.get(u.audio)
        wav = load_audio(u.audio, self.config.sample_rate)
        return extract_features(wav, self.config.sample_rate, self.config)

    def __getitem__(self, i: int) -> dict:
        u = self.utterances[i]
        f = self.features(i)
        ids = self.tokenizer.encode(u.text)
        streams = {k: torch.from_numpy(f[k]) for k in STREAMS}
        if self.speed_perturb > 0:
            span = math.log1p(self.speed_perturb)
            factor = math.exp((2 * torch.rand(()).item() - 1) * span)
            streams = change_tempo(streams, factor)
        return {"id": u.id, "text": self.tokenizer.normalize(u.text), **streams,
                "tokens": torch.tensor(ids, dtype=torch.long)}

    def prepare(self, num_workers: int = 0, progress: bool = False,
                max_bad_fraction: float = 0.1) -> Dict[str, str]:
        """Fill the feature cache for every utterance (multiprocess when asked) and drop the
        utterances whose audio cannot be read or featurised.

        Each dropped file is named in a warning, with a count at the end; returns
        ``{audio path: reason}``. Raises ``RuntimeError`` when more than
        ``max_bad_fraction`` of the utterances (or all of them) fail: then the data, not
        a file, is broken. Without a cache every file is read here once, to the same end.
        """
        from ..audio import cache_features, extract_features, load_audio
        from ..audio.features import AUDIO_ERRORS, audio_failure
        paths = [u.audio for u in self.utterances]
        if self.cache is not None:
            bad = cache_features(paths, self.cache.root, self.config, num_workers=num_workers,
                                 progress=progress)
        else:
            bad = {}
            for p in paths:
                try:
                    extract_features(load_audio(p, self.config.sample_rate),
                                     self.config.sample_rate, self.config)
                except AUDIO_ERRORS as exc:
                    bad[str(p)] = audio_failure(p, exc)
        if not bad:
            return bad
        for why in list(bad.values())[:20]:  # each reason names its file
            logger.warning("zeromask: skipping %s", why)
        n = len(self.utterances)
        logger.warning("zeromask: %d of %d utterances skipped (unreadable audio)%s", len(bad),
                       n, "; the first 20 are named above" if len(bad) > 20 else "")
        if len(bad) == n or len(bad) > max_bad_fraction * n:
            raise RuntimeError(f"{len(bad)} of {n} audio files could not be read (more than "
                               f"{max_bad_fraction:.0%}): check the data; first: "
                               f"{next(iter(bad.values()))}")
        self.utterances = [u for u in self.utterances if str(u.audio) not in bad]
        return bad


#: the frame-rate streams of an item, time first
STREAMS = ("spectrogram", "waveform", "pitch", "f0")


def change_tempo(streams: Dict[str, torch.Tensor], factor: float) -> Dict[str, torch.Tensor]:
    """The utterance spoken ``factor`` times as fast: every stream resampled in time to
    ``n = round(T / factor)`` frames (at least 1), spread evenly over the input (output frame
    t reads input time ``t (T - 1) / (n - 1)``, about ``t factor``): the log-mel is linearly interpolated between frames; waveform frames, the pitch track and
    f0 take the nearest frame (a waveform frame stays a real stretch of samples, and an
    unvoiced frame is never blended into a voiced one). Pitch is unchanged, as for a tempo
    change of the audio.
    """
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    T = streams["spectrogram"].shape[0]
    n = max(1, int(round(T / factor)))
    pos = torch.arange(n, dtype=torch.float64) * (T - 1) / (n - 1) if n > 1 else \
        torch.zeros(1, dtype=torch.float64)
    nearest = pos.round().long().clamp(0, T - 1)
    i0 = pos.floor().long().clamp(0, max(0, T - 2))  # so i0 + 1 <= T - 1 and w in [0, 1]
    w = (pos - i0).to(streams["spectrogram"].dtype)[:, None]
    out = {}
    for k, x in streams.items():
        if k == "spectrogram" and T > 1:
            out[k] = x[i0] * (1 - w) + x[i0 + 1] * w
        else:
            out[k] = x[nearest]
    return out


def _pad(seqs: Sequence[torch.Tensor], length: int, value: float = 0.0) -> torch.Tensor:
    shape = (len(seqs), length) + tuple(seqs[0].shape[1:])
    out = seqs[0].new_full(shape, value)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


def collate(items: Sequence[dict], pad_multiple: int = 1) -> dict:
    """Pad a list of :class:`SpeechDataset` items into a batch.

    Audio streams are padded with exact zeros (padding frames -> zero tokens) to the longest
    item, rounded up to a multiple of ``pad_multiple`` frames; ``frame_lengths`` keeps the
    true lengths. (Training uses ``pad_multiple=32``: oneDNN builds a convolution kernel
    for every new input shape, and with a new length each batch that cost about as much as
    the convolutions themselves.) Text: ``input_ids`` = ``[0, c_1..c_n]`` (0 is the
    start token) padded with 0; ``labels`` = ``[c_1..c_n, 0]`` (the 0 is "end", so stopping is
    learnable) padded with -100 (ignored by the loss).
    """
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    T = max(it["spectrogram"].shape[0] for it in items)
    T = -(-T // pad_multiple) * pad_multiple
    N = max(it["tokens"].shape[0] for it in items) + 1
    batch = {k: _pad([it[k] for it in items], T) for k in ("spectrogram", "waveform", "pitch",
                                                          "f0")}
    batch["frame_lengths"] = torch.tensor([it["spectrogram"].shape[0] for it in items])
    inp = torch.zeros(len(items), N, dtype=torch.long)
    lab = torch.full((len(items), N), IGNORE_INDEX, dtype=torch.long)
    for i, it in enumerate(items):
        t = it["tokens"]
        inp[i, 1: 1 + len(t)] = t
        lab[i, : len(t)] = t
        lab[i, len(t)] = 0
    batch["input_ids"], batch["labels"] = inp, lab
    batch["text"] = [it["text"] for it in items]
    batch["id"] = [it["id"] for it in items]
    return batch


__all__ = ["Utterance", "find_utterances", "load_folder", "load_librispeech", "SpeechDataset",
           "collate", "change_tempo", "STREAMS", "IGNORE_INDEX", "AUDIO_EXTS"]
