"""zeromask-train / zeromask-eval: end to end, resume, loss goes down, torchrun DDP."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")
pytest.importorskip("librosa")
pytest.importorskip("jiwer")

from zeromask.cli import eval as eval_cli  # noqa: E402
from zeromask.cli import make_data as make_data_cli  # noqa: E402
from zeromask.cli import train as train_cli  # noqa: E402
from zeromask.models.training import BucketBatchSampler, load_checkpoint, lr_lambda  # noqa: E402

from tones import TINY, write_tone_set  # noqa: E402

HAVE_ESPEAK = shutil.which("espeak-ng") is not None


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tones")
    write_tone_set(root / "train", 8, seed=0)
    write_tone_set(root / "test", 3, seed=1)
    return root


def read_log(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_bucket_sampler_splits_ranks_evenly():
    lengths = list(range(100, 137))
    s0 = BucketBatchSampler(lengths, 4, seed=1, rank=0, world=2, pool=3)
    s1 = BucketBatchSampler(lengths, 4, seed=1, rank=1, world=2, pool=3)
    b0, b1 = list(s0), list(s1)
    assert len(b0) == len(b1) == len(s0) == 5  # 10 batches of the 37 items, split evenly
    flat0 = [i for b in b0 for i in b]
    flat1 = [i for b in b1 for i in b]
    assert not set(flat0) & set(flat1)
    assert list(BucketBatchSampler(lengths, 4, seed=1, rank=0, world=2, pool=3)) == b0
    s0.set_epoch(1)
    assert list(s0) != b0
    single = list(BucketBatchSampler(lengths, 4, seed=1))
    assert sorted(i for b in single for i in b) == list(range(37))
    for b in single:  # batches are length buckets: spread within a pool of 12
        assert max(lengths[i] for i in b) - min(lengths[i] for i in b) < 37


def test_lr_schedule():
    f = lr_lambda(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert lr_lambda(0, None)(1000) == 1.0


def test_train_checkpoint_resume_eval(tone_data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(tone_data), "--out", str(out), "--batch-size", "4",
              "--log-every", "1", "--eval-every", "2", "--ckpt-every", "2"] + TINY
    assert train_cli.main(common + ["--max-steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "held-out attention greedy CER" in text and "ref:" in text and "hyp:" in text
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 3 and ck["config"]["d_model"] == 16
    assert (out / "best.pt").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 3 and 0.0 <= results["cer"]
    # resume: continues from step 3 with the saved optimizer and architecture
    assert train_cli.main(common + ["--max-steps", "5", "--d-model", "32"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "at step 3" in text
    ck2 = load_checkpoint(out / "last.pt")
    assert ck2["step"] == 5 and ck2["config"]["d_model"] == 16
    assert ck2["optimizer"]["state"]  # optimizer moments came along
    steps = [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    # a line logged after the checkpoint (an interrupted run) is trained again, not kept twice
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 9.0}) + "\n")
    assert train_cli.main(common + ["--max-steps", "6"]) == 0
    assert [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert 9.0 not in [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]
    # a run folder without its checkpoint (a committed grid) starts over with a fresh log
    for ck in out.glob("*.pt"):
        ck.unlink()
    assert train_cli.main(common + ["--max-steps", "2"]) == 0
    assert [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r] == [1, 2]
    capsys.readouterr()
    # eval CLI on the held-out folder
    assert eval_cli.main(["--checkpoint", str(out / "last.pt"), "--data", str(tone_data),
                          "--json", str(tmp_path / "ev.json"), "--no-progress",
                          "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "CER" in text and "WER" in text
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["n"] == 3 and len(ev["utterances"]) == 3 and 0 <= ev["cer"]


def test_time_budget_stops_training(tone_data, tmp_path):
    out = tmp_path / "budget"
    assert train_cli.main(["--data", str(tone_data), "--out", str(out), "--batch-size", "2",
                           "--time-budget", "0", "--no-eval"] + TINY) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 1  # checked after every step


def test_loss_goes_down_on_a_fixed_batch(tmp_path):
    root = tmp_path / "fixed"
    write_tone_set(root / "train", 2, seed=3)
    out = tmp_path / "run"
    assert train_cli.main(["--train", str(root / "train"), "--out", str(out), "--batch-size",
                           "2", "--max-steps", "40", "--lr", "3e-3", "--warmup", "0",
                           "--log-every", "1", "--no-eval", "--grad-clip", "0",
                           "--dropout", "0"] + TINY) == 0
    losses = [r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:3]), losses


def test_torchrun_ddp_two_cpu_processes_agree(tone_data, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "zeromask.cli.train",
           "--data", str(tone_data), "--out", str(out), "--batch-size", "2", "--max-steps",
           "3", "--eval-every", "0", "--save-rank-states", "--seed", "4",
           "--curriculum-steps", "2"] + TINY
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world 2 on cpu" in res.stdout
    r0 = torch.load(out / "rank0.pt")
    r1 = torch.load(out / "rank1.pt")
    assert r0.keys() == r1.keys()
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=k)
    # they trained (the ranks saw different batches, DDP kept them equal)
    torch.manual_seed(4)
    from zeromask.models import ModelConfig, SpeechModel
    init = SpeechModel(ModelConfig.from_dict(load_checkpoint(out / "last.pt")["config"]))
    moved = [k for k, v in init.state_dict().items() if not torch.equal(v, r0[k])]
    assert len(moved) > 10
    assert int(r0["step"]) == 2  # the curriculum step is part of the state


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed "
                    "(apt-get install -y espeak-ng); make-data needs it")
def test_end_to_end_make_data_train_eval(tmp_path, capsys):
    data = tmp_path / "synth"
    assert make_data_cli.main(["--out", str(data), "--n", "6", "--test-fraction", "0.34",
                               "--engines", "espeak-ng", "--no-shifted", "--jobs", "2",
                               "--no-progress"]) == 0
    out = tmp_path / "run"
    assert train_cli.main(["--data", str(data), "--out", str(out), "--batch-size", "2",
                           "--max-steps", "3", "--eval-every", "0"] + TINY) == 0
    assert eval_cli.main(["--checkpoint", str(out / "last.pt"), "--data", str(data),
                          "--no-progress", "--by", "engine,voice/augment",
                          "--json", str(tmp_path / "eval.json")]) == 0
    text = capsys.readouterr().out
    assert "held-out attention greedy CER" in text  # from the training run's final evaluation
    lines = [l for l in text.splitlines() if l.startswith("checkpoint ")]
    assert len(lines) == 1 and "CER" in lines[0] and "(2 utterances" in lines[0]
    groups = json.loads((tmp_path / "eval.json").read_text())["groups"]
    assert list(groups["engine"]) == ["espeak-ng"] and groups["engine"]["espeak-ng"]["n"] == 2
    assert sum(g["n"] for g in groups["voice/augment"].values()) == 2
    assert all(name.endswith("/none") for name in groups["voice/augment"])  # test/: clean
    with pytest.raises(SystemExit):  # a field no record has: a one-line usage error
        eval_cli.main(["--checkpoint", str(out / "last.pt"), "--data", str(data),
                       "--by", "colour"])
    assert "--by colour: no manifest record" in capsys.readouterr().err


def test_score_groups_is_each_groups_corpus_rate():
    from zeromask.models.training import score_groups
    res = {"ids": ["a", "b", "c", "d"], "refs": ["ab", "ab", "abcd", " "],
           "hyps": ["ab", "xb", "abcd", "zz"], "ctc_hyps": ["xx", "ab", "abcd", ""],
           "cer": 0.0, "ctc_cer": 0.0}
    got = score_groups(res, {"a": "g1", "b": "g1", "c": "g2", "d": "g2"})
    assert list(got) == ["g1", "g2"]
    assert got["g1"]["n"] == 2 and got["g1"]["cer"] == 0.25 and got["g1"]["ctc_cer"] == 0.5
    assert got["g2"]["n"] == 1 and got["g2"]["cer"] == 0.0  # the empty reference left out
    assert "joint_cer" not in got["g1"]  # no such decoder in the result
    assert score_groups(res, {}) == {}


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"d_model": 48, "zero_mode": "score",
                                         "feature_order": ["pitch", "spectrogram"]},
                               "train": {"lr": 5e-4, "batch_size": 3}}))
    args = train_cli.build_parser().parse_args(
        ["--out", str(tmp_path), "--config", str(cfg), "--d-model", "64", "--max-steps", "7",
         "--no-zero-scaling", "--no-f0-rotary", "--feature-order", "waveform,pitch"])
    model_kw, opt = train_cli.resolve(args)
    assert model_kw["d_model"] == 64 and model_kw["zero_mode"] == "score"
    assert model_kw["zero_scaling"] is False and model_kw["f0_rotary"] is False
    assert model_kw["feature_order"] == ["waveform", "pitch"]
    assert opt["lr"] == 5e-4 and opt["batch_size"] == 3 and opt["max_steps"] == 7
    assert not {"zero_tokens", "start_token", "rotary"} & set(model_kw)  # defaults: unset
    args = train_cli.build_parser().parse_args(
        ["--out", str(tmp_path), "--max-steps", "1", "--zero-tokens", "padding",
         "--start-token", "distinct", "--no-rotary"])
    model_kw, _ = train_cli.resolve(args)
    assert (model_kw["zero_tokens"], model_kw["start_token"], model_kw["rotary"]) == \
        ("padding", "distinct", False)
    with pytest.raises(SystemExit):  # argparse rejects a value outside the choices
        train_cli.build_parser().parse_args(["--out", "x", "--zero-tokens", "silent"])
    with pytest.raises(train_cli.UsageError, match="max-steps"):
        train_cli.resolve(train_cli.build_parser().parse_args(["--out", str(tmp_path)]))
    cfg.write_text(json.dumps({"train": {"learning_rate": 1}}))
    with pytest.raises(train_cli.UsageError, match="unknown train options"):
        train_cli.resolve(train_cli.build_parser().parse_args(
            ["--out", str(tmp_path), "--config", str(cfg), "--max-steps", "1"]))


def test_resume_mid_epoch_continues_the_same_batches(tone_data, tmp_path, capsys):
    """An interrupted run resumed mid-epoch ends with the weights of an uninterrupted one.

    8 utterances / batch 2 = 4 batches per epoch; stopping after step 3 and resuming to step 6
    must skip the 3 batches of epoch 0 already trained on (restarting the epoch would train
    on them twice and give other weights). ``--warmup`` above the step count keeps the
    learning rate independent of ``--max-steps``; dropout 0 and 1 thread keep it exact.
    """
    common = ["--data", str(tone_data), "--batch-size", "2", "--no-eval", "--warmup", "100",
              "--dropout", "0", "--log-every", "1", "--ckpt-every", "0"] + TINY
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_cli.main(common + ["--out", str(straight), "--max-steps", "6"]) == 0
    assert train_cli.main(common + ["--out", str(split), "--max-steps", "3"]) == 0
    ck = load_checkpoint(split / "last.pt")
    assert ck["epoch"] == 0 and ck["extra"]["batch_in_epoch"] == 3
    capsys.readouterr()
    assert train_cli.main(common + ["--out", str(split), "--max-steps", "6"]) == 0
    assert "skips the 3 batch(es) of epoch 0" in capsys.readouterr().out
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 1
    assert b["extra"]["batch_in_epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7, msg=k)
    la = [r["loss"] for r in read_log(straight / "log.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_log(split / "log.jsonl") if "loss" in r]
    assert lb == pytest.approx(la, rel=1e-5)


def test_time_budget_counts_the_checkpoints_elapsed_time(tone_data, tmp_path, capsys):
    out = tmp_path / "budget_resume"
    common = ["--data", str(tone_data), "--out", str(out), "--batch-size", "2", "--no-eval"]
    assert train_cli.main(common + ["--max-steps", "2"] + TINY) == 0
    spent = load_checkpoint(out / "last.pt")["extra"]["elapsed"]
    assert spent > 0
    capsys.readouterr()
    # a budget smaller than what the first invocation already used: no further step
    assert train_cli.main(common + ["--time-budget", str(spent / 2)] + TINY) == 0
    assert "already spent" in capsys.readouterr().out
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 2 and ck["extra"]["elapsed"] >= spent
    res = json.loads((out / "results.json").read_text())
    assert res["elapsed_s"] >= spent and res["step"] == 2
    # a larger budget: it goes on, and the elapsed time keeps accumulating
    assert train_cli.main(common + ["--time-budget", str(spent + 600), "--max-steps", "4"]
                          + TINY) == 0
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 4 and ck["extra"]["elapsed"] > spent


def test_weight_average_is_the_ema_of_the_optimizer_weights():
    """WeightAverage after three steps equals the hand-computed exponential average of the
    weights the optimizer produced (the first update copies), and leaves the model alone."""
    from zeromask.models.training import WeightAverage
    torch.manual_seed(0)
    model = _linear_with_step()
    ema = WeightAverage(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    expect = None
    for k in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
        model.step += 1
        ema.update()
        w = [p.detach().clone() for p in model.parameters()]
        expect = w if expect is None else [0.9 * a + 0.1 * b for a, b in zip(expect, w)]
    avg = ema.averaged()
    for a, e, live in zip(avg.parameters(), expect, model.parameters()):
        torch.testing.assert_close(a, e)
        assert not torch.equal(a, live)
    assert int(avg.step) == 3  # buffers follow the live model
    state = ema.state_dict()
    assert state["n_averaged"] == 3 and state["decay"] == 0.9
    other = WeightAverage(_linear_with_step(), 0.9)
    other.load_state_dict(state)
    for a, b in zip(other.average.module.parameters(), avg.parameters()):
        torch.testing.assert_close(a, b)
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightAverage(model, bad)


def _linear_with_step():
    m = torch.nn.Linear(3, 2)
    m.register_buffer("step", torch.tensor(0))
    return m


def test_train_with_ema_keeps_both_weights_and_eval_picks(tone_data, tmp_path, capsys):
    """--ema: last.pt holds the raw weights (for resuming) and the average; zeromask-eval
    scores the average by default, the raw weights with --weights raw; a resume continues
    the average; a checkpoint without one refuses --weights ema."""
    from zeromask.models.training import checkpoint_weights, model_from_checkpoint
    out = tmp_path / "run"
    common = ["--data", str(tone_data), "--out", str(out), "--batch-size", "4",
              "--eval-every", "0", "--no-final-eval", "--lr", "0.01"] + TINY
    assert train_cli.main(common + ["--max-steps", "3", "--ema", "0.5"]) == 0
    ck = load_checkpoint(out / "last.pt")
    assert ck["ema"]["n_averaged"] == 3 and ck["ema"]["decay"] == 0.5
    assert checkpoint_weights(ck) == "ema" and checkpoint_weights(ck, "raw") == "raw"
    avg, raw = model_from_checkpoint(ck), model_from_checkpoint(ck, "raw")
    diff = [not torch.equal(a, b) for a, b in zip(avg.parameters(), raw.parameters())]
    assert any(diff)
    for weights in ("auto", "raw"):
        assert eval_cli.main(["--checkpoint", str(out / "last.pt"), "--data", str(tone_data),
                              "--no-progress", "--samples", "0", "--weights", weights,
                              "--json", str(tmp_path / f"{weights}.json")]) == 0
        rec = json.loads((tmp_path / f"{weights}.json").read_text())
        assert rec["weights"] == ("ema" if weights == "auto" else "raw")
    capsys.readouterr()
    assert train_cli.main(common + ["--max-steps", "5", "--ema", "0.5"]) == 0
    assert load_checkpoint(out / "last.pt")["ema"]["n_averaged"] == 5
    plain = tmp_path / "plain"
    assert train_cli.main(common[:2] + ["--out", str(plain)] + common[4:]
                          + ["--max-steps", "1"]) == 0
    ck = load_checkpoint(plain / "last.pt")
    assert "ema" not in ck and checkpoint_weights(ck) == "raw"
    with pytest.raises(ValueError, match="no weight average"):
        model_from_checkpoint(ck, "ema")
    with pytest.raises(SystemExit):
        eval_cli.main(["--checkpoint", str(plain / "last.pt"), "--data", str(tone_data),
                       "--no-progress", "--weights", "ema"])
    assert "--weights ema: this checkpoint holds no weight average" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(common + ["--max-steps", "1", "--ema", "1.0"])
