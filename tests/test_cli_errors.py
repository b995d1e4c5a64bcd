"""Commands a user runs for hours (issue 12, items 13-16): bad files are skipped and named,
an interrupt saves a checkpoint, user errors are one line with exit code 2, the help says
what each option does, the progress bar follows the time budget, unended hypotheses are
reported."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

sf = pytest.importorskip("soundfile")
pytest.importorskip("librosa")
pytest.importorskip("jiwer")

from zeromask.cli import train as train_cli  # noqa: E402
from zeromask.models.training import CheckpointError, load_checkpoint  # noqa: E402

from tones import TINY, write_tone_set  # noqa: E402



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tones")
    write_tone_set(root / "train", 10, seed=0)
    write_tone_set(root / "test", 3, seed=1)
    return root


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(__file__))


def test_bad_audio_and_transcripts_are_skipped_and_named(data, tmp_path, capsys, caplog):
    train = tmp_path / "train"
    write_tone_set(train, 20, seed=0)
    (train / "u003.wav").write_bytes(b"RIFF\x00\x00 not a wav")          # corrupt
    (train / "u005.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    out = tmp_path / "run"
    assert train_cli.main(["--train", str(train), "--test", str(data / "test"),
                           "--out", str(out), "--batch-size", "2", "--max-steps", "2",
                           "--no-eval"] + TINY) == 0
    logs = caplog.text
    assert "u003.wav" in logs and "cannot read audio file" in logs
    assert "u005.txt" in logs and "not UTF-8" in logs
    assert "1 of 19 utterances skipped" in logs
    assert "18 train" in capsys.readouterr().out


def test_too_many_bad_files_stop_with_one_line(tmp_path):
    train = tmp_path / "train"
    write_tone_set(train, 4, seed=0)
    for i in range(3):
        (train / f"u{i:03d}.wav").write_bytes(b"junk")
    run = _cli("zeromask.cli.train", "--train", str(train), "--out", str(tmp_path / "r"),
               "--max-steps", "1", "--no-eval", *TINY)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("zeromask-train: error: 3 of 4 audio files could not be read")
    assert "Traceback" not in run.stderr


def test_truncated_and_foreign_checkpoints_are_one_line_errors(data, tmp_path):
    out = tmp_path / "run"
    assert train_cli.main(["--data", str(data), "--out", str(out), "--batch-size", "2",
                           "--max-steps", "1", "--no-eval"] + TINY) == 0
    blob = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(out / "last.pt")
    run = _cli("zeromask.cli.train", "--data", str(data), "--out", str(out), "--max-steps",
               "2", "--no-eval", *TINY)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "--no-resume" in run.stderr.strip().splitlines()[-1]
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    run = _cli("zeromask.cli.eval", "--checkpoint", str(foreign), "--data", str(data / "test"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "not a zeromask checkpoint" in run.stderr
    run = _cli("zeromask.cli.eval", "--checkpoint", str(tmp_path / "nope.pt"), "--data",
               str(data / "test"))
    assert run.returncode == 2 and "does not exist" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_saves_last_pt_and_says_how_to_resume(data, tmp_path, sig):
    out = tmp_path / "run"
    log = out / "log.jsonl"
    cmd = [sys.executable, "-m", "zeromask.cli.train", "--data", str(data), "--out", str(out),
           "--batch-size", "2", "--max-steps", "100000", "--ckpt-every", "0", "--log-every",
           "1", "--no-eval", *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(__file__))
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    assert log.exists(), "training did not start"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "saved; rerun the same command to resume" in err
    step = load_checkpoint(out / "last.pt")["step"]
    assert step >= 3
    # the same command resumes from there
    again = subprocess.run(cmd[:-len(TINY) - 1] + ["--max-steps", str(step + 1), "--no-eval",
                                                   *TINY],
                           capture_output=True, text=True, timeout=300,
                           cwd=os.path.dirname(__file__))
    assert again.returncode == 0, again.stderr
    assert f"at step {step}" in again.stdout and load_checkpoint(out / "last.pt")["step"] == step + 1


def test_help_describes_every_model_and_training_option():
    full = train_cli.build_parser().format_help()
    text = full[full.index("options:"):]  # the descriptions, not the usage line
    for flag, words in [("--ctc-weight", "joint CTC/attention"), ("--zero-mode", "{prob,score,hard}"),
                        ("--dropout", "default: 0.1"), ("--lr", "learning rate ["),
                        ("--time-budget", "seconds"), ("--no-final-eval", "no evaluation after")]:
        i = text.index(flag)
        assert words in text[i:i + 400], (flag, text[i:i + 400])


def test_progress_bar_follows_the_time_budget(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--batch-size", "2", "--time-budget", "3",
            "--no-eval"] + [a for a in TINY if a != "--no-progress"]
    assert train_cli.main(args) == 0
    err = capsys.readouterr().err
    assert "/3 s" in err and "step=" in err  # seconds of the budget, not steps of a guess


def test_final_eval_can_be_left_to_zeromask_eval(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(["--data", str(data), "--out", str(out), "--batch-size", "2",
                           "--max-steps", "1", "--no-final-eval"] + TINY) == 0
    assert "[final" not in capsys.readouterr().out
    assert "cer" not in json.loads((out / "results.json").read_text())


def test_unended_hypotheses_are_capped_and_reported(data, tmp_path, capsys):
    """An untrained decoder rarely emits the end token: each hypothesis stops at its
    encoder's length, and the summary says how many did."""
    from zeromask.data import CharTokenizer, SpeechDataset, collate, find_utterances
    from zeromask.models import ModelConfig, SpeechModel
    from zeromask.models.training import evaluate, score_summary
    torch.manual_seed(0)
    model = SpeechModel(ModelConfig(d_model=16, num_heads=2, enc_layers=1, dec_self_layers=1,
                                    ffn_mult=2, max_decode_len=500))
    with torch.no_grad():  # never the end token (id 0)
        model.head.bias.fill_(0.0)
        model.head.bias[0] = -1e4
    tok = CharTokenizer()
    ds = SpeechDataset(find_utterances(data / "test"), tok)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    res = evaluate(model, loader, tok)
    assert res["unended"] == 3
    frames = [ds[i]["spectrogram"].shape[0] for i in range(3)]
    for hyp, T in zip(res["hyps"], frames):
        assert len(hyp) <= -(-T // 4)  # at most the encoder's frames, not 500
    assert "3 attention hypotheses never emitted the end token" in score_summary(res)


def test_signal_handlers_are_restored_even_when_training_fails(data, tmp_path, monkeypatch):
    """A bug inside the training loop keeps its traceback, and the caller's SIGINT/SIGTERM
    handlers come back (an in-process caller such as a notebook keeps its Ctrl-C)."""
    from zeromask.models import training

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(training, "to_device", broken)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        train_cli.main(["--data", str(data), "--out", str(tmp_path / "r"), "--batch-size",
                        "2", "--max-steps", "2", "--no-eval"] + TINY)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
