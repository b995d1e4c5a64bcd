"""Synthesize a labelled speech set with espeak-ng (for machines with no corpus).

Each utterance: a generated sentence (:class:`~zeromask.data.text.SentenceGenerator`), spoken
by one *voice* (an English accent of espeak-ng plus a voice variant, e.g. ``en-gb-scotland+f2``)
at a random pitch (``-p``), pitch range (SSML ``<prosody range>``) and speed (``-s``), with random inner pauses
(SSML ``<break>``), random leading and trailing silence and a random gain. Voices are split
into train and test voices before anything is drawn, so the test split's speakers are never
heard in training. Output layout (readable by :func:`zeromask.data.find_utterances`)::

    OUT/train/000000.wav + 000000.txt ...
    OUT/test/...
    OUT/manifest.jsonl      one JSON line per utterance: split, file, text, voice, pitch...
"""
from __future__ import annotations

import html
import json
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .text import CharTokenizer, SentenceGenerator

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "Andy", "Annie", "adam", "anika", "aunty", "benjamin",
            "caleb", "david", "ed", "edward", "john", "linda", "max", "michel", "paul",
            "robert", "steph", "travis", "victor", "zac")

INSTALL_HINT = ("espeak-ng is not installed (or not on PATH). Install it with "
                "`apt-get install -y espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng`, "
                "or point ZEROMASK_ESPEAK at the binary.")


class EspeakNotFound(RuntimeError):
    """espeak-ng is missing; the message says how to install it."""


def espeak_binary() -> str:
    """Path of the espeak-ng binary (``ZEROMASK_ESPEAK`` or PATH), else :class:`EspeakNotFound`."""
    path = os.environ.get("ZEROMASK_ESPEAK") or shutil.which("espeak-ng")
    if not path or not os.access(path, os.X_OK):
        raise EspeakNotFound(INSTALL_HINT)
    return path


def _installed_variants(binary: str) -> Optional[set]:
    try:
        out = subprocess.run([binary, "--voices=variant"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    names = set()
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5:  # the file column: !v/NAME
            names.add(parts[4].split("/")[-1])
    return names


def voices(binary: Optional[str] = None) -> List[str]:
    """Every ``accent+variant`` voice this espeak-ng has (whisper-like variants excluded)."""
    binary = binary or espeak_binary()
    have = _installed_variants(binary)
    variants = [v for v in VARIANTS if have is None or v in have]
    return [f"{a}+{v}" for a in ACCENTS for v in variants]


def split_voices(all_voices: Sequence[str], test_fraction: float = 0.15,
                 seed: int = 0) -> Tuple[List[str], List[str]]:
    """Disjoint (train, test) voice lists; at least one voice on each side."""
    if len(all_voices) < 2:
        raise ValueError("need at least two voices to hold some out")
    v = sorted(all_voices)
    random.Random(seed).shuffle(v)
    n_test = min(len(v) - 1, max(1, round(len(v) * test_fraction)))
    return sorted(v[n_test:]), sorted(v[:n_test])


def synthesize(text: str, voice: str, *, pitch: int = 50, pitch_range: int = 50,
               speed: int = 160, breaks: Sequence[Tuple[int, int]] = (),
               sample_rate: int = 16000, binary: Optional[str] = None) -> np.ndarray:
    """Speak ``text`` with espeak-ng; float32 mono at ``sample_rate``.

    ``pitch`` 0-99 (espeak-ng ``-p``), ``pitch_range`` in percent of the voice's default
    (SSML prosody range), ``speed`` in words per minute; ``breaks``: ``(word_index,
    milliseconds)`` pauses inserted before those words.
    """
    import soundfile as sf
    binary = binary or espeak_binary()
    words = text.split()
    pause = dict(breaks)
    parts = []
    for i, w in enumerate(words):
        if i in pause and i > 0:
            parts.append(f'<break time="{int(pause[i])}ms"/>')
        parts.append(html.escape(w))
    ssml = (f'<speak><prosody range="{int(pitch_range)}%">' + " ".join(parts)
            + "</prosody></speak>")
    with tempfile.TemporaryDirectory(prefix="zeromask-espeak-") as tmp:
        out = os.path.join(tmp, "u.wav")
        cmd = [binary, "-m", "-v", voice, "-p", str(int(pitch)),
               "-s", str(int(speed)), "-w", out, ssml]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {res.stderr.strip()}")
        wav, sr = sf.read(out, dtype="float32", always_2d=True)
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        import librosa
        wav = librosa.resample(wav, orig_sr=sr, target_sr=sample_rate)
    return wav.astype(np.float32)


def _plan(n: int, test_fraction: float, seed: int, all_voices: Sequence[str],
          voice_test_fraction: float) -> List[dict]:
    train_v, test_v = split_voices(all_voices, voice_test_fraction, seed)
    gen = SentenceGenerator(seed)
    rng = random.Random(seed + 1)
    n_test = min(n - 1, max(1, round(n * test_fraction))) if n > 1 else 0
    plans = []
    for i in range(n):
        split = "test" if i >= n - n_test else "train"
        text = gen.sentence()
        nwords = len(text.split())
        breaks = [(j, rng.randint(150, 600)) for j in range(1, nwords) if rng.random() < 0.12]
        plans.append({
            "split": split,
            "file": f"{split}/{i:06d}",
            "text": text,
            "voice": rng.choice(test_v if split == "test" else train_v),
            "pitch": rng.randint(20, 80),
            "pitch_range": rng.randint(40, 160),
            "speed": rng.randint(120, 220),
            "breaks": breaks,
            "lead_s": round(rng.uniform(0.05, 0.6), 3),
            "trail_s": round(rng.uniform(0.05, 0.6), 3),
            "gain": round(rng.uniform(0.3, 0.95), 3),
        })
    return plans


def _render(args) -> dict:
    out, plan, sample_rate, binary = args
    import soundfile as sf
    wav = synthesize(plan["text"], plan["voice"], pitch=plan["pitch"],
                     pitch_range=plan["pitch_range"], speed=plan["speed"],
                     breaks=plan["breaks"], sample_rate=sample_rate, binary=binary)
    peak = float(np.abs(wav).max()) or 1.0
    wav = wav / peak * plan["gain"]
    lead = np.zeros(int(plan["lead_s"] * sample_rate), np.float32)
    trail = np.zeros(int(plan["trail_s"] * sample_rate), np.float32)
    wav = np.concatenate([lead, wav, trail])
    base = Path(out) / plan["file"]
    sf.write(str(base.with_suffix(".wav")), wav, sample_rate, subtype="PCM_16")
    base.with_suffix(".txt").write_text(plan["text"] + "\n", encoding="utf-8")
    return dict(plan, seconds=round(len(wav) / sample_rate, 3))


def make_dataset(out, n: int, *, test_fraction: float = 0.1, voice_test_fraction: float = 0.15,
                 seed: int = 0, sample_rate: int = 16000, jobs: Optional[int] = None,
                 progress: bool = False) -> List[dict]:
    """Write ``n`` synthesized utterances under ``out`` (see the module doc); returns the plans.

    Raises :class:`EspeakNotFound` (before writing anything) where espeak-ng is missing.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    binary = espeak_binary()
    all_voices = voices(binary)
    plans = _plan(n, test_fraction, seed, all_voices, voice_test_fraction)
    out = Path(out)
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    tok = CharTokenizer()
    for p in plans:  # the generator only emits alphabet characters; keep it that way
        assert tok.normalize(p["text"]) == p["text"], p["text"]
    jobs = jobs or min(8, os.cpu_count() or 1)
    args = [(out, p, sample_rate, binary) for p in plans]
    with ThreadPoolExecutor(jobs) as pool:  # espeak-ng runs as subprocesses
        it = pool.map(_render, args)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=len(args), desc="make-data", unit="utt")
        done = list(it)
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for d in done:
            fh.write(json.dumps(d) + "\n")
    return done


__all__ = ["make_dataset", "synthesize", "voices", "split_voices", "espeak_binary",
           "EspeakNotFound", "ACCENTS", "VARIANTS", "INSTALL_HINT"]
