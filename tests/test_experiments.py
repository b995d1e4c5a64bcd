"""Experiment runner (zeromask.cli.experiments) and plots (zeromask.cli.plots), kept fast.

The data is a tiny tone-burst wav+txt set written here (no espeak-ng needed).
"""
import json
import shlex

import pytest
import torch

sf = pytest.importorskip("soundfile")
pytest.importorskip("librosa")
pytest.importorskip("jiwer")
pytest.importorskip("matplotlib")

from zeromask.cli import experiments as exp_cli  # noqa: E402
from zeromask.cli import plots  # noqa: E402

from tones import write_tone_set  # noqa: E402

WORDS = ("ab", "ba", "cab")
TINY = ("--d-model 16 --num-heads 2 --enc-layers 1 --dec-self-layers 1 --ffn-mult 2 "
        "--max-decode-len 8")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    root = tmp_path_factory.mktemp("tones")
    write_tone_set(root / "train", 6, seed=0, words=WORDS)
    write_tone_set(root / "test", 3, seed=1, words=WORDS)
    return root


def is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


def test_runner_trains_evaluates_and_writes_table_json_plots(tones, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--data", str(tones), "--out", str(out), "--experiments", "prob,inf",
            "--seeds", "0", "--max-steps", "2", "--batch-size", "3", "--parallel", "2",
            "--backend", "reference", "--train-args", TINY, "--bootstrap", "200"]
    assert exp_cli.main(argv) == 0
    table = (out / "results.md").read_text()
    rows = [l for l in table.splitlines() if l.startswith("| `")]
    assert len(rows) == 2 and rows[0].startswith("| `prob`") and rows[1].startswith("| `inf`")
    assert "baseline" in rows[0] and "python -m zeromask.cli.experiments" in rows[1]
    assert "not measured (one seed per experiment)" in table
    summary = json.loads((out / "results.json").read_text())
    assert [(r["experiment"], r["seed"], r["steps"]) for r in summary["runs"]] == \
        [("prob", 0, 2), ("inf", 0, 2)]
    for r in summary["runs"]:
        assert r["backend"] == "reference" and r["n_eval"] == 3 and 0 <= r["cer"]
        assert "--zero-mode hard" in r["train_command"] or r["experiment"] == "prob"
    inf = summary["experiments"]["inf"]
    assert inf["delta_lo"] <= inf["delta_cer"] <= inf["delta_hi"]
    assert inf["verdict"] != "baseline"
    for name in ("curves_prob.png", "curves_inf.png", "curves_all.png",
                 "utterance_spectrogram.png", "utterance_pitch.png", "utterance_waveform.png"):
        assert is_png(out / name), name
    # a second invocation reuses the finished runs instead of training again
    capsys.readouterr()
    assert exp_cli.main(argv) == 0
    assert capsys.readouterr().out.count("already done, reused") == 2


def test_row_command_reproduces_the_train_command(tmp_path):
    argv = ["--data", "D", "--out", str(tmp_path), "--experiments", "prob,curriculum",
            "--seeds", "0,1", "--max-steps", "40", "--backend", "reference",
            "--train-args", TINY]
    args = exp_cli.build_parser().parse_args(argv)
    cmd = exp_cli.runner_command(args, ["curriculum"], [0, 1])
    again = exp_cli.build_parser().parse_args(shlex.split(cmd)[3:])
    run = tmp_path / "r"
    assert exp_cli.train_command(again, "curriculum", 1, run) == \
        exp_cli.train_command(args, "curriculum", 1, run)
    tc = exp_cli.train_command(args, "curriculum", 1, run)
    assert tc[tc.index("--curriculum-steps") + 1] == "10"  # max_steps // 4
    assert tc[tc.index("--seed") + 1] == "1" and tc[tc.index("--eval-every") + 1] == "13"


def test_paired_bootstrap_separates_a_real_difference_from_none():
    a = {f"u{i}": (i % 3, 20) for i in range(60)}
    d, lo, hi = exp_cli.paired_bootstrap(a, dict(a), n=300)
    assert d == 0 and lo == 0 and hi == 0
    worse = {k: (e + 4, n) for k, (e, n) in a.items()}
    d, lo, hi = exp_cli.paired_bootstrap(a, worse, n=300)
    assert d == pytest.approx(0.2) and lo > 0.1
    noisy = {k: (e + (3 if i % 2 else -e), n) for i, (k, (e, n)) in enumerate(a.items())}
    d, lo, hi = exp_cli.paired_bootstrap(a, noisy, n=300)
    assert lo < d < hi


def test_plot_utterance_and_curves(tones, tmp_path):
    from zeromask.data import CharTokenizer, SpeechDataset, find_utterances
    from zeromask.models import ModelConfig, SpeechModel
    torch.manual_seed(0)
    model = SpeechModel(ModelConfig(d_model=16, num_heads=2, enc_layers=1, dec_self_layers=1,
                                    max_decode_len=6, backend="reference"))
    tok = CharTokenizer()
    ds = SpeechDataset(find_utterances(tones / "test"), tok)
    path = plots.plot_utterance(model, ds[0], tok, tmp_path / "utt.png", stage="pitch")
    assert is_png(path)
    with pytest.raises(ValueError, match="feature_order"):
        plots.plot_utterance(SpeechModel(ModelConfig(
            d_model=16, num_heads=2, enc_layers=1, feature_order=("spectrogram",))),
            ds[0], tok, tmp_path / "bad.png", stage="pitch")
    assert not (tmp_path / "bad.png").exists()
    curves = {"a": ([1, 2, 3], [3.0, 2.0, 1.5]), "b": ([1, 2, 3], [3.1, 2.5, 2.0])}
    assert is_png(plots.plot_curves(curves, tmp_path / "c.png"))
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 3.0}, {"step": 1, "eval": True, "cer": 0.9}, {"step": 2,
                                                                          "loss": 2.5}]))
    assert plots.read_losses(log) == ([1, 2], [3.0, 2.5])


def _job(tmp_path, name, train_code, eval_code):
    import sys
    return {"name": name, "run_dir": tmp_path / name,
            "train_cmd": [sys.executable, "-c", train_code],
            "eval_cmd": [sys.executable, "-c", eval_code]}


def test_run_all_runs_jobs_in_parallel_and_evaluates_only_what_trained(tmp_path):
    """Two jobs at a time on the executor: both sleep 1 s, so together they take ~1 s, not
    2; a job whose training fails is not evaluated."""
    import time
    mark = "open('{}', 'w').write('x')"
    jobs = [_job(tmp_path, f"ok{i}", "import time; time.sleep(1)",
                 mark.format(tmp_path / f"eval{i}")) for i in range(2)]
    jobs.append(_job(tmp_path, "bad", "raise SystemExit(3)", mark.format(tmp_path / "evalbad")))
    t0 = time.time()
    exp_cli.run_all(jobs, parallel=3, threads=1)
    assert time.time() - t0 < 1.9
    assert (tmp_path / "eval0").exists() and (tmp_path / "eval1").exists()
    assert not (tmp_path / "evalbad").exists()
    assert (tmp_path / "ok0" / "stdout.txt").exists()


def test_run_all_stops_the_runs_in_flight_on_sigterm(tmp_path):
    import os
    import signal
    import threading
    import time
    mark = "open('{}', 'w').write('x')"
    jobs = [_job(tmp_path, f"long{i}", "import time; time.sleep(60)",
                 mark.format(tmp_path / f"eval{i}")) for i in range(3)]
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    t0 = time.time()
    with pytest.raises(SystemExit, match="interrupted"):
        exp_cli.run_all(jobs, parallel=2, threads=1)
    assert time.time() - t0 < 15
    assert not any((tmp_path / f"eval{i}").exists() for i in range(3))
    assert not (tmp_path / "long2").exists()  # the queued third job never started


def test_cer_vs_time_plot_draws_every_decoder(tmp_path, monkeypatch):
    """The demo's CER curve: attention, CTC and joint lines from a log.jsonl's evaluation
    records (training records ignored); no evaluation record is a clear error."""
    log = tmp_path / "log.jsonl"
    recs = [{"step": 10, "loss": 3.0}] + [
        {"step": s, "eval": True, "elapsed": 60.0 * s, "cer": 1.0 / s, "ctc_cer": 0.8 / s,
         "joint_cer": 0.5 / s} for s in (1, 2, 3)]
    log.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    evals = plots.read_evals(log)
    assert [r["step"] for r in evals] == [1, 2, 3]
    seen = {}
    real_save = plots._save

    def spy(fig, path):
        seen["labels"] = [ln.get_label() for ln in fig.axes[0].get_lines()]
        return real_save(fig, path)
    monkeypatch.setattr(plots, "_save", spy)
    out = plots.plot_cer_vs_time({"demo": evals}, tmp_path / "cer.png")
    assert is_png(out)
    assert seen["labels"][:3] == ["demo: attention decoder, greedy", "demo: CTC head, greedy",
                                  "demo: joint CTC/attention, greedy"]
    with pytest.raises(ValueError, match="no evaluation records"):
        plots.plot_cer_vs_time({"demo": []}, tmp_path / "none.png")
