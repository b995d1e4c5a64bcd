"""zeromask.data: tokenizer, sentence generator, loaders, collate, espeak-ng make-data."""
import json
import shutil

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("librosa")

from zeromask import zero  # noqa: E402
from zeromask.cli import make_data as make_data_cli  # noqa: E402
from zeromask.data import (VOCABULARY, CharTokenizer, EspeakNotFound,  # noqa: E402
                           SentenceGenerator, SpeechDataset, collate, find_utterances,
                           load_folder, load_librispeech, split_voices)
from zeromask.data import synth  # noqa: E402

SR = 16000
HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed "
                                  "(apt-get install -y espeak-ng); make-data needs it")


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
def test_make_data_small_set_lines_up(tmp_path, capsys):
    out = tmp_path / "data"
    rc = make_data_cli.main(["--out", str(out), "--n", "6", "--test-fraction", "0.34",
                             "--jobs", "2", "--no-progress", "--seed", "5"])
    assert rc == 0 and "wrote 6 utterances" in capsys.readouterr().out
    manifest = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 6
    splits = {s: [m for m in manifest if m["split"] == s] for s in ("train", "test")}
    assert len(splits["train"]) == 4 and len(splits["test"]) == 2
    assert not {m["voice"] for m in splits["train"]} & {m["voice"] for m in splits["test"]}
    test_voices = set(synth.split_voices(synth.voices(), 0.15, 5)[1])
    assert {m["voice"] for m in splits["test"]} <= test_voices
    m = manifest[0]
    wav, sr = sf.read(str(out / (m["file"] + ".wav")))
    assert sr == SR
    # the transcript file is the sentence that was spoken: re-synthesizing it with the
    # recorded voice and settings gives the speech part of the file, between the silences
    assert (out / (m["file"] + ".txt")).read_text().strip() == m["text"]
    again = synth.synthesize(m["text"], m["voice"], pitch=m["pitch"],
                             pitch_range=m["pitch_range"], speed=m["speed"], breaks=m["breaks"])
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
    utts = find_utterances(out / "train")
    ds = SpeechDataset(utts[:2], CharTokenizer(), cache_dir=tmp_path / "cache")
    b = collate([ds[0], ds[1]])
    z = zero.from_audio(b["spectrogram"], b["spectrogram"])
    first = [mm for mm in manifest if mm["file"] == f"train/{utts[0].id}"][0]
    n_lead = int(first["lead_s"] * SR) // 160
    assert z[0, : max(1, n_lead - 3)].all() and not z[0].all()
