"""Experiment runner (zeromask.cli.experiments) and plots (zeromask.cli.plots), kept fast.

The data is a tiny tone-burst wav+txt set written here (no espeak-ng needed); the runner's
statistics are checked on synthetic numbers with a known answer, and its resumption on a
grid of fake runs (subprocesses that write what zeromask-train and zeromask-eval write).
"""
import json
import shlex
import sys

import numpy as np
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
TINY_MODEL = {"d_model": 16, "num_heads": 2, "enc_layers": 1, "dec_self_layers": 1,
              "ffn_mult": 2, "max_decode_len": 8, "ctc_weight": 0.5,
              "feature_order": ["spectrogram"]}
TINY = ("--d-model 16 --num-heads 2 --enc-layers 1 --dec-self-layers 1 --ffn-mult 2 "
        "--max-decode-len 8")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    root = tmp_path_factory.mktemp("tones")
    write_tone_set(root / "train", 6, seed=0, words=WORDS)
    write_tone_set(root / "test", 3, seed=1, words=WORDS)
    write_tone_set(root / "shifted", 3, seed=2, words=WORDS)
    return root


def is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


def test_runner_trains_evaluates_and_writes_table_json_plots(tones, tmp_path, capsys):
    """Real (2-step) runs on the recipe of --config: rows grouped by question with their
    reference, both held-out sets, first-character errors, the learned zero scales read from
    the checkpoints, the curves per question and the side-by-side cross-attention."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": TINY_MODEL, "train": {"batch_size": 3}}))
    out = tmp_path / "results"
    argv = ["--data", str(tones), "--config", str(recipe), "--out", str(out),
            "--experiments", "score,learned-s", "--seeds", "0", "--max-steps", "2",
            "--parallel", "2", "--backend", "reference", "--bootstrap", "200"]
    assert exp_cli.main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [(r["experiment"], r["seed"], r["steps"]) for r in summary["runs"]] == \
        [("prob", 0, 2), ("score", 0, 2), ("learned-s", 0, 2)]   # prob added: the reference
    for r in summary["runs"]:
        assert r["backend"] == "reference" and r["feature_order"] == ["spectrogram"]
        assert set(r["splits"]) == {"test", "shifted"}
        for s in r["splits"].values():
            assert s["n"] == 3 and s["decoder"] == "joint" and 0 <= s["cer"]
            assert 0 <= s["first_char_error_attention"] <= 1
        assert "--config" in r["train_command"] and "--zero-mode" in r["train_command"]
    scales = summary["runs"][2]["zero_scales"]
    assert len(scales) == 3 and all(0 < s < 1e-3 for s in scales.values())  # 3 attentions
    assert summary["runs"][0]["zero_scales"] == {}                          # fixed s
    assert summary["questions"] == {"q1": ["prob", "score"], "q2": ["prob", "learned-s"]}
    score = summary["experiments"]["score"]["vs_reference"]["test/cer"]
    assert score["lo"] <= score["delta"] <= score["hi"]
    assert score["significant"] is False  # one seed: the seed spread is not measured
    table = (out / "results.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| `") or ln.startswith("| **q")]
    assert [r.split("|")[1].strip()[:12] for r in rows[:5]] == \
        ["**q1. Zero t", "`prob`: zero", "`score`: zer", "**q2. Learna", "`prob`: zero"]
    assert "reference" in rows[1] and "vs `prob`" in rows[2]
    assert "python -m zeromask.cli.experiments" in rows[2] and "shifted CER" in table
    assert "First-character error rate" in table and "Learned zero scales" in table
    for name in ("curves_q1.png", "curves_q2.png", "cross_attention.png",
                 "utterance_spectrogram.png"):
        assert is_png(out / name), name
    # a second invocation reuses the finished runs instead of training again
    capsys.readouterr()
    assert exp_cli.main(argv) == 0
    assert capsys.readouterr().out.count("already done, reused") == 3
    # a grid resumed from its committed numbers (no checkpoints): the same runs and zero
    # scales, the plots drawn from checkpoints left as they were
    for ckpt in (out / "runs").glob("*/last.pt"):
        ckpt.unlink()
    drawn = (out / "cross_attention.png").stat().st_mtime_ns
    assert exp_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done, reused") == 3
    assert "cross_attention.png not redrawn" in printed
    assert (out / "cross_attention.png").stat().st_mtime_ns == drawn
    again = json.loads((out / "results.json").read_text())
    assert [r["zero_scales"] for r in again["runs"]] == \
        [r["zero_scales"] for r in summary["runs"]]


def test_row_command_reproduces_the_train_command(tmp_path):
    argv = ["--data", "D", "--out", str(tmp_path), "--experiments", "curriculum",
            "--seeds", "0,1", "--max-steps", "40", "--backend", "reference",
            "--config", "scripts/asr_demo.json", "--train-args", TINY]
    args = exp_cli.build_parser().parse_args(argv)
    cmd = exp_cli.runner_command(args, ["curriculum"], [0, 1])
    again = exp_cli.build_parser().parse_args(shlex.split(cmd)[3:])
    run = tmp_path / "r"
    assert exp_cli.train_command(again, "curriculum", 1, run) == \
        exp_cli.train_command(args, "curriculum", 1, run)
    tc = exp_cli.train_command(args, "curriculum", 1, run)
    assert tc[tc.index("--curriculum-steps") + 1] == "10"  # max_steps // 4
    assert tc[tc.index("--seed") + 1] == "1" and tc[tc.index("--eval-every") + 1] == "10"
    assert tc[tc.index("--config") + 1] == "scripts/asr_demo.json"
    assert "--batch-size" not in tc and "--lr" not in tc  # the recipe's
    assert tc[tc.index("--zero-mode") + 1] == "prob"  # every row pins the baseline's mode
    hard = exp_cli.train_command(args, "hard", 0, run)
    assert hard.count("--zero-mode") == 1 and hard[hard.index("--zero-mode") + 1] == "hard"
    ev = exp_cli.eval_command(args, run, "shifted")
    assert ev[ev.index("--data") + 1].endswith("shifted")
    assert ev[ev.index("--json") + 1].endswith("eval_shifted.json")


def test_experiments_cover_the_six_questions_and_add_references():
    assert set(exp_cli.QUESTIONS) == {f"q{i}" for i in range(1, 7)}
    assert {x.question for x in exp_cli.EXPERIMENTS.values()} == set(exp_cli.QUESTIONS)
    for name, x in exp_cli.EXPERIMENTS.items():
        assert x.reference is None or x.reference in exp_cli.EXPERIMENTS, name
    assert exp_cli.select_experiments("curriculum") == ["prob", "all-streams", "curriculum"]
    assert exp_cli.select_experiments("q6") == ["prob", "all-streams", "curriculum"]
    assert exp_cli.select_experiments("all") == list(exp_cli.EXPERIMENTS)
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        exp_cli.select_experiments("prob,nope")
    rows = exp_cli.question_rows(exp_cli.select_experiments("all"))
    assert rows["q1"] == ["prob", "score", "hard", "no-zero"]
    assert rows["q5"] == ["prob", "waveform-only", "pitch-only", "all-streams", "order-psw",
                          "order-wps"]
    assert rows["q6"] == ["all-streams", "curriculum"]
    with pytest.raises(SystemExit, match="unknown experiment"):
        exp_cli.main(["--data", "D", "--experiments", "inf", "--max-steps", "1"])


# ----------------------------------------------------------------------------- statistics
def _runs(rng, p, offsets, n_utt=100, n_chars=20):
    """{seed: {utterance: (errors, chars)}}: utterance difficulty shared by every run, a
    per-run offset of the error rate (seed noise), binomial character errors."""
    difficulty = np.linspace(-0.05, 0.05, n_utt)
    out = {}
    for seed, off in enumerate(offsets):
        e = rng.binomial(n_chars, np.clip(p + off + difficulty, 0, 1))
        out[seed] = {f"u{i}": (int(e[i]), n_chars) for i in range(n_utt)}
    return out


def _cers(runs):
    return [sum(e for e, _ in r.values()) / sum(n for _, n in r.values())
            for r in runs.values()]


def test_pooled_sd_known_answer():
    sd, dof = exp_cli.pooled_sd([[1.0, 2.0, 3.0], [10.0, 12.0], [7.0]])
    assert dof == 3 and sd == pytest.approx((4 / 3) ** 0.5)  # (2 + 2) / (2 + 1)
    assert exp_cli.pooled_sd([[1.0], [2.0]]) == (None, 0)


def test_a_real_difference_is_flagged_and_pure_noise_is_not():
    """100 synthetic grids, each with 6 rows of the same error rate (3 seeds, seed noise
    s.d. 0.01) for the pooled seed s.d.: a row 0.05 worse (or better) is flagged in (almost)
    every grid; a row of pure noise in few (the rule's nominal rate is about 5-7%), where
    the utterance bootstrap alone would flag far more (it does not see seed noise)."""
    flagged_noise = flagged_ci = flagged_worse = flagged_better = 0
    for t in range(100):
        rng = np.random.default_rng(t)
        rows = [_runs(rng, 0.15, rng.normal(0, 0.01, 3)) for _ in range(6)]
        sd, dof = exp_cli.pooled_sd([_cers(r) for r in rows])
        assert dof == 12
        noise = exp_cli.compare(rows[0], rows[1], sd, n=300)
        flagged_noise += noise["significant"]
        flagged_ci += not noise["lo"] <= 0 <= noise["hi"]
        assert noise["verdict"] in ("within noise", "better", "worse")
        worse = exp_cli.compare(rows[0], _runs(rng, 0.20, rng.normal(0, 0.01, 3)), sd, n=300)
        better = exp_cli.compare(rows[0], _runs(rng, 0.10, rng.normal(0, 0.01, 3)), sd, n=300)
        flagged_worse += worse["significant"] and worse["verdict"] == "worse"
        flagged_better += better["significant"] and better["verdict"] == "better"
        assert worse["delta"] == pytest.approx(0.05, abs=0.03)
    assert flagged_worse >= 97 and flagged_better >= 97
    assert flagged_noise <= 12
    assert flagged_ci >= 2 * flagged_noise + 10


def test_seed_noise_overrules_a_tight_bootstrap_and_one_seed_never_counts():
    """Known answer: the row equals its reference utterance by utterance but for a per-seed
    shift of +2, -1, +2 errors on every utterance (mean +1 of 20 characters: +0.05). The
    bootstrap interval excludes 0, but the seeds spread by s.d. 0.087 (CER), so the seed
    noise of the difference is 0.071 and +0.05 is within noise. With one seed nothing
    counts."""
    rng = np.random.default_rng(0)
    ref = _runs(rng, 0.2, [0.0, 0.0, 0.0])
    shifts = {0: 2, 1: -1, 2: 2}
    row = {s: {u: (max(0, e + shifts[s]), n) for u, (e, n) in r.items()} for s, r in ref.items()}
    sd, _ = exp_cli.pooled_sd([_cers(ref), _cers(row)])
    c = exp_cli.compare(ref, row, sd, n=500)
    assert c["lo"] > 0 and c["delta"] == pytest.approx(0.05, abs=0.01)
    assert not c["significant"] and c["verdict"] == "within noise"
    assert "seed noise" in c["why"] and c["seed_noise"] == pytest.approx(sd * (2 / 3) ** 0.5)
    # the same shift on every seed: the seeds no longer disagree, the difference counts
    row2 = {s: {u: (e + 2, n) for u, (e, n) in r.items()} for s, r in ref.items()}
    sd2, _ = exp_cli.pooled_sd([_cers(ref), _cers(row2)])
    assert exp_cli.compare(ref, row2, sd2, n=500)["verdict"] == "worse"
    one = exp_cli.compare({0: ref[0]}, {0: row2[0]}, None, n=500)
    assert one["lo"] > 0 and not one["significant"]
    assert one["verdict"] == "beyond utterance noise only" and "not measured" in one["why"]
    assert exp_cli.compare({0: ref[0]}, {1: row2[1]}, 0.01)["verdict"] == \
        "no seed shared with the reference"


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


def test_first_char_errors():
    ev = {"utterances": [{"id": "a", "ref": "hello", "hyp": "hello", "joint_hyp": "jello"},
                         {"id": "b", "ref": " Bye", "hyp": "by", "joint_hyp": "b"},
                         {"id": "c", "ref": "x", "hyp": "", "joint_hyp": "x"},
                         {"id": "d", "ref": " ", "hyp": "q"}]}
    assert exp_cli.first_char_errors(ev) == {"a": (0, 1), "b": (0, 1), "c": (1, 1)}
    assert exp_cli.first_char_errors(ev, "joint_hyp") == {"a": (1, 1), "b": (0, 1),
                                                          "c": (0, 1)}


def test_zero_scales_read_every_learnable_scale_from_a_checkpoint(tmp_path):
    from zeromask.models import ModelConfig, SpeechModel
    from zeromask.models.training import save_checkpoint
    kw = dict(d_model=16, num_heads=2, enc_layers=1, dec_self_layers=1,
              feature_order=("spectrogram",))
    m = SpeechModel(ModelConfig(learnable_zero_scale=True, **kw))
    logs = [p for n, p in m.named_parameters() if n.endswith("zero_scale_log")]
    assert len(logs) == 3  # encoder self, decoder self, cross
    with torch.no_grad():
        logs[0].fill_(np.log(3e-4))
        logs[1].fill_(0.5)  # above log(1): the module uses s = 1
    save_checkpoint(tmp_path / "l.pt", model=m)
    s = exp_cli.zero_scales(tmp_path / "l.pt")
    assert sorted(s.values()) == pytest.approx([1e-6, 3e-4, 1.0], rel=1e-5)
    assert all(k.endswith("attn.attn") for k in s)
    save_checkpoint(tmp_path / "f.pt", model=SpeechModel(ModelConfig(**kw)))
    assert exp_cli.zero_scales(tmp_path / "f.pt") == {}  # a fixed s is no parameter


# ----------------------------------------------------------------------------- resuming
FAKE_TRAIN = """
import json, sys, pathlib
out, steps, log = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
open(log, "a").write("train " + out.name + "\\n")
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({"model": {"backend": "reference",
                                                       "feature_order": ["spectrogram"]}}))
(out / "log.jsonl").write_text(json.dumps({"step": steps, "loss": 1.0, "steps_per_s": 1.0})
                               + "\\n" + json.dumps({"step": steps, "eval": True,
                                                     "joint_cer": 0.1, "n": 5}) + "\\n")
(out / "results.json").write_text(json.dumps({"step": steps, "elapsed_s": 1.0,
                                              "last_loss": 1.0, "parameters": 10}))
"""
FAKE_EVAL = """
import json, sys, pathlib
import numpy as np
out, split, p, seed, log = (pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]),
                            int(sys.argv[4]), sys.argv[5])
open(log, "a").write("eval " + out.name + " " + split + "\\n")
rng = np.random.default_rng([seed, len(split), int(1000 * p)])
ref = "abcdefghijklmnopqrst"
utts = []
for i in range(150):
    k = rng.binomial(len(ref), min(1.0, p + rng.normal(0, 0.004) + 0.05 * (i % 3)))
    hyp = "z" * k + ref[k:]
    utts.append({"id": f"u{i}", "ref": ref, "hyp": hyp, "joint_hyp": hyp})
import jiwer
cer = jiwer.cer([u["ref"] for u in utts], [u["hyp"] for u in utts])
step = json.loads((out / "results.json").read_text())["step"]
(out / f"eval_{split}.json").write_text(json.dumps(
    {"step": step, "n": len(utts), "cer": cer, "wer": cer, "joint_cer": cer,
     "joint_wer": cer, "utterances": utts}))
"""
RATES = {"prob": 0.10, "hard": 0.10, "score": 0.25}  # score is worse; hard is pure noise


@pytest.fixture
def fake_grid(tmp_path, monkeypatch):
    """main() with zeromask-train/eval replaced by fast fake subprocesses, which log each
    call to CALLS; the data folder has test/ and shifted/."""
    data = tmp_path / "data"
    for split in ("train", "test", "shifted"):
        (data / split).mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    calls.write_text("")

    def fake_train(args, exp, seed, run_dir):
        return [sys.executable, "-c", FAKE_TRAIN, str(run_dir), str(args.max_steps), str(calls)]

    def fake_eval(args, run_dir, split="test"):
        exp, seed = run_dir.name.rsplit("-s", 1)
        return [sys.executable, "-c", FAKE_EVAL, str(run_dir), split, str(RATES[exp]), seed,
                str(calls)]
    monkeypatch.setattr(exp_cli, "train_command", fake_train)
    monkeypatch.setattr(exp_cli, "eval_command", fake_eval)
    monkeypatch.setattr(exp_cli, "_prepare_cache", lambda data: None)
    plotted = []
    monkeypatch.setattr(exp_cli, "make_plots", lambda *a, **k: plotted.append(1) or [])
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--experiments", "prob,score,hard",
            "--seeds", "0,1,2", "--max-steps", "30", "--parallel", "2",
            "--backend", "reference", "--bootstrap", "500"]
    return {"argv": argv, "out": out, "calls": calls, "plotted": plotted}


def test_resumed_grid_skips_finished_runs_and_results_are_written_as_runs_finish(
        fake_grid, capsys, monkeypatch):
    g = fake_grid
    reports = []
    real_report = exp_cli.report
    monkeypatch.setattr(exp_cli, "report",
                        lambda *a, **k: reports.append(1) or real_report(*a, **k))
    assert exp_cli.main(g["argv"]) == 0
    calls = g["calls"].read_text().splitlines()
    assert sorted(c.split()[0] for c in calls) == ["eval"] * 18 + ["train"] * 9
    assert len(reports) == 9 + 1  # after every finished run, and once at the end
    assert len(g["plotted"]) == 9 + 1  # the plots too
    summary = json.loads((g["out"] / "results.json").read_text())
    assert len(summary["runs"]) == 9 and summary["splits"] == ["test", "shifted"]
    vs = {e: summary["experiments"][e]["vs_reference"] for e in ("score", "hard")}
    for split in ("test", "shifted"):   # the known answer: score worse, hard pure noise
        assert vs["score"][f"{split}/cer"]["verdict"] == "worse"
        assert vs["score"][f"{split}/cer"]["delta"] == pytest.approx(0.15, abs=0.03)
        assert vs["hard"][f"{split}/cer"]["significant"] is False
    assert summary["seed_sd_dof"]["test/cer"] == 6
    assert "**worse**" in (g["out"] / "results.md").read_text()

    # rerun: nothing is trained or evaluated again
    capsys.readouterr()
    g["calls"].write_text("")
    assert exp_cli.main(g["argv"]) == 0
    assert g["calls"].read_text() == ""
    assert capsys.readouterr().out.count("already done, reused") == 9
    # a lost evaluation is redone alone; an unfinished training is resumed, then scored
    runs = g["out"] / "runs"
    (runs / "score-s1" / "eval_shifted.json").unlink()
    res = json.loads((runs / "hard-s2" / "results.json").read_text())
    (runs / "hard-s2" / "results.json").write_text(json.dumps(dict(res, step=20)))
    assert exp_cli.main(g["argv"]) == 0
    assert sorted(g["calls"].read_text().splitlines()) == [
        "eval hard-s2 shifted", "eval hard-s2 test", "eval score-s1 shifted", "train hard-s2"]


def test_plots_use_the_first_shared_seed_whose_checkpoints_are_here(tmp_path, monkeypatch):
    """A grid resumed from committed numbers has lost its first seeds' checkpoints: the
    side-by-side and utterance plots are drawn from the first seed whose checkpoints are all
    here, and left alone when none is."""
    drawn = {}
    monkeypatch.setattr(plots, "read_evals", lambda log: [])
    monkeypatch.setattr(plots, "read_losses", lambda log: [])
    monkeypatch.setattr(plots, "plot_question_curves", lambda curves, path, **k: path)
    monkeypatch.setattr(plots, "plot_cross_attention_compare",
                        lambda ckpts, test, path, **k: drawn.setdefault("x", dict(ckpts)))
    monkeypatch.setattr(plots, "plot_checkpoint_utterance",
                        lambda ckpt, test, path, **k: drawn.setdefault("u", ckpt))
    runs = []
    for exp, seeds in (("prob", (0, 1, 2)), ("score", (0, 1, 2)), ("hard", (1, 2))):
        for seed in seeds:
            d = tmp_path / "runs" / f"{exp}-s{seed}"
            d.mkdir(parents=True)
            runs.append({"experiment": exp, "seed": seed, "run_dir": str(d), "steps": 4,
                         "feature_order": ["spectrogram"],
                         "splits": {"test": {"cer": 0.1, "hyp_key": "hyp_joint"}}})
    summary = {"questions": {"q1": ["prob", "score", "hard"]}, "runs": runs,
               "experiments": {"prob": {}, "score": {}, "hard": {}}}
    args = exp_cli.build_parser().parse_args(
        ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--experiments", "q1",
         "--max-steps", "4"])
    exp_cli.make_plots(summary, args, tmp_path)
    assert drawn == {}  # no checkpoint at all: nothing drawn
    for exp in ("prob", "score", "hard"):  # seed 1's are gone, seed 2's are here
        (tmp_path / "runs" / f"{exp}-s2" / "last.pt").write_bytes(b"x")
    (tmp_path / "runs" / "score-s0" / "last.pt").write_bytes(b"x")  # not shared with hard
    exp_cli.make_plots(summary, args, tmp_path)
    assert sorted(drawn["x"]) == ["hard (seed 2)", "prob (seed 2)", "score (seed 2)"]
    assert all(str(p).endswith("-s2/last.pt") for p in drawn["x"].values())
    assert str(drawn["u"]).endswith("prob-s2/last.pt")  # the baseline's first seed here


def test_plan_counts_an_eval_of_an_older_checkpoint_as_missing(tmp_path):
    args = exp_cli.build_parser().parse_args(
        ["--data", str(tmp_path), "--max-steps", "10", "--backend", "reference"])
    (tmp_path / "test").mkdir()
    d = tmp_path / "runs" / "prob-s0"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"step": 10, "elapsed_s": 1.0}))
    (d / "eval_test.json").write_text(json.dumps({"step": 5}))
    jobs = exp_cli.plan(args, ["prob"], [0], tmp_path / "runs")
    assert len(jobs) == 1 and len(jobs[0]["cmds"]) == 1
    assert "zeromask.cli.eval" in jobs[0]["cmds"][0]
    (d / "eval_test.json").write_text(json.dumps({"step": 10}))
    assert exp_cli.plan(args, ["prob"], [0], tmp_path / "runs") == []


def _job(tmp_path, name, train_code, eval_code):
    return {"name": name, "run_dir": tmp_path / name,
            "cmds": [[sys.executable, "-c", train_code], [sys.executable, "-c", eval_code]]}


def test_run_all_runs_jobs_in_parallel_and_evaluates_only_what_trained(tmp_path):
    """Two jobs at a time on the executor: both sleep 1 s, so together they take ~1 s, not
    2; a job whose training fails is not evaluated; on_done follows every job."""
    import time
    mark = "open('{}', 'w').write('x')"
    jobs = [_job(tmp_path, f"ok{i}", "import time; time.sleep(1)",
                 mark.format(tmp_path / f"eval{i}")) for i in range(2)]
    jobs.append(_job(tmp_path, "bad", "raise SystemExit(3)", mark.format(tmp_path / "evalbad")))
    done = []
    t0 = time.time()
    exp_cli.run_all(jobs, parallel=3, threads=1,
                    on_done=lambda job, rc: done.append((job["name"], rc)))
    assert time.time() - t0 < 1.9
    assert (tmp_path / "eval0").exists() and (tmp_path / "eval1").exists()
    assert not (tmp_path / "evalbad").exists()
    assert (tmp_path / "ok0" / "stdout.txt").exists()
    assert sorted(done) == [("bad", 3), ("ok0", 0), ("ok1", 0)]


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


# ----------------------------------------------------------------------------- plots
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
    evals = [{"step": 1, "cer": 0.9, "joint_cer": 0.5}, {"step": 2, "cer": 0.8}]
    grid = {"prob": {0: {"losses": ([1, 2], [3.0, 2.5]), "evals": evals},
                     1: {"losses": ([1, 2], [3.1, 2.4]), "evals": []}},
            "hard": {0: {"losses": ([1, 2], [3.2, 2.9]), "evals": evals}}}
    assert is_png(plots.plot_question_curves(grid, tmp_path / "q.png", cer_key="joint_cer"))


def test_cross_attention_side_by_side(tones, tmp_path):
    from zeromask.data import CharTokenizer
    from zeromask.models import ModelConfig, SpeechModel
    from zeromask.models.training import save_checkpoint
    ckpts = {}
    for mode in ("prob", "score", "hard"):
        torch.manual_seed(0)
        m = SpeechModel(ModelConfig(d_model=16, num_heads=2, enc_layers=1, dec_self_layers=1,
                                    max_decode_len=6, backend="reference", zero_mode=mode,
                                    feature_order=("spectrogram",)))
        ckpts[mode] = tmp_path / f"{mode}.pt"
        save_checkpoint(ckpts[mode], model=m, tokenizer=CharTokenizer())
    path = plots.plot_cross_attention_compare(ckpts, str(tones / "test"), tmp_path / "x.png",
                                              index=1)
    assert is_png(path)
    with pytest.raises(ValueError, match="stage 'pitch'"):
        plots.plot_cross_attention_compare(ckpts, str(tones / "test"), tmp_path / "y.png",
                                           stage="pitch")


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
