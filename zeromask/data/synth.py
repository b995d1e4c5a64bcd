"""Synthesize a labelled speech set with several TTS engines (for machines with no corpus).

Each utterance is a generated sentence (:class:`~zeromask.data.text.SentenceGenerator`)
rendered by one *engine* and *voice* at a *speed* (a factor on the engine's default rate,
> 1 is faster) and a *pitch* (semitones from the voice's default), peak-normalised to a
random gain, with random leading and trailing silence (exact zeros) and, for some, noise
and/or reverberation (:mod:`zeromask.data.augment`) over the whole clip.

Engines (:data:`ENGINES`; each binary from PATH or an environment variable):

* ``espeak-ng`` (``ZEROMASK_ESPEAK``): voice = accent + variant (``en-gb-scotland+f2``); speed
  -> ``-s`` words per minute (175 x speed), pitch -> ``-p`` through a table measured on
  ``en-us+m3`` (``-p 50`` = 0 st, about 5.7 points per semitone above it, fewer below);
  also an SSML pitch range and inner pauses (``<break>``).
* ``flite`` (``ZEROMASK_FLITE``): voices ``awb rms slt kal16``; speed -> ``duration_stretch``,
  pitch -> ``int_f0_target_mean`` (voice default x 2^(st/12)); ``rms`` ignores that target, so
  its pitch is shifted by resampling (which moves the formants with it, like a shorter or
  longer vocal tract) and its rate set to compensate.
* ``festival`` (``ZEROMASK_FESTIVAL_TEXT2WAVE``, the ``text2wave`` script): voices
  ``kal_diphone ked_diphone`` (speed -> ``Duration_Stretch``, pitch -> the target F0 mean and
  spread of ``int_lr_params``) and ``cmu_us_slt_arctic_hts`` (32 kHz; speed -> the HTS
  engine's ``-r``; its pitch option has no effect in festival 2.5, so pitch is shifted by
  resampling as for flite ``rms``).

Splits written by :func:`make_dataset`:

* ``train/``: espeak-ng voices of the training accents (:data:`ACCENTS` minus the held-out
  family :data:`HELDOUT_ACCENTS`, minus the held-out test voices) and, for ``flite_fraction``
  of the utterances, flite voices; speed and pitch within :data:`TRAIN_SPEED` /
  :data:`TRAIN_PITCH`; ``augment_fraction`` of them with noise (SNR :data:`TRAIN_SNR_DB`),
  reverberation (RT60 :data:`TRAIN_RT60`) or both.
* ``test/``: held-out espeak-ng voices of the training accents, same ranges, never
  augmented: in-domain speech of unseen voices.
* ``shifted/``: speech made differently from training: festival (an engine never used in
  training) for half, the held-out accent family of espeak-ng for the other half; speed and
  pitch outside the training ranges on both sides (:data:`SHIFTED_SPEED`,
  :data:`SHIFTED_PITCH`); most with noise (SNR :data:`SHIFTED_SNR_DB`) and reverberation
  (RT60 :data:`SHIFTED_RT60`); texts from a separate generator stream, none equal to a
  training text. Caveat: festival's ``kal_diphone`` and ``cmu_us_slt_arctic_hts`` are the
  speakers of flite's ``kal16`` and ``slt`` (the same recordings, other synthesis methods:
  diphone vs. flite's diphone, HTS vs. flite's clustergen); only ``ked`` is a new speaker.
  The shift is in engine, accent, prosody range and room, not wholly in speaker.

The SNR is set against the mean power of the speech part (between the silences); the noise
then covers the whole clip, silences included. Reverberation keeps the clip's length.

Layout (readable by :func:`zeromask.data.find_utterances`)::

    OUT/train/000000.wav + 000000.txt ...
    OUT/test/...
    OUT/shifted/000000.wav + 000000.txt ...
    OUT/manifest.jsonl   one JSON line per utterance: split, file, text, engine, voice,
                         speed, pitch, engine_args, augment, ..., seconds, plan_id

Generation is resumable: each finished utterance is journaled (``OUT/.make-data.journal``)
and an utterance whose wav+txt exist and whose recorded plan equals the new one is not
rendered again, so an interrupted run continues where it stopped (files of the folder's
earlier runs that the new plan does not name are removed; ``OUT/.make-data.lock`` keeps a
second run off the same folder meanwhile).
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import augment as aug
from .text import CharTokenizer, SentenceGenerator


ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
#: the espeak-ng accent family kept out of train/ and test/ entirely (Caribbean English):
#: it is heard only in shifted/.
HELDOUT_ACCENTS = ("en-029",)
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "Andy", "Annie", "adam", "anika", "aunty", "benjamin",
            "caleb", "david", "ed", "edward", "john", "linda", "max", "michel", "paul",
            "robert", "steph", "travis", "victor", "zac")
FLITE_VOICES = ("awb", "rms", "slt", "kal16")
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
TRAIN_ENGINES = ("espeak-ng", "flite")

#: speed factor and pitch (semitones) ranges of train/ and test/ ...
TRAIN_SPEED = (0.75, 1.25)
TRAIN_PITCH = (-4.0, 4.0)
#: ... and of shifted/: a slow and a fast side, a low and a high side, all outside the above.
SHIFTED_SPEED = ((0.55, 0.7), (1.35, 1.6))
SHIFTED_PITCH = ((-7.0, -5.0), (5.0, 7.0))
TRAIN_SNR_DB = (15.0, 35.0)
TRAIN_RT60 = (0.1, 0.4)
SHIFTED_SNR_DB = (10.0, 20.0)
SHIFTED_RT60 = (0.3, 0.6)
#: in shifted/, each utterance gets noise and (independently) reverberation with this chance.
SHIFTED_AUGMENT_P = 0.8


class TrainRanges(NamedTuple):
    """Speed factor, pitch (semitones), SNR (dB) and RT60 (s) ranges of train/ (test/ always
    uses :data:`TRAIN_SPEED`, :data:`TRAIN_PITCH` and clean audio)."""
    speed: Tuple[float, float]
    pitch: Tuple[float, float]
    snr_db: Tuple[float, float]
    rt60: Tuple[float, float]


#: ``--train-ranges``: ``narrow`` keeps train/ in test/'s speed and pitch ranges (shifted/'s
#: prosody and rooms are then outside training); ``wide`` widens the augmentation of train/
#: over shifted/'s speeds, pitches, SNRs and RT60s, so that shifted/ differs from training
#: only in engine (festival), accent (en-029) and texts; ``rooms`` widens only the noise and
#: reverberation (speeds and pitches stay narrow, for the test-time tempo search to undo).
WIDE_SNR_DB = (8.0, 35.0)
WIDE_RT60 = (0.1, 0.65)
TRAIN_RANGES = {
    "narrow": TrainRanges(TRAIN_SPEED, TRAIN_PITCH, TRAIN_SNR_DB, TRAIN_RT60),
    "wide": TrainRanges((0.55, 1.6), (-7.0, 7.0), WIDE_SNR_DB, WIDE_RT60),
    "rooms": TrainRanges(TRAIN_SPEED, TRAIN_PITCH, WIDE_SNR_DB, WIDE_RT60),
}

INSTALL_HINT = ("espeak-ng is not installed (or not on PATH). Install it with "
                "`apt-get install -y espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng`, "
                "or point ZEROMASK_ESPEAK at the binary.")
FLITE_HINT = ("flite is not installed (or not on PATH). Install it with "
              "`apt-get install -y flite` (Debian/Ubuntu), or point ZEROMASK_FLITE at the "
              "binary, or leave flite out of training (`--engines espeak-ng`).")
FESTIVAL_HINT = ("festival's text2wave is not installed (or not on PATH). Install it with "
                 "`apt-get install -y festival festvox-kallpc16k festvox-kdlpc16k "
                 "festvox-us-slt-hts` (Debian/Ubuntu), or point ZEROMASK_FESTIVAL_TEXT2WAVE at "
                 "text2wave, or make no shifted set (`--no-shifted`).")
FESTIVAL_VOICE_PACKAGES = {"kal_diphone": "festvox-kallpc16k", "ked_diphone": "festvox-kdlpc16k",
                           "cmu_us_slt_arctic_hts": "festvox-us-slt-hts"}
# bump when the rendering of a plan changes, so resumed runs redo old files
_RENDER_VERSION = 2


class EngineNotFound(RuntimeError):
    """A TTS engine's binary is missing; the message says how to install it."""


class EspeakNotFound(EngineNotFound):
    """espeak-ng is missing; the message says how to install it."""


class FliteNotFound(EngineNotFound):
    """flite is missing; the message says how to install it."""


class FestivalNotFound(EngineNotFound):
    """festival's text2wave (or a festival voice) is missing; the message says how to install it."""


def _find(env: str, program: str, error: type, hint: str) -> str:
    path = os.environ.get(env) or shutil.which(program)
    if not path or not os.access(path, os.X_OK):
        raise error(hint)
    return path


def _run(cmd: Sequence[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=300, **kw)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what} timed out") from exc
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res


def _read_wav(path: str, sample_rate: int, orig_scale: float = 1.0) -> np.ndarray:
    """A wav as float32 mono at ``sample_rate``; ``orig_scale`` > 1 treats it as recorded
    at ``orig_scale`` times its rate (a 'tape speed' shift: pitch and formants up by that
    factor, duration down by it)."""
    import soundfile as sf
    wav, sr = sf.read(path, dtype="float32", always_2d=True)
    wav = wav.mean(axis=1)
    src = sr * orig_scale
    if abs(src - sample_rate) > 1e-6:
        import librosa
        wav = librosa.resample(wav, orig_sr=src, target_sr=sample_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


def _semitones(st: float) -> float:
    return 2.0 ** (float(st) / 12.0)


# ---------------------------------------------------------------------------- espeak-ng
def espeak_binary() -> str:
    """Path of the espeak-ng binary (``ZEROMASK_ESPEAK`` or PATH), else :class:`EspeakNotFound`."""
    return _find("ZEROMASK_ESPEAK", "espeak-ng", EspeakNotFound, INSTALL_HINT)


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


def voices(binary: Optional[str] = None, accents: Sequence[str] = ACCENTS) -> List[str]:
    """Every ``accent+variant`` voice this espeak-ng has (whisper-like variants excluded)."""
    binary = binary or espeak_binary()
    have = _installed_variants(binary)
    variants = [v for v in VARIANTS if have is None or v in have]
    return [f"{a}+{v}" for a in accents for v in variants]


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

    espeak-ng's own units: ``pitch`` 0-99 (``-p``), ``pitch_range`` in percent of the voice's
    default (SSML prosody range), ``speed`` in words per minute; ``breaks``: ``(word_index,
    milliseconds)`` pauses inserted before those words. (:data:`ENGINES` ``["espeak-ng"]``
    takes a speed factor and semitones instead.)
    """
    binary = binary or espeak_binary()
    words = text.split()
    pause = dict((int(i), ms) for i, ms in breaks)
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
        return _read_wav(out, sample_rate)


# ---------------------------------------------------------------------------- engines
class Engine:
    """One TTS engine: where its binary is, its voices, and ``render``.

    ``render(text, voice, speed=1.0, pitch=0.0, sample_rate=16000, binary=None, **extra)``
    returns float32 mono audio at ``sample_rate``; ``speed`` is a factor on the engine's
    default rate (> 1 faster), ``pitch`` semitones from the voice's default. ``native``
    gives the engine's own settings that these become (recorded in the manifest).
    """

    name = ""
    program = ""
    env = ""
    hint = ""
    error: type = EngineNotFound
    default_voices: Tuple[str, ...] = ()

    def binary(self) -> str:
        return _find(self.env, self.program, self.error, self.hint)

    def voices(self, binary: Optional[str] = None) -> List[str]:
        return list(self.default_voices)

    def native(self, voice: str, speed: float, pitch: float) -> dict:
        raise NotImplementedError

    def render(self, text: str, voice: str, *, speed: float = 1.0, pitch: float = 0.0,
               sample_rate: int = 16000, binary: Optional[str] = None, **extra) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Engine {self.name}>"


#: (espeak-ng -p, semitones from -p 50): median F0 of en-us+m3 (Praat), other voices alike
_ESPEAK_PITCH_TABLE = ((0, -7.1), (10, -5.6), (20, -4.4), (30, -3.1), (40, -1.6), (50, 0.0),
                       (60, 1.7), (70, 3.4), (80, 5.2), (90, 7.1), (99, 8.7))
ESPEAK_DEFAULT_WPM = 175


class EspeakEngine(Engine):
    name, program, env, hint, error = ("espeak-ng", "espeak-ng", "ZEROMASK_ESPEAK", INSTALL_HINT,
                                       EspeakNotFound)

    def binary(self) -> str:
        return espeak_binary()

    def voices(self, binary: Optional[str] = None) -> List[str]:
        return voices(binary)

    def native(self, voice: str, speed: float, pitch: float) -> dict:
        ps, sts = zip(*_ESPEAK_PITCH_TABLE)
        return {"p": int(round(float(np.interp(pitch, sts, ps)))),
                "s": int(round(ESPEAK_DEFAULT_WPM * speed))}

    def render(self, text, voice, *, speed=1.0, pitch=0.0, sample_rate=16000, binary=None,
               pitch_range: int = 100, breaks: Sequence[Tuple[int, int]] = (), **_):
        a = self.native(voice, speed, pitch)
        return synthesize(text, voice, pitch=a["p"], pitch_range=pitch_range, speed=a["s"],
                          breaks=breaks, sample_rate=sample_rate, binary=binary)


#: flite voices' default target F0 mean (Hz): kal16 from its source, awb and slt measured
#: (their output F0 follows the target); rms has none that it follows (resampled instead)
_FLITE_F0 = {"kal16": 105.0, "kal": 105.0, "awb": 130.0, "slt": 170.0}


class FliteEngine(Engine):
    name, program, env, hint, error = "flite", "flite", "ZEROMASK_FLITE", FLITE_HINT, FliteNotFound
    default_voices = FLITE_VOICES

    def voices(self, binary: Optional[str] = None) -> List[str]:
        res = _run([binary or self.binary(), "-lv"], "flite -lv")
        have = set(res.stdout.replace("Voices available:", "").split())
        return [v for v in FLITE_VOICES if v in have]

    def native(self, voice, speed, pitch):
        if voice in _FLITE_F0:
            return {"duration_stretch": round(1.0 / speed, 4),
                    "int_f0_target_mean": round(_FLITE_F0[voice] * _semitones(pitch), 2)}
        r = _semitones(pitch)  # resampled by r afterwards: render r times slower
        return {"duration_stretch": round(r / speed, 4), "resample_pitch_st": round(pitch, 3)}

    def render(self, text, voice, *, speed=1.0, pitch=0.0, sample_rate=16000, binary=None, **_):
        a = self.native(voice, speed, pitch)
        with tempfile.TemporaryDirectory(prefix="zeromask-flite-") as tmp:
            out = os.path.join(tmp, "u.wav")
            cmd = [binary or self.binary(), "-voice", voice,
                   "--setf", f"duration_stretch={a['duration_stretch']}"]
            if "int_f0_target_mean" in a:
                cmd += ["--setf", f"int_f0_target_mean={a['int_f0_target_mean']}"]
            _run(cmd + ["-t", text, "-o", out], f"flite (voice {voice!r})")
            if not os.path.exists(out):
                raise RuntimeError(f"flite wrote no audio for voice {voice!r}")
            return _read_wav(out, sample_rate, _semitones(a.get("resample_pitch_st", 0.0)))


_FESTIVAL_DIPHONE = {"kal_diphone": (105.0, 14.0), "ked_diphone": (105.0, 15.0)}  # F0 mean, sd
_FESTIVAL_STRETCH = 1.1  # both diphone voices' own Duration_Stretch


class FestivalEngine(Engine):
    name, program, env, hint, error = ("festival", "text2wave", "ZEROMASK_FESTIVAL_TEXT2WAVE",
                                       FESTIVAL_HINT, FestivalNotFound)
    default_voices = FESTIVAL_VOICES

    def voices(self, binary: Optional[str] = None) -> List[str]:
        res = _run([binary or self.binary(), "-eval", "(begin (print (voice.list)) (quit))",
                    os.devnull], "festival (voice.list)")
        have = set(re.findall(r"[A-Za-z0-9_]+", res.stdout))
        return [v for v in FESTIVAL_VOICES if v in have]

    def native(self, voice, speed, pitch):
        if voice in _FESTIVAL_DIPHONE:
            mean, sd = _FESTIVAL_DIPHONE[voice]
            r = _semitones(pitch)
            return {"Duration_Stretch": round(_FESTIVAL_STRETCH / speed, 4),
                    "target_f0_mean": round(mean * r, 2), "target_f0_std": round(sd * r, 2)}
        r = _semitones(pitch)  # HTS: resampled by r afterwards, so synthesize r times slower
        return {"hts_r": round(speed / r, 4), "resample_pitch_st": round(pitch, 3)}

    def render(self, text, voice, *, speed=1.0, pitch=0.0, sample_rate=16000, binary=None, **_):
        a = self.native(voice, speed, pitch)
        if "hts_r" in a:
            params = f"(set! hts_engine_params (append hts_engine_params '((\"-r\" {a['hts_r']}))))"
        else:
            params = (f"(begin (Parameter.set 'Duration_Stretch {a['Duration_Stretch']}) "
                      f"(set! int_lr_params '((target_f0_mean {a['target_f0_mean']}) "
                      f"(target_f0_std {a['target_f0_std']}) (model_f0_mean 170) "
                      f"(model_f0_std 34))))")
        with tempfile.TemporaryDirectory(prefix="zeromask-festival-") as tmp:
            txt, out = os.path.join(tmp, "u.txt"), os.path.join(tmp, "u.wav")
            Path(txt).write_text(text + "\n", encoding="utf-8")
            res = _run([binary or self.binary(), "-eval", f"(voice_{voice})", "-eval", params,
                        txt, "-o", out], f"festival (voice {voice!r})")
            err = (res.stdout + res.stderr).strip()
            if "SIOD ERROR" in err or not os.path.exists(out):  # festival exits 0 on errors
                raise RuntimeError(f"festival failed for voice {voice!r}: {err}")
            return _read_wav(out, sample_rate, _semitones(a.get("resample_pitch_st", 0.0)))


ENGINES: Dict[str, Engine] = {e.name: e for e in (EspeakEngine(), FliteEngine(),
                                                  FestivalEngine())}


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {sorted(ENGINES)}") from None


def render(engine: str, text: str, voice: str, *, speed: float = 1.0, pitch: float = 0.0,
           sample_rate: int = 16000, binary: Optional[str] = None, **extra) -> np.ndarray:
    """``text`` spoken by ``voice`` of ``engine`` (see :class:`Engine`); float32 mono."""
    return get_engine(engine).render(text, voice, speed=speed, pitch=pitch,
                                     sample_rate=sample_rate, binary=binary, **extra)


def flite_binary() -> str:
    """Path of flite (``ZEROMASK_FLITE`` or PATH), else :class:`FliteNotFound`."""
    return ENGINES["flite"].binary()


def festival_binary() -> str:
    """Path of text2wave (``ZEROMASK_FESTIVAL_TEXT2WAVE`` or PATH), else :class:`FestivalNotFound`."""
    return ENGINES["festival"].binary()


# ---------------------------------------------------------------------------- plans
def _uniform(rng: random.Random, lo_hi, nd: int = 3) -> float:
    return round(rng.uniform(*lo_hi), nd)


def _outside(rng: random.Random, sides) -> float:
    return _uniform(rng, sides[rng.randrange(len(sides))])


def _augment_plan(rng: random.Random, noise: bool, reverb: bool, snr, rt60) -> Optional[dict]:
    if not (noise or reverb):
        return None
    return {"kind": "+".join(k for k, on in (("reverb", reverb), ("noise", noise)) if on),
            "reverb": {"rt60": _uniform(rng, rt60)} if reverb else None,
            "noise": ({"color": rng.choice(aug.NOISE_COLORS), "snr_db": _uniform(rng, snr, 2)}
                      if noise else None),
            "seed": rng.randrange(2 ** 31)}


def _utterance(rng: random.Random, split: str, file: str, text: str, engine: str, voice: str,
               speed: float, pitch: float, augment: Optional[dict]) -> dict:
    nwords = len(text.split())
    breaks = [[j, rng.randint(150, 600)] for j in range(1, nwords) if rng.random() < 0.12]
    pitch_range = rng.randint(40, 160)
    espeak = engine == "espeak-ng"
    return {
        "split": split, "file": file, "text": text, "engine": engine, "voice": voice,
        "speed": speed, "pitch": pitch,
        "engine_args": get_engine(engine).native(voice, speed, pitch),
        "pitch_range": pitch_range if espeak else None,
        "breaks": breaks if espeak else [],
        "lead_s": round(rng.uniform(0.05, 0.6), 3),
        "trail_s": round(rng.uniform(0.05, 0.6), 3),
        "gain": round(rng.uniform(0.3, 0.95), 3),
        "augment": augment,
    }


def _pick(rng: random.Random, items: Sequence[int], fraction: float) -> set:
    k = min(len(items), max(0, int(round(len(items) * fraction))))
    return set(rng.sample(list(items), k))


def _balanced(rng: random.Random, voices_: Sequence[str], k: int) -> List[str]:
    out = [voices_[i % len(voices_)] for i in range(k)]
    rng.shuffle(out)
    return out


def plan_dataset(n: int, *, test_fraction: float = 0.1, seed: int = 0,
                 train_voices: Sequence[str], test_voices: Sequence[str],
                 flite_voices: Sequence[str] = (), flite_fraction: float = 0.3,
                 augment_fraction: float = 0.5, n_shifted: int = 0,
                 festival_voices: Sequence[str] = (), heldout_voices: Sequence[str] = (),
                 train_ranges: TrainRanges = TRAIN_RANGES["narrow"]) -> List[dict]:
    """Every utterance's plan (what :func:`make_dataset` renders), deterministic in ``seed``.

    ``train_voices``/``test_voices``: espeak-ng voices; ``flite_voices`` used for
    ``flite_fraction`` of the training utterances (none when empty); ``festival_voices``
    and ``heldout_voices`` (espeak-ng voices of the held-out family) share the ``n_shifted``
    shifted utterances half and half (all to one side when the other has no voices).
    ``train_ranges`` (:data:`TRAIN_RANGES`) sets train/'s speed, pitch, SNR and RT60 ranges;
    the random draws are the same for every choice, so test/ and shifted/ do not change.
    """
    gen = SentenceGenerator(seed)
    rng = random.Random(seed + 1)
    n_test = min(n - 1, max(1, round(n * test_fraction))) if n > 1 else 0
    n_train = n - n_test
    rng_choice = random.Random(f"zeromask-train-choices-{seed}")
    flite_idx = _pick(rng_choice, range(n_train), flite_fraction) if flite_voices else set()
    aug_idx = _pick(rng_choice, range(n_train), augment_fraction)
    rng_aug = random.Random(f"zeromask-train-augment-{seed}")
    plans = []
    for i in range(n):
        split = "test" if i >= n_train else "train"
        text = gen.sentence()
        if i in flite_idx:
            engine, voice = "flite", rng.choice(list(flite_voices))
        else:
            engine, voice = "espeak-ng", rng.choice(list(test_voices if split == "test"
                                                         else train_voices))
        augment = None
        if i in aug_idx:
            kind = rng_aug.choice(("noise", "reverb", "reverb+noise"))
            augment = _augment_plan(rng_aug, "noise" in kind, "reverb" in kind,
                                    train_ranges.snr_db, train_ranges.rt60)
        ranges = train_ranges if split == "train" else TRAIN_RANGES["narrow"]
        speed, pitch = _uniform(rng, ranges.speed), _uniform(rng, ranges.pitch, 2)
        plans.append(_utterance(rng, split, f"{split}/{i:06d}", text, engine, voice, speed,
                                pitch, augment))
    if n_shifted > 0:
        if not festival_voices and not heldout_voices:
            raise ValueError("the shifted set needs festival voices or held-out espeak voices")
        seen = {p["text"] for p in plans if p["split"] == "train"}
        gen_s = SentenceGenerator(f"zeromask-shifted-{seed}")
        rng_s = random.Random(f"zeromask-shifted-{seed}")
        n_fest = (n_shifted if not heldout_voices else 0 if not festival_voices
                  else int(round(n_shifted / 2)))
        fest_idx = set(rng_s.sample(range(n_shifted), n_fest))
        fest_v = iter(_balanced(rng_s, list(festival_voices), n_fest))
        for j in range(n_shifted):
            text = gen_s.sentence()
            for _ in range(1000):  # never a sentence the model was trained on
                if text not in seen:
                    break
                text = gen_s.sentence()
            if j in fest_idx:
                engine, voice = "festival", next(fest_v)
            else:
                engine, voice = "espeak-ng", rng_s.choice(list(heldout_voices))
            augment = _augment_plan(rng_s, rng_s.random() < SHIFTED_AUGMENT_P,
                                    rng_s.random() < SHIFTED_AUGMENT_P, SHIFTED_SNR_DB,
                                    SHIFTED_RT60)
            speed, pitch = _outside(rng_s, SHIFTED_SPEED), round(_outside(rng_s, SHIFTED_PITCH), 2)
            plans.append(_utterance(rng_s, "shifted", f"shifted/{j:06d}", text, engine, voice,
                                    speed, pitch, augment))
    return plans


def manifest_labels(folder, fields: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """``{field: {utterance id: value}}`` of manifest fields, for the utterances of
    ``folder`` (a split of a :func:`make_dataset` output, e.g. ``OUT/shifted``), read once
    from ``folder/../manifest.jsonl``; ids as :func:`zeromask.data.find_utterances` gives
    them.

    A field is any manifest key (``engine``, ``voice``, ``speed``, ...); ``augment`` gives
    the augmentation's kind (``noise``, ``reverb``, ``reverb+noise`` or ``none``); ``a/b``
    crosses two fields (values ``"x/y"``). Raises FileNotFoundError without a manifest,
    ValueError for a field no record has.
    """
    folder = Path(folder).resolve()
    manifest = folder.parent / "manifest.jsonl"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} does not exist: grouping by a field needs the "
                                "manifest zeromask-make-data writes beside the split folders")
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    keys = {k for rec in records for k in rec}
    parts = {field: field.split("/") for field in fields}
    for field, names in parts.items():
        missing = [n for n in names if n not in keys]
        if missing:
            raise ValueError(f"no manifest record of {manifest} has a field {missing[0]!r}")

    def value(rec: dict, name: str) -> str:
        v = rec.get(name)
        if name == "augment":
            v = (v or {}).get("kind")
        return "none" if v is None else str(v)

    prefix = folder.name + "/"
    mine = [(rec["file"][len(prefix):], rec) for rec in records
            if rec.get("file", "").startswith(prefix)]
    return {field: {uid: "/".join(value(rec, n) for n in names) for uid, rec in mine}
            for field, names in parts.items()}


def plan_id(plan: dict, sample_rate: int) -> str:
    """A digest of what an utterance's audio depends on (its plan, the rate, the renderer)."""
    key = {k: v for k, v in plan.items() if k not in ("seconds", "plan_id")}
    blob = json.dumps([key, sample_rate, _RENDER_VERSION], sort_keys=True)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------- rendering
def render_utterance(plan: dict, sample_rate: int = 16000,
                     binaries: Optional[Dict[str, str]] = None) -> Tuple[np.ndarray, dict]:
    """(audio, augmentation record) of one plan: speech, gain, silences, augmentation."""
    eng = get_engine(plan["engine"])
    extra = {}
    if plan["engine"] == "espeak-ng":
        extra = {"pitch_range": plan["pitch_range"], "breaks": plan["breaks"]}
    wav = eng.render(plan["text"], plan["voice"], speed=plan["speed"], pitch=plan["pitch"],
                     sample_rate=sample_rate, binary=(binaries or {}).get(eng.name), **extra)
    peak = float(np.abs(wav).max()) if len(wav) else 0.0
    if peak <= 0:
        raise RuntimeError(f"{plan['engine']} voice {plan['voice']!r} produced silence for "
                           f"{plan['text']!r}")
    wav = wav / peak * plan["gain"]
    lead = int(plan["lead_s"] * sample_rate)
    trail = int(plan["trail_s"] * sample_rate)
    wav = np.concatenate([np.zeros(lead, np.float32), wav, np.zeros(trail, np.float32)])
    a = plan.get("augment")
    record = None
    if a:
        record = json.loads(json.dumps(a))
        rng = np.random.default_rng(a["seed"])
        if a.get("reverb"):
            wav, rir = aug.reverberate(wav, a["reverb"]["rt60"], rng, sample_rate=sample_rate)
            wav = wav / float(np.abs(wav).max()) * plan["gain"]
            record["reverb"]["drr_db"] = round(aug.direct_to_reverberant_db(rir), 2)
        if a.get("noise"):
            speech = wav[lead: len(wav) - trail]
            wav = aug.add_noise(wav, a["noise"]["snr_db"], a["noise"]["color"], rng,
                                ref_power=float(np.mean(speech.astype(np.float64) ** 2)),
                                sample_rate=sample_rate)
        peak = float(np.abs(wav).max())
        if peak > 0.99:  # keep clear of clipping (scales speech and noise alike: same SNR)
            wav = wav * (0.99 / peak)
    return wav.astype(np.float32), record


class _Writer:
    """Renders plans into files and journals each one as it finishes (thread-safe)."""

    def __init__(self, out: Path, sample_rate: int, binaries: Dict[str, str], journal: Path):
        self.out, self.sample_rate, self.binaries = out, sample_rate, binaries
        self.journal = journal
        self.lock = threading.Lock()

    def __call__(self, plan: dict) -> dict:
        import soundfile as sf
        wav, record = render_utterance(plan, self.sample_rate, self.binaries)
        base = self.out / plan["file"]
        tmp_wav = base.with_name(f".{base.name}.wav.part")
        tmp_txt = base.with_name(f".{base.name}.txt.part")
        sf.write(str(tmp_wav), wav, self.sample_rate, subtype="PCM_16", format="WAV")
        tmp_txt.write_text(plan["text"] + "\n", encoding="utf-8")
        os.replace(tmp_txt, base.with_suffix(".txt"))
        os.replace(tmp_wav, base.with_suffix(".wav"))
        done = dict(plan, augment=record, seconds=round(len(wav) / self.sample_rate, 3),
                    plan_id=plan_id(plan, self.sample_rate))
        with self.lock:
            with open(self.journal, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(done) + "\n")
        return done


def _previous(out: Path, journal: Path) -> Dict[str, dict]:
    """Records of utterances finished by an earlier run (manifest, then the journal)."""
    prev = {}
    for path in (out / "manifest.jsonl", journal):
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                prev[rec["file"]] = rec
            except (ValueError, KeyError, TypeError):  # a line cut short by an interruption
                continue
    return prev


class DatasetResult(list):
    """The manifest records (a list, in plan order), plus ``rendered`` / ``reused`` /
    ``removed`` counts: utterances rendered now, kept from an earlier run, and stale files
    of an earlier, different run deleted."""

    rendered = reused = removed = 0


_NAME = re.compile(r"^(\d{6}\.(wav|txt)|\.\d{6}\.(wav|txt)\.part)$")


def make_dataset(out, n: int, *, test_fraction: float = 0.1, voice_test_fraction: float = 0.15,
                 seed: int = 0, sample_rate: int = 16000, jobs: Optional[int] = None,
                 progress: bool = False, engines: Sequence[str] = TRAIN_ENGINES,
                 flite_fraction: float = 0.3, flite_voices: Sequence[str] = FLITE_VOICES,
                 augment_fraction: float = 0.5, n_shifted: Optional[int] = None,
                 festival_voices: Sequence[str] = FESTIVAL_VOICES,
                 heldout_accents: Sequence[str] = HELDOUT_ACCENTS,
                 train_ranges: str = "narrow") -> DatasetResult:
    """Write ``n`` train+test utterances and ``n_shifted`` shifted ones under ``out`` (see
    the module doc); returns the manifest records.

    ``engines``: the training engines (``espeak-ng`` required; ``flite`` optional; festival
    is reserved for the shifted set). ``train_ranges``: a key of :data:`TRAIN_RANGES`.
    ``n_shifted`` defaults to ``max(50, round(0.1 * n))``;
    0 makes no shifted set (and needs no festival). Raises :class:`EngineNotFound`
    (:class:`EspeakNotFound`, :class:`FliteNotFound`, :class:`FestivalNotFound`) before
    writing anything where a needed engine is missing. Resumable (see the module doc).
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    engines = list(dict.fromkeys(engines))
    for e in engines:
        get_engine(e)
    if "espeak-ng" not in engines:
        raise ValueError("engines must include espeak-ng (the test split is espeak-ng)")
    if "festival" in engines:
        raise ValueError("festival is reserved for the shifted set; train engines are "
                         f"{list(TRAIN_ENGINES)}")
    if not 0 <= flite_fraction <= 1 or not 0 <= augment_fraction <= 1:
        raise ValueError("flite_fraction and augment_fraction must be in [0, 1]")
    if train_ranges not in TRAIN_RANGES:
        raise ValueError(f"train_ranges must be one of {sorted(TRAIN_RANGES)}, "
                         f"got {train_ranges!r}")
    n_shifted = max(50, round(0.1 * n)) if n_shifted is None else int(n_shifted)
    if n_shifted < 0:
        raise ValueError("n_shifted must be >= 0")
    binaries = {"espeak-ng": espeak_binary()}
    use_flite = "flite" in engines and flite_fraction > 0
    if use_flite:
        binaries["flite"] = flite_binary()
    if n_shifted > 0:
        binaries["festival"] = festival_binary()

    all_espeak = voices(binaries["espeak-ng"])
    heldout = [v for v in all_espeak if v.split("+")[0] in heldout_accents]
    in_domain = [v for v in all_espeak if v.split("+")[0] not in heldout_accents]
    train_v, test_v = split_voices(in_domain, voice_test_fraction, seed)
    fl_voices: List[str] = []
    if use_flite:
        have = ENGINES["flite"].voices(binaries["flite"])
        missing = [v for v in flite_voices if v not in have]
        if missing:
            raise ValueError(f"flite has no voice(s) {missing}; it has {have}")
        fl_voices = list(flite_voices)
    fe_voices: List[str] = []
    if n_shifted > 0:
        have = ENGINES["festival"].voices(binaries["festival"])
        missing = [v for v in festival_voices if v not in have]
        if missing:
            pkgs = " ".join(FESTIVAL_VOICE_PACKAGES.get(v, v) for v in missing)
            raise FestivalNotFound(f"festival voice(s) {missing} are not installed: "
                                   f"`apt-get install -y {pkgs}` (or --no-shifted)")
        fe_voices = list(festival_voices)
    plans = plan_dataset(n, test_fraction=test_fraction, seed=seed, train_voices=train_v,
                         test_voices=test_v, flite_voices=fl_voices,
                         flite_fraction=flite_fraction, augment_fraction=augment_fraction,
                         n_shifted=n_shifted, festival_voices=fe_voices,
                         heldout_voices=heldout, train_ranges=TRAIN_RANGES[train_ranges])
    tok = CharTokenizer()
    for p in plans:  # the generator only emits alphabet characters; keep it that way
        assert tok.normalize(p["text"]) == p["text"], p["text"]

    out = Path(out)
    splits = sorted({p["split"] for p in plans} | {"train", "test"})
    for split in splits:
        (out / split).mkdir(parents=True, exist_ok=True)
    with _locked(out):
        return _write(out, plans, sample_rate, binaries, jobs, progress)


@contextlib.contextmanager
def _locked(out: Path):
    """Hold ``OUT/.make-data.lock``: one make-data run per folder at a time."""
    with open(out / ".make-data.lock", "w") as fh:
        try:
            import fcntl
        except ImportError:  # no advisory locks here (Windows): trust the user
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"another zeromask-make-data is writing {out}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write(out: Path, plans: List[dict], sample_rate: int, binaries: Dict[str, str],
           jobs: Optional[int], progress: bool) -> DatasetResult:
    journal = out / ".make-data.journal"
    wanted = {p["file"] for p in plans}
    result = DatasetResult()
    for split in ("train", "test", "shifted"):  # files of an earlier run with another n
        d = out / split
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if not _NAME.match(f.name):
                continue
            if f.name.startswith("."):  # half-written by an interrupted run
                f.unlink()
            elif f"{split}/{f.stem}" not in wanted:
                f.unlink()
                result.removed += f.suffix == ".wav"
    prev = _previous(out, journal)
    done: Dict[str, dict] = {}
    todo = []
    for p in plans:
        rec = prev.get(p["file"])
        base = out / p["file"]
        if (rec is not None and rec.get("plan_id") == plan_id(p, sample_rate)
                and base.with_suffix(".wav").exists() and base.with_suffix(".txt").exists()):
            done[p["file"]] = rec
        else:
            todo.append(p)
    result.reused = len(done)
    # the journal restarts from what is known good, then grows as utterances finish
    with open(journal, "w", encoding="utf-8") as fh:
        for rec in done.values():
            fh.write(json.dumps(rec) + "\n")
    jobs = jobs or min(8, os.cpu_count() or 1)
    writer = _Writer(out, sample_rate, binaries, journal)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plans), initial=len(done), desc="make-data", unit="utt")
    pool = ThreadPoolExecutor(jobs)  # the engines run as subprocesses
    try:
        futures = [pool.submit(writer, p) for p in todo]
        for fut in as_completed(futures):
            rec = fut.result()
            done[rec["file"]] = rec
            if bar is not None:
                bar.update(1)
    except BaseException:  # a failed render or an interrupt: stop queued work, keep finished
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
    result.rendered = len(todo)
    result.extend(done[p["file"]] for p in plans)
    tmp = out / "manifest.jsonl.part"
    with open(tmp, "w", encoding="utf-8") as fh:
        for d in result:
            fh.write(json.dumps(d) + "\n")
    os.replace(tmp, out / "manifest.jsonl")
    journal.unlink()
    return result


__all__ = ["make_dataset", "plan_dataset", "render_utterance", "plan_id", "DatasetResult",
           "synthesize", "render", "get_engine", "Engine", "ENGINES", "voices", "split_voices",
           "espeak_binary", "flite_binary", "festival_binary", "EngineNotFound",
           "EspeakNotFound", "FliteNotFound", "FestivalNotFound", "ACCENTS", "HELDOUT_ACCENTS",
           "VARIANTS", "FLITE_VOICES", "FESTIVAL_VOICES", "TRAIN_ENGINES", "TRAIN_SPEED",
           "TRAIN_PITCH", "SHIFTED_SPEED", "SHIFTED_PITCH", "TRAIN_SNR_DB", "TRAIN_RT60",
           "WIDE_SNR_DB", "WIDE_RT60",
           "SHIFTED_SNR_DB", "SHIFTED_RT60", "INSTALL_HINT", "FLITE_HINT", "FESTIVAL_HINT"]
