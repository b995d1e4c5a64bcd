"""zeromask.data: tokenizer, sentence generator, loaders, collate, augmentation, make-data
(espeak-ng, flite and festival engines; train/test/shifted splits; resume)."""
import json
import shutil

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")
pytest.importorskip("librosa")

from zeromask import zero  # noqa: E402
from zeromask.cli import make_data as make_data_cli  # noqa: E402
from zeromask.data import (VOCABULARY, CharTokenizer, EspeakNotFound,  # noqa: E402
                           SentenceGenerator, SpeechDataset, collate, find_utterances,
                           load_folder, load_librispeech, split_voices)
from zeromask.data import augment, synth  # noqa: E402

SR = 16000
HAVE_ESPEAK = shutil.which("espeak-ng") is not None
HAVE_FLITE = shutil.which("flite") is not None
HAVE_FESTIVAL = shutil.which("text2wave") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed "
                                  "(apt-get install -y espeak-ng); make-data needs it")
needs_flite = pytest.mark.skipif(not HAVE_FLITE, reason="flite is not installed "
                                 "(apt-get install -y flite)")
needs_festival = pytest.mark.skipif(not HAVE_FESTIVAL, reason="festival is not installed (apt-get "
                                    "install -y festival festvox-kallpc16k festvox-kdlpc16k "
                                    "festvox-us-slt-hts)")


def tone(seconds=0.4, hz=150.0, lead=0.1):
    t = np.arange(int(seconds * SR)) / SR
    return np.concatenate([np.zeros(int(lead * SR)), 0.4 * np.sin(2 * np.pi * hz * t)]
                          ).astype(np.float32)


# ---------------------------------------------------------------------------- text
def test_tokenizer_reserves_zero_and_round_trips():
    tok = CharTokenizer()
    ids = tok.encode("Hello,  World! It's Émile")
    assert 0 not in ids and min(ids) >= 1 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "hello world it's emile"
    assert tok.decode(ids[:3] + [0] + ids[3:]) == "hel"  # 0 = end
    assert CharTokenizer.from_json(tok.to_json()).encode("abc") == tok.encode("abc")
    assert tok.vocab_size == len(" abcdefghijklmnopqrstuvwxyz'") + 1
    with pytest.raises(ValueError):
        CharTokenizer("aab ")


def test_sentence_generator_vocabulary():
    assert 200 <= len(VOCABULARY) <= 600
    vocab = set(VOCABULARY)
    a = SentenceGenerator(seed=3).sentences(200)
    assert a == SentenceGenerator(seed=3).sentences(200)
    assert a != SentenceGenerator(seed=4).sentences(200)
    words = [w for s in a for w in s.split()]
    assert set(words) <= vocab
    assert len(set(words)) > 150  # the sentences actually use the vocabulary
    assert all(3 <= len(s.split()) <= 14 for s in a)
    tok = CharTokenizer()
    assert all(tok.normalize(s) == s for s in a)


def test_split_voices_is_disjoint():
    vs = [f"en-us+v{i}" for i in range(20)]
    tr, te = split_voices(vs, 0.2, seed=1)
    assert not set(tr) & set(te) and set(tr) | set(te) == set(vs) and len(te) == 4
    assert split_voices(vs, 0.2, seed=1) == (tr, te)


# ---------------------------------------------------------------------------- loaders
def test_folder_loader_and_collate(tmp_path):
    (tmp_path / "sub").mkdir()
    texts = {"a": "one fox", "sub/b": "The Red HOUSE", "c": "no transcript"}
    for name, text in texts.items():
        sf.write(str(tmp_path / f"{name}.wav"), tone(0.3 + 0.2 * len(name)), SR)
        if name != "c":
            (tmp_path / f"{name}.txt").write_text(text + "\n")
    utts = load_folder(tmp_path)
    assert [u.id for u in utts] == ["a", "sub/b"]
    assert [u.text for u in utts] == ["one fox", "The Red HOUSE"]
    assert find_utterances(tmp_path) == utts
    tok = CharTokenizer()
    ds = SpeechDataset(utts, tok, cache_dir=tmp_path / "cache")
    items = [ds[0], ds[1]]
    assert items[1]["text"] == "the red house"
    b = collate(items)
    B, T = 2, max(i["spectrogram"].shape[0] for i in items)
    assert b["spectrogram"].shape == (B, T, 80) and b["pitch"].shape == (B, T, 3)
    assert b["waveform"].shape == (B, T, 160) and b["f0"].shape == (B, T)
    n0 = items[0]["spectrogram"].shape[0]
    assert b["frame_lengths"].tolist() == [n0, T]
    # padding frames are exact zeros -> zero tokens
    z = zero.from_audio(b["spectrogram"], b["spectrogram"])
    assert z[0, n0:].all() and not z[0, n0 // 2 + 5]
    # text: input = [0, ids], labels = [ids, 0], padding ignored
    ids = tok.encode("one fox")
    assert b["input_ids"][0, : len(ids) + 1].tolist() == [0] + ids
    assert b["labels"][0, : len(ids) + 1].tolist() == ids + [0]
    assert (b["labels"][0, len(ids) + 1:] == -100).all()
    assert (b["input_ids"][0, len(ids) + 1:] == 0).all()
    assert b["input_ids"].shape == b["labels"].shape == (2, len(tok.encode("the red house")) + 1)
    # padded to a multiple of 32 frames: same content, exact zeros after, true lengths kept
    b32 = collate(items, pad_multiple=32)
    T32 = b32["spectrogram"].shape[1]
    assert T32 % 32 == 0 and T <= T32 < T + 32
    for k in ("spectrogram", "waveform", "pitch", "f0"):
        assert torch.equal(b32[k][:, :T], b[k]) and (b32[k][:, T:] == 0).all()
    assert b32["frame_lengths"].tolist() == [n0, T]
    assert torch.equal(b32["labels"], b["labels"])
    with pytest.raises(ValueError, match="pad_multiple"):
        collate(items, pad_multiple=0)


def test_librispeech_loader(tmp_path):
    chap = tmp_path / "103" / "1240"
    chap.mkdir(parents=True)
    lines = {"103-1240-0000": "CHAPTER ONE MISSUS RACHEL", "103-1240-0001": "THAT HAD ITS SOURCE"}
    for uid in lines:
        sf.write(str(chap / f"{uid}.flac"), tone(0.5), SR)
    (chap / "103-1240.trans.txt").write_text(
        "".join(f"{k} {v}\n" for k, v in lines.items()) + "103-1240-0002 MISSING AUDIO\n")
    utts = find_utterances(tmp_path)
    assert [(u.id, u.text) for u in utts] == list(lines.items())
    assert utts == load_librispeech(tmp_path)
    assert utts[0].audio.endswith(".flac")
    ds = SpeechDataset(utts, CharTokenizer())
    item = ds[1]
    assert item["text"] == "that had its source"
    assert item["spectrogram"].shape[0] == 1 + int(0.6 * SR) // 160


def test_find_utterances_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_utterances(tmp_path / "nope")
    with pytest.raises(ValueError, match="no labelled utterances"):
        find_utterances(tmp_path)


# ---------------------------------------------------------------------------- augmentation
def _sine(seconds=1.0, hz=1000.0, amp=0.5):
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("color", augment.NOISE_COLORS)
@pytest.mark.parametrize("snr", [10.0, 20.0, 35.0])
def test_noise_reaches_the_asked_snr(color, snr):
    # the SNR is estimated from the noisy signal alone: the sine sits exactly on FFT bin
    # 1000 (1 s at 16 kHz), so that bin holds the sine and the rest of the power is noise
    x = _sine()
    y = augment.add_noise(x, snr, color, rng=3).astype(np.float64)
    spec = np.fft.rfft(y)
    p_sine = 2 * np.abs(spec[1000]) ** 2 / len(y) ** 2
    p_noise = np.mean(y ** 2) - p_sine
    assert abs(10 * np.log10(p_sine / p_noise) - snr) < 1.0
    assert y.dtype == np.float64 and len(y) == len(x)


def test_noise_covers_silences_at_the_speech_snr():
    # the pipeline's use: a clip with silent edges; the SNR is set against the speech part,
    # and the noise (measured where the clip was silent) is that far below it
    x = np.concatenate([np.zeros(SR), _sine(1.0, 440.0, 0.3), np.zeros(SR)])
    speech = x[SR: 2 * SR]
    for color, snr in (("white", 12.0), ("pink", 25.0), ("brown", 18.0)):
        y = augment.add_noise(x, snr, color, rng=1, ref_power=float(np.mean(speech ** 2)))
        silence = np.concatenate([y[:SR], y[2 * SR:]]).astype(np.float64)
        measured = 10 * np.log10(np.mean(speech ** 2) / np.mean(silence ** 2))
        assert abs(measured - snr) < 1.0, (color, measured)
    with pytest.raises(ValueError, match="color"):
        augment.colored_noise(10, "green")


def test_noise_colors_have_their_slopes():
    # octave-band power: white rises 3 dB per octave, pink is flat, brown falls 3 dB
    f = np.fft.rfftfreq(4 * SR, 1 / SR)
    for color, slope in (("white", 3.0), ("pink", 0.0), ("brown", -3.0)):
        p = np.abs(np.fft.rfft(augment.colored_noise(4 * SR, color, 0))) ** 2
        bands = [10 * np.log10(p[(f >= lo) & (f < 2 * lo)].sum()) for lo in (125, 250, 500,
                                                                            1000, 2000, 4000)]
        fit = np.polyfit(np.arange(6), bands, 1)[0]
        assert abs(fit - slope) < 0.6, (color, fit)


@pytest.mark.parametrize("rt60", [0.1, 0.25, 0.4, 0.6])
def test_reverb_decays_at_the_asked_rt60(rt60):
    rir = augment.synthetic_rir(rt60, SR, rng=7)
    assert rir[0] == 1.0 and len(rir) == int(round(rt60 * SR))
    assert abs(augment.estimate_rt60(rir, SR) - rt60) < 0.12 * rt60
    # convolution applies it: an impulse comes back as the RIR, a tone burst keeps ringing
    # after it stops, and that ringing decays at the asked rate
    imp = np.zeros(SR, np.float32)
    imp[100] = 1.0
    y, h = augment.reverberate(imp, rt60, rng=7)
    assert len(y) == SR and np.allclose(y[100: 100 + len(h)], h[: SR - 100], atol=1e-6)
    burst = np.concatenate([np.random.default_rng(0).standard_normal(SR // 2),
                            np.zeros(SR)]).astype(np.float32)
    y, _ = augment.reverberate(burst, rt60, rng=2)
    assert len(y) == len(burst)
    win = SR // 100  # 10 ms energy windows after the burst's end
    after = y[SR // 2 + win: SR // 2 + int(0.6 * rt60 * SR)].astype(np.float64)
    e = 10 * np.log10([np.mean(after[i: i + win] ** 2) for i in range(0, len(after) - win, win)])
    slope = np.polyfit(np.arange(len(e)) * win / SR, e, 1)[0]  # dB per second
    assert abs(-60 / slope - rt60) < 0.25 * rt60


# ---------------------------------------------------------------------------- engines
WORD = "window"
ENGINE_VOICES = ([("espeak-ng", "en-us+m3", HAVE_ESPEAK)]
                 + [("flite", v, HAVE_FLITE) for v in synth.FLITE_VOICES]
                 + [("festival", v, HAVE_FESTIVAL) for v in synth.FESTIVAL_VOICES])


def _median_f0(wav):
    from zeromask.audio import extract_features
    f0 = extract_features(wav, SR)["f0"]
    return float(np.median(f0[f0 > 0]))


@pytest.mark.parametrize("engine,voice,have", ENGINE_VOICES,
                         ids=[f"{e}-{v}" for e, v, _ in ENGINE_VOICES])
def test_engine_renders_a_word(engine, voice, have):
    if not have:
        pytest.skip(f"{engine} is not installed ({synth.get_engine(engine).hint})")
    wav = synth.render(engine, WORD, voice)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert 0.2 < len(wav) / SR < 2.0  # 16 kHz: a word's length in seconds
    assert np.sqrt(np.mean(wav.astype(np.float64) ** 2)) > 0.01 and np.abs(wav).max() <= 1.0
    # speed and pitch do what they say: half the speed about doubles the length, and
    # +-5 semitones moves the F0 by about 2^(+-5/12) = 1.33x
    slow = synth.render(engine, WORD, voice, speed=0.6)
    fast = synth.render(engine, WORD, voice, speed=1.5)
    assert 1.7 < len(slow) / len(fast) < 3.3
    lo = _median_f0(synth.render(engine, WORD, voice, pitch=-5.0))
    hi = _median_f0(synth.render(engine, WORD, voice, pitch=5.0))
    assert 1.5 < hi / lo < 2.4, (lo, hi)


def test_engines_report_missing_binaries(monkeypatch):
    monkeypatch.setenv("ZEROMASK_FLITE", "/nonexistent/flite")
    monkeypatch.setenv("ZEROMASK_FESTIVAL_TEXT2WAVE", "/nonexistent/text2wave")
    with pytest.raises(synth.FliteNotFound, match="apt-get install -y flite"):
        synth.flite_binary()
    with pytest.raises(synth.FestivalNotFound, match="festvox-kallpc16k"):
        synth.festival_binary()
    assert issubclass(EspeakNotFound, synth.EngineNotFound)
    with pytest.raises(ValueError, match="unknown engine"):
        synth.get_engine("say")


# ---------------------------------------------------------------------------- plans
def _big_plan(n=400, n_shifted=100, **kw):
    train_v = [f"en-us+v{i}" for i in range(20)]
    test_v = [f"en-gb+v{i}" for i in range(5)]
    heldout = [f"{a}+v{i}" for a in synth.HELDOUT_ACCENTS for i in range(6)]
    return synth.plan_dataset(n, seed=3, train_voices=train_v, test_voices=test_v,
                              flite_voices=synth.FLITE_VOICES, n_shifted=n_shifted,
                              festival_voices=synth.FESTIVAL_VOICES, heldout_voices=heldout,
                              **kw), train_v, test_v, heldout


def test_wide_train_ranges_cover_shifted_and_leave_test_and_shifted_unchanged():
    narrow = _big_plan()[0]
    wide = _big_plan(train_ranges=synth.TRAIN_RANGES["wide"])[0]
    assert ([p for p in wide if p["split"] != "train"]
            == [p for p in narrow if p["split"] != "train"])
    tr = [p for p in wide if p["split"] == "train"]
    w = synth.TRAIN_RANGES["wide"]
    sh = [p for p in wide if p["split"] == "shifted"]
    for p in tr:
        assert w.speed[0] <= p["speed"] <= w.speed[1] and w.pitch[0] <= p["pitch"] <= w.pitch[1]
        a = p["augment"]
        if a and a["noise"]:
            assert w.snr_db[0] <= a["noise"]["snr_db"] <= w.snr_db[1]
        if a and a["reverb"]:
            assert w.rt60[0] <= a["reverb"]["rt60"] <= w.rt60[1]
    for p in sh:  # shifted/'s prosody and rooms lie inside the wide training ranges
        assert w.speed[0] <= p["speed"] <= w.speed[1] and w.pitch[0] <= p["pitch"] <= w.pitch[1]
    assert sum(not synth.TRAIN_SPEED[0] <= p["speed"] <= synth.TRAIN_SPEED[1] for p in tr) > 100
    assert [p["text"] for p in tr] == [p["text"] for p in narrow if p["split"] == "train"]
    with pytest.raises(ValueError, match="train_ranges"):
        synth.make_dataset("/nonexistent", 10, train_ranges="huge")


def test_train_ranges_option_is_written_from_the_ranges_table(monkeypatch):
    """--train-ranges' choices and help come from synth.TRAIN_RANGES: an entry added there
    (or a range changed) shows in the CLI without a second list to keep in step."""
    monkeypatch.setitem(synth.TRAIN_RANGES, "studio",
                        synth.TrainRanges((0.9, 1.1), (-1.0, 1.0), (40.0, 50.0), (0.05, 0.15)))
    action = next(a for a in make_data_cli.build_parser()._actions
                  if "--train-ranges" in a.option_strings)
    assert tuple(action.choices) == tuple(synth.TRAIN_RANGES)
    assert "studio = speed 0.9 to 1.1x" in action.help and "SNR 40 to 50 dB" in action.help
    assert "narrow = speed 0.75 to 1.25x" in action.help


def test_rooms_train_ranges_widen_only_noise_and_reverberation():
    narrow = _big_plan()[0]
    rooms = _big_plan(train_ranges=synth.TRAIN_RANGES["rooms"])[0]
    assert ([p for p in rooms if p["split"] != "train"]
            == [p for p in narrow if p["split"] != "train"])
    keep = ("text", "engine", "voice", "speed", "pitch")
    tr_n = [p for p in narrow if p["split"] == "train"]
    tr_r = [p for p in rooms if p["split"] == "train"]
    assert [[p[k] for k in keep] for p in tr_r] == [[p[k] for k in keep] for p in tr_n]
    assert [bool(p["augment"]) for p in tr_r] == [bool(p["augment"]) for p in tr_n]
    snr = [p["augment"]["noise"]["snr_db"] for p in tr_r if p["augment"] and p["augment"]["noise"]]
    rt60 = [p["augment"]["reverb"]["rt60"] for p in tr_r
            if p["augment"] and p["augment"]["reverb"]]
    assert snr and rt60
    assert all(synth.WIDE_SNR_DB[0] <= x <= synth.WIDE_SNR_DB[1] for x in snr)
    assert all(synth.WIDE_RT60[0] <= x <= synth.WIDE_RT60[1] for x in rt60)
    # some rooms lie outside the narrow ranges: shifted/'s 10-15 dB SNRs and 0.4-0.6 s RT60s
    assert any(x < synth.TRAIN_SNR_DB[0] for x in snr)
    assert any(x > synth.TRAIN_RT60[1] for x in rt60)


def test_plan_splits_engines_and_ranges():
    plans, train_v, test_v, heldout = _big_plan()
    by = {s: [p for p in plans if p["split"] == s] for s in ("train", "test", "shifted")}
    assert [len(by[s]) for s in ("train", "test", "shifted")] == [360, 40, 100]
    assert plans == _big_plan()[0]  # deterministic
    tr = by["train"]
    assert sum(p["engine"] == "flite" for p in tr) == round(0.3 * 360)
    assert {p["engine"] for p in tr} == {"espeak-ng", "flite"}
    assert {p["voice"] for p in tr if p["engine"] == "flite"} == set(synth.FLITE_VOICES)
    assert {p["voice"] for p in tr if p["engine"] == "espeak-ng"} <= set(train_v)
    assert sum(p["augment"] is not None for p in tr) == round(0.5 * 360)
    kinds = {p["augment"]["kind"] for p in tr if p["augment"]}
    assert kinds == {"noise", "reverb", "reverb+noise"}
    for p in tr + by["test"]:
        assert synth.TRAIN_SPEED[0] <= p["speed"] <= synth.TRAIN_SPEED[1]
        assert synth.TRAIN_PITCH[0] <= p["pitch"] <= synth.TRAIN_PITCH[1]
        a = p["augment"]
        if a and a["noise"]:
            assert synth.TRAIN_SNR_DB[0] <= a["noise"]["snr_db"] <= synth.TRAIN_SNR_DB[1]
            assert a["noise"]["color"] in augment.NOISE_COLORS
        if a and a["reverb"]:
            assert synth.TRAIN_RT60[0] <= a["reverb"]["rt60"] <= synth.TRAIN_RT60[1]
    te = by["test"]  # in-domain held-out voices: espeak-ng only, never augmented
    assert {p["engine"] for p in te} == {"espeak-ng"} and {p["voice"] for p in te} <= set(test_v)
    assert all(p["augment"] is None for p in te)
    sh = by["shifted"]
    assert sum(p["engine"] == "festival" for p in sh) == 50
    assert {p["voice"] for p in sh if p["engine"] == "festival"} == set(synth.FESTIVAL_VOICES)
    assert {p["voice"] for p in sh if p["engine"] == "espeak-ng"} <= set(heldout)
    assert {p["engine"] for p in sh} == {"festival", "espeak-ng"}
    train_speed, train_pitch = synth.TRAIN_SPEED, synth.TRAIN_PITCH
    for p in sh:  # outside the training ranges, on both sides
        assert not train_speed[0] <= p["speed"] <= train_speed[1]
        assert not train_pitch[0] <= p["pitch"] <= train_pitch[1]
        a = p["augment"]
        if a and a["noise"]:
            assert synth.SHIFTED_SNR_DB[0] <= a["noise"]["snr_db"] <= synth.SHIFTED_SNR_DB[1]
        if a and a["reverb"]:
            assert synth.SHIFTED_RT60[0] <= a["reverb"]["rt60"] <= synth.SHIFTED_RT60[1]
    assert min(p["speed"] for p in sh) < 0.7 and max(p["speed"] for p in sh) > 1.35
    assert min(p["pitch"] for p in sh) < -5 and max(p["pitch"] for p in sh) > 5
    assert sum(bool(p["augment"] and p["augment"]["noise"]) for p in sh) > 0.65 * len(sh)
    assert sum(bool(p["augment"] and p["augment"]["reverb"]) for p in sh) > 0.65 * len(sh)
    # texts: normalised, and the shifted ones never a training sentence
    tok = CharTokenizer()
    assert all(tok.normalize(p["text"]) == p["text"] for p in plans)
    assert not {p["text"] for p in sh} & {p["text"] for p in tr}
    assert len({p["text"] for p in sh}) > 80
    # espeak-only training: no flite
    plans2 = synth.plan_dataset(50, seed=3, train_voices=train_v, test_voices=test_v)
    assert {p["engine"] for p in plans2} == {"espeak-ng"}
    assert not [p for p in plans2 if p["split"] == "shifted"]


# ---------------------------------------------------------------------------- make-data
def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZEROMASK_ESPEAK", str(tmp_path / "no-espeak"))
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(EspeakNotFound, match="apt-get install -y espeak-ng"):
        synth.make_dataset(tmp_path / "out", 3)
    assert not (tmp_path / "out").exists()  # nothing written
    rc = make_data_cli.main(["--out", str(tmp_path / "out"), "--n", "3"])
    assert rc == 2
    assert "espeak-ng is not installed" in capsys.readouterr().err


@needs_espeak
def test_espeak_alone_and_missing_flite_or_festival(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZEROMASK_FLITE", str(tmp_path / "no-flite"))
    monkeypatch.setenv("ZEROMASK_FESTIVAL_TEXT2WAVE", str(tmp_path / "no-text2wave"))
    out = tmp_path / "out"
    with pytest.raises(synth.FliteNotFound, match="--engines espeak-ng"):
        synth.make_dataset(out, 3)
    with pytest.raises(synth.FestivalNotFound, match="--no-shifted"):
        synth.make_dataset(out, 3, engines=["espeak-ng"])
    assert not out.exists()  # nothing written
    assert make_data_cli.main(["--out", str(out), "--n", "3", "--engines", "espeak-ng"]) == 2
    assert "festival's text2wave is not installed" in capsys.readouterr().err
    assert make_data_cli.main(["--out", str(out), "--n", "3", "--engines", "espeak-ng,festival",
                               "--no-shifted"]) == 2
    assert "reserved for the shifted set" in capsys.readouterr().err
    assert make_data_cli.main(["--out", str(out), "--n", "3", "--engines", "espeak-ng",
                               "--no-shifted", "--no-progress", "--jobs", "2"]) == 0
    text = capsys.readouterr().out
    assert "wrote 3 utterances (2 train, 1 test, 0 shifted" in text
    assert "train: 2 utterances" in text and "shifted:" not in text
    manifest = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert {m["engine"] for m in manifest} == {"espeak-ng"}
    assert not (out / "shifted").exists() or not list((out / "shifted").iterdir())


@needs_espeak
@needs_flite
@needs_festival
def test_make_data_splits_manifest_and_files(tmp_path, capsys):
    out = tmp_path / "data"
    rc = make_data_cli.main(["--out", str(out), "--n", "12", "--test-fraction", "0.25",
                             "--n-shifted", "6", "--jobs", "2", "--no-progress", "--seed", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote 18 utterances (9 train, 3 test, 6 shifted" in text
    for line in ("train: 9 utterances", "test: 3 utterances", "shifted: 6 utterances"):
        assert line in text
    assert "festival 3 utt / 3 voices" in text
    manifest = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 18
    fields = {"split", "file", "text", "engine", "voice", "speed", "pitch", "engine_args",
              "pitch_range", "breaks", "lead_s", "trail_s", "gain", "augment", "seconds",
              "plan_id"}
    assert all(set(m) == fields for m in manifest)
    by = {s: [m for m in manifest if m["split"] == s] for s in ("train", "test", "shifted")}
    voice_sets = {s: {(m["engine"], m["voice"]) for m in by[s]} for s in by}
    assert not voice_sets["train"] & voice_sets["test"]
    assert not voice_sets["train"] & voice_sets["shifted"]
    assert not voice_sets["test"] & voice_sets["shifted"]
    assert {m["engine"] for m in by["train"]} == {"espeak-ng", "flite"}
    assert sum(m["engine"] == "flite" for m in by["train"]) == 3  # 30% of 9
    assert sum(m["augment"] is not None for m in by["train"]) == 4  # round(0.5 * 9)
    assert {m["engine"] for m in by["test"]} == {"espeak-ng"}
    assert {m["engine"] for m in by["shifted"]} == {"festival", "espeak-ng"}
    for m in by["shifted"]:
        if m["engine"] == "espeak-ng":
            assert m["voice"].split("+")[0] in synth.HELDOUT_ACCENTS
        else:
            assert m["voice"] in synth.FESTIVAL_VOICES
    for m in by["train"] + by["test"]:  # the held-out family is never in train or test
        assert m["engine"] != "festival"
        assert m["voice"].split("+")[0] not in synth.HELDOUT_ACCENTS
    for m in manifest:
        a = m["augment"]
        if a:
            assert a["kind"] in ("noise", "reverb", "reverb+noise")
            if a["reverb"]:
                assert "rt60" in a["reverb"] and "drr_db" in a["reverb"]
            if a["noise"]:
                assert set(a["noise"]) == {"color", "snr_db"}
        wav, sr = sf.read(str(out / (m["file"] + ".wav")))
        assert sr == SR and abs(len(wav) / SR - m["seconds"]) < 1e-3
        assert (out / (m["file"] + ".txt")).read_text().strip() == m["text"]
        assert CharTokenizer().normalize(m["text"]) == m["text"]
        lead = int(m["lead_s"] * SR)
        # silences are exact zeros unless noise was added (then noise covers them too)
        noisy = bool(a and a["noise"])
        assert (np.abs(wav[:lead]).max() > 0) == noisy
    for split in ("train", "test", "shifted"):  # the loader reads every split
        utts = find_utterances(out / split)
        assert {u.id: u.text for u in utts} == {m["file"].split("/")[1]: m["text"]
                                                for m in by[split]}
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".part") or p.name.startswith(".")]
    assert leftovers == [".make-data.lock"]


@needs_espeak
def test_noise_in_a_rendered_utterance_is_at_its_snr():
    plans = synth.plan_dataset(3, seed=1, train_voices=["en-us+m3"], test_voices=["en-gb+f2"])
    p = dict(plans[0], augment={"kind": "noise", "reverb": None, "seed": 5,
                                "noise": {"color": "pink", "snr_db": 17.0}})
    clean, rec0 = synth.render_utterance(dict(p, augment=None))
    noisy, rec = synth.render_utterance(p)
    assert rec0 is None and rec["noise"] == {"color": "pink", "snr_db": 17.0}
    lead, trail = int(p["lead_s"] * SR), int(p["trail_s"] * SR)
    assert len(noisy) == len(clean) and np.abs(clean[:lead]).max() == 0
    speech = clean[lead: len(clean) - trail].astype(np.float64)
    noise = (noisy.astype(np.float64) - clean)
    snr = 10 * np.log10(np.mean(speech ** 2) / np.mean(noise ** 2))
    assert abs(snr - 17.0) < 1.0


@needs_espeak
def test_make_data_resumes(tmp_path, monkeypatch):
    kw = dict(engines=["espeak-ng"], n_shifted=0, jobs=1, seed=2, test_fraction=0.4)
    straight = tmp_path / "straight"
    ref = synth.make_dataset(straight, 5, **kw)
    assert ref.rendered == 5 and ref.reused == 0
    calls = []
    real = synth.render_utterance

    def counting(plan, *a, **k):
        calls.append(plan["file"])
        if len(calls) == fail_after:
            raise RuntimeError("interrupted")
        return real(plan, *a, **k)

    monkeypatch.setattr(synth, "render_utterance", counting)
    # an interrupted run (the third render fails; queued ones are cancelled, though one may
    # have started already) leaves the finished utterances journaled, and no manifest ...
    fail_after = 3
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="interrupted"):
        synth.make_dataset(part, 5, **kw)
    assert not (part / "manifest.jsonl").exists()
    journal = [json.loads(l) for l in (part / ".make-data.journal").read_text().splitlines()]
    mtimes = {p: p.stat().st_mtime_ns for p in part.rglob("*.wav")}
    assert 2 <= len(mtimes) == len(journal) <= 4 and calls[2] not in {j["file"] for j in journal}
    # ... which the next run keeps: it renders only the others, and the result is the same
    # set, byte for byte, as an uninterrupted run
    fail_after, calls[:] = None, []
    res = synth.make_dataset(part, 5, **kw)
    assert len(calls) == 5 - len(mtimes) and res.reused == len(mtimes)
    assert res.rendered == len(calls) and sorted(calls) == sorted(
        set(m["file"] for m in ref) - {j["file"] for j in journal})
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert list(res) == list(ref)
    assert (part / "manifest.jsonl").read_text() == (straight / "manifest.jsonl").read_text()
    for m in ref:
        for ext in (".wav", ".txt"):
            assert (part / (m["file"] + ext)).read_bytes() == (straight / (m["file"] + ext)
                                                               ).read_bytes()
    assert not (part / ".make-data.journal").exists()
    # a finished set: nothing is redone, except a deleted file
    calls[:] = []
    (part / (ref[1]["file"] + ".wav")).unlink()
    res = synth.make_dataset(part, 5, **kw)
    assert calls == [ref[1]["file"]] and res.reused == 4
    # a changed plan (now augmented) is rendered again; the unchanged ones are not
    calls[:] = []
    res = synth.make_dataset(part, 5, augment_fraction=1.0, **{k: v for k, v in kw.items()})
    changed = [r["file"] for r, r0 in zip(res, ref) if r["plan_id"] != r0["plan_id"]]
    assert changed and sorted(calls) == sorted(changed)
    assert all(r["augment"] is not None for r in res if r["split"] == "train")
    # one run per folder at a time
    with synth._locked(part):
        with pytest.raises(RuntimeError, match="another zeromask-make-data"):
            synth.make_dataset(part, 5, **kw)
    # fewer utterances: files of the earlier, bigger set are removed
    res = synth.make_dataset(part, 3, **kw)
    on_disk = {str(p.relative_to(part).with_suffix("")) for p in part.rglob("*.wav")}
    assert on_disk == {r["file"] for r in res} and res.removed >= 2


@needs_espeak
def test_make_data_small_set_lines_up(tmp_path, capsys):
    out = tmp_path / "data"
    rc = make_data_cli.main(["--out", str(out), "--n", "6", "--test-fraction", "0.34",
                             "--engines", "espeak-ng", "--no-shifted", "--jobs", "2",
                             "--no-progress", "--seed", "5"])
    assert rc == 0 and "wrote 6 utterances" in capsys.readouterr().out
    manifest = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 6
    splits = {s: [m for m in manifest if m["split"] == s] for s in ("train", "test")}
    assert len(splits["train"]) == 4 and len(splits["test"]) == 2
    assert not {m["voice"] for m in splits["train"]} & {m["voice"] for m in splits["test"]}
    in_domain = [v for v in synth.voices() if v.split("+")[0] not in synth.HELDOUT_ACCENTS]
    test_voices = set(synth.split_voices(in_domain, 0.15, 5)[1])
    assert {m["voice"] for m in splits["test"]} <= test_voices
    m = splits["test"][0]  # never augmented
    wav, sr = sf.read(str(out / (m["file"] + ".wav")))
    assert sr == SR
    # the transcript file is the sentence that was spoken: re-synthesizing it with the
    # recorded voice and settings (espeak-ng's own units) gives the speech part of the file,
    # between the silences
    assert (out / (m["file"] + ".txt")).read_text().strip() == m["text"]
    again = synth.synthesize(m["text"], m["voice"], pitch=m["engine_args"]["p"],
                             pitch_range=m["pitch_range"], speed=m["engine_args"]["s"],
                             breaks=m["breaks"])
    lead, trail = int(m["lead_s"] * SR), int(m["trail_s"] * SR)
    assert len(wav) == lead + len(again) + trail
    speech = wav[lead: lead + len(again)]
    ref = again / np.abs(again).max() * m["gain"]
    assert np.corrcoef(speech, ref)[0, 1] > 0.99
    assert np.abs(wav[:lead]).max() == 0 and np.abs(wav[len(wav) - trail:]).max() == 0
    # the loader reads the set: texts line up with the manifest
    for split in ("train", "test"):
        utts = find_utterances(out / split)
        want = {mm["file"].split("/")[1]: mm["text"] for mm in splits[split]}
        assert {u.id: u.text for u in utts} == want
    # and a batch of it goes through features (leading silence = zero tokens)
    utts = find_utterances(out / "test")
    ds = SpeechDataset(utts[:2], CharTokenizer(), cache_dir=tmp_path / "cache")
    b = collate([ds[0], ds[1]])
    z = zero.from_audio(b["spectrogram"], b["spectrogram"])
    first = [mm for mm in manifest if mm["file"] == f"test/{utts[0].id}"][0]
    n_lead = int(first["lead_s"] * SR) // 160
    assert z[0, : max(1, n_lead - 3)].all() and not z[0].all()


def test_change_tempo_resamples_every_stream_in_time():
    """Twice as fast: half the frames, each reading the input at 2t; a linear ramp in the
    log-mel stays a ramp; waveform frames are copies of input frames; unvoiced f0 frames are
    never blended into voiced ones; factor 1 is the identity."""
    import torch
    from zeromask.data import change_tempo
    T = 41
    ramp = torch.arange(T, dtype=torch.float32)
    streams = {"spectrogram": ramp[:, None].repeat(1, 4), "waveform": torch.randn(T, 8),
               "pitch": torch.rand(T, 3), "f0": torch.where(ramp % 4 < 2, 120.0, 0.0)}
    same = change_tempo(streams, 1.0)
    for k in streams:
        assert torch.equal(same[k], streams[k]), k
    fast = change_tempo(streams, 2.0)
    assert all(v.shape[0] == 20 or v.shape[0] == 21 for v in fast.values())
    n = fast["spectrogram"].shape[0]
    want = torch.arange(n, dtype=torch.float32) * (T - 1) / (n - 1)
    torch.testing.assert_close(fast["spectrogram"][:, 0], want)
    rows = {tuple(r.tolist()) for r in streams["waveform"]}
    assert all(tuple(r.tolist()) in rows for r in fast["waveform"])
    assert set(fast["f0"].unique().tolist()) <= {0.0, 120.0}
    slow = change_tempo(streams, 0.5)
    assert slow["spectrogram"].shape[0] == 82
    with pytest.raises(ValueError, match="factor"):
        change_tempo(streams, 0.0)


def test_speed_perturbation_in_the_dataset_varies_the_length(tmp_path):
    import torch
    from zeromask.data import CharTokenizer, SpeechDataset
    from zeromask.data.loaders import Utterance
    import numpy as np
    import soundfile as sf
    wav = (0.1 * np.sin(2 * np.pi * 200 * np.arange(8000) / 16000)).astype("float32")
    sf.write(tmp_path / "a.wav", wav, 16000)
    u = Utterance("a", str(tmp_path / "a.wav"), "hi")
    plain = SpeechDataset([u], CharTokenizer())
    base = plain[0]["spectrogram"].shape[0]
    ds = SpeechDataset([u], CharTokenizer(), speed_perturb=0.3)
    torch.manual_seed(0)
    lengths = {ds[0]["spectrogram"].shape[0] for _ in range(8)}
    assert len(lengths) > 1 and all(base / 1.31 <= n <= base * 1.31 for n in lengths)
    item = ds[0]
    assert len({item[k].shape[0] for k in ("spectrogram", "waveform", "pitch", "f0")}) == 1
    with pytest.raises(ValueError, match="speed_perturb"):
        SpeechDataset([u], CharTokenizer(), speed_perturb=-1)


def test_manifest_labels_of_a_split(tmp_path):
    from zeromask.data import manifest_labels
    recs = [{"split": "shifted", "file": "shifted/000001", "engine": "festival",
             "augment": {"kind": "reverb"}, "speed": 1.4},
            {"split": "shifted", "file": "shifted/000002", "engine": "espeak-ng",
             "augment": None, "speed": 0.6},
            {"split": "train", "file": "train/000003", "engine": "flite", "augment": None}]
    (tmp_path / "shifted").mkdir()
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    folder = tmp_path / "shifted"
    got = manifest_labels(folder, ["engine", "augment", "speed", "engine/augment"])
    assert got == {"engine": {"000001": "festival", "000002": "espeak-ng"},
                   "augment": {"000001": "reverb", "000002": "none"},
                   "speed": {"000001": "1.4", "000002": "0.6"},
                   "engine/augment": {"000001": "festival/reverb", "000002": "espeak-ng/none"}}
    with pytest.raises(ValueError, match="colour"):
        manifest_labels(folder, ["engine", "engine/colour"])
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest"):
        manifest_labels(tmp_path / "elsewhere" / "test", ["engine"])
