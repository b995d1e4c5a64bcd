"""Experiment runner: train one base config several ways, compare CER/WER on held-out voices.

    python -m zeromask.cli.experiments --data DATA --out experiments/results \\
        --experiments prob,score,inf --seeds 0,1 --max-steps 300

Every run is one ``python -m zeromask.cli.train`` subprocess (its exact command is recorded)
on the same data, base configuration, step budget and seed list; only the experiment's own
flags differ. After training, the run's ``last.pt`` is scored by ``zeromask.cli.eval`` on
``DATA/test`` (voices never seen in training, as ``make-data`` splits them), which keeps
every hypothesis, so differences can be bootstrapped over utterances.

Written under ``--out``:

``results.md``        the table: per experiment mean CER/WER over seeds, spread, steps,
                      train time, difference to the baseline with its noise verdict, and the
                      command reproducing the row
``results.json``      the same numbers, per run too (train command, eval command, backend)
``curves_<exp>.png``  loss vs step, one line per seed; ``curves_all.png`` every run
``utterance_<stage>.png``  baseline (first experiment, first seed): spectrogram + F0,
                      energy, periodicity, zero-token mask and that decoder stage's
                      cross-attention, for one held-out utterance
``runs/<exp>-s<seed>/``  the training runs (reused when already complete: a rerun with
                      the same arguments only trains what is missing)

Noise: a difference to the baseline is called *within noise* when the paired bootstrap
95% interval of the CER difference over held-out utterances (seed-matched runs) contains 0,
or when it is smaller than twice the seed-to-seed standard deviation (pooled over the
experiments that have two or more seeds); both numbers are in the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

# name -> (description, train flags). "{curriculum}" is replaced by --curriculum-steps.
EXPERIMENTS: Dict[str, tuple] = {
    "prob": ("zero-soft attention, zero_mode=prob (baseline)", ["--zero-mode", "prob"]),
    "score": ("zero-soft attention, zero_mode=score", ["--zero-mode", "score"]),
    "inf": ("-inf masking of zero tokens (zero_mode=hard, on the same kernels)",
            ["--zero-mode", "hard"]),
    "const-theta": ("constant learnable theta instead of f0 rotary",
                    ["--zero-mode", "prob", "--no-f0-rotary"]),
    "order-psw": ("feature order pitch, spectrogram, waveform (base: spectrogram, pitch, "
                  "waveform)", ["--zero-mode", "prob", "--feature-order",
                                "pitch,spectrogram,waveform"]),
    "curriculum": ("curriculum: feature stage k enabled from step k*C",
                   ["--zero-mode", "prob", "--curriculum-steps", "{curriculum}"]),
}
BASE_FEATURE_ORDER = "spectrogram,pitch,waveform"


def default_backend() -> str:
    """'cpp' when the fused C++ backend is available here, else 'reference'."""
    import zeromask
    return "cpp" if zeromask.available_backends().get("cpp") is None else "reference"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeromask-experiments",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train/ and test/")
    p.add_argument("--out", default="experiments/results", help="results folder")
    p.add_argument("--runs", help="run folders (default OUT/runs)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                   help=f"comma-separated, first = baseline (known: {', '.join(EXPERIMENTS)})")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps per run")
    p.add_argument("--time-budget", type=float, default=None,
                   help="safety cap in seconds per run (a run cut by it is marked)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--curriculum-steps", type=int, default=None,
                   help="C for the curriculum experiment (default max_steps // 4)")
    p.add_argument("--backend", default=None,
                   help="attention backend for every run (default: cpp if built, else "
                        "reference)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    p.add_argument("--eval-max", type=int, default=None, help="held-out utterances scored")
    p.add_argument("--train-args", default="",
                   help="extra zeromask-train flags for every run (one quoted string)")
    p.add_argument("--plot-index", type=int, default=0, help="held-out utterance to plot")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--data-command", default=None,
                   help="how DATA was made (recorded in the table's notes)")
    p.add_argument("--note", default=None, help="a reading of the results, put under the table")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: tables and plots from the runs already there")
    return p


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def runner_command(args, experiments: Sequence[str], seeds: Sequence[int],
                   out: Optional[str] = None) -> str:
    """The ``python -m zeromask.cli.experiments`` command for these experiments/seeds.

    ``out``: its results folder (a row's command writes its own, not the grid's table);
    the run folders are the same, so it trains only the runs that are missing.
    """
    cmd = ["python", "-m", "zeromask.cli.experiments", "--data", args.data,
           "--out", out or args.out,
           "--experiments", ",".join(experiments), "--seeds", ",".join(map(str, seeds)),
           "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--warmup", str(args.warmup), "--backend", args.backend,
           "--threads", str(args.threads)]
    if args.time_budget is not None:
        cmd += ["--time-budget", str(args.time_budget)]
    if args.curriculum_steps is not None:
        cmd += ["--curriculum-steps", str(args.curriculum_steps)]
    if args.eval_max is not None:
        cmd += ["--eval-max", str(args.eval_max)]
    if args.train_args:
        cmd += ["--train-args", args.train_args]
    cmd += ["--runs", args.runs or os.path.join(args.out, "runs")]
    return " ".join(shlex.quote(c) for c in cmd)


def train_command(args, exp: str, seed: int, run_dir: Path) -> List[str]:
    curriculum = args.curriculum_steps or max(1, args.max_steps // 4)
    flags = [f.replace("{curriculum}", str(curriculum)) for f in EXPERIMENTS[exp][1]]
    cmd = [sys.executable, "-m", "zeromask.cli.train", "--data", args.data,
           "--out", str(run_dir), "--seed", str(seed), "--max-steps", str(args.max_steps),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--warmup", str(args.warmup), "--backend", args.backend,
           "--threads", str(args.threads), "--no-progress", "--log-every", "10",
           "--ckpt-every", "50", "--eval-every", str(max(1, args.max_steps // 3)),
           "--eval-max", "100", "--samples", "0"]
    if "--feature-order" not in flags:
        cmd += ["--feature-order", BASE_FEATURE_ORDER]
    if args.time_budget is not None:
        cmd += ["--time-budget", str(args.time_budget)]
    return cmd + flags + shlex.split(args.train_args)


def eval_command(args, run_dir: Path) -> List[str]:
    cmd = [sys.executable, "-m", "zeromask.cli.eval", "--checkpoint", str(run_dir / "last.pt"),
           "--data", os.path.join(args.data, "test"), "--json", str(run_dir / "eval.json"),
           "--no-progress", "--samples", "3", "--threads", str(args.threads)]
    if args.eval_max is not None:
        cmd += ["--max-utts", str(args.eval_max)]
    return cmd


def _pretty(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote("python" if c == sys.executable else c) for c in cmd)


def _prepare_cache(data: str) -> None:
    """Fill the feature cache once, before parallel runs would race to fill it."""
    from ..data import CharTokenizer, SpeechDataset, find_utterances
    cache = os.path.join(data, ".features")
    for split in ("train", "test"):
        d = os.path.join(data, split)
        if os.path.isdir(d):
            SpeechDataset(find_utterances(d), CharTokenizer(), cache_dir=cache).prepare()


def run_all(jobs: List[dict], parallel: int, threads: int) -> None:
    """Run each job's train command, then (if it succeeded) its eval command, ``parallel``
    jobs at a time on a :class:`concurrent.futures.ThreadPoolExecutor` (each thread waits
    on its own subprocesses; output goes to ``RUN/stdout.txt``).

    SIGTERM or Ctrl-C stops the runs in flight too (zeromask-train saves its checkpoint on
    SIGTERM; a rerun of the same command resumes) and starts no new one.
    """
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor, as_completed

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running, lock, stopping = set(), threading.Lock(), threading.Event()

    def run_job(job: dict) -> int:
        job["run_dir"].mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        rc = 0
        with open(job["run_dir"] / "stdout.txt", "a") as log:
            for cmd in (job["train_cmd"], job["eval_cmd"]):
                with lock:
                    if stopping.is_set():
                        return -1
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
                    running.add(proc)
                rc = proc.wait()
                with lock:
                    running.discard(proc)
                if rc:
                    break
        status = "ok" if rc == 0 else f"FAILED rc={rc}"
        print(f"[experiments] {job['name']} {status} after {time.time() - t0:.0f} s "
              f"(log {job['run_dir'] / 'stdout.txt'})", flush=True)
        return rc

    def _term(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, _term)
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        futures = []
        for job in jobs:
            print(f"[experiments] queue {job['name']}: {_pretty(job['train_cmd'])}", flush=True)
            futures.append(pool.submit(run_job, job))
        for f in as_completed(futures):
            f.result()
    except KeyboardInterrupt:
        with lock:
            stopping.set()
            for proc in running:
                proc.terminate()  # SIGTERM: zeromask-train saves last.pt and exits
        pool.shutdown(wait=True, cancel_futures=True)
        raise SystemExit("zeromask-experiments: interrupted; rerun the same command to resume")
    finally:
        signal.signal(signal.SIGTERM, old)
        pool.shutdown(wait=True)


def _utterance_errors(eval_json: dict) -> Dict[str, tuple]:
    """{utterance id: (character errors, reference characters)} from an eval.json."""
    import jiwer
    out = {}
    for u in eval_json["utterances"]:
        if not u["ref"].strip():
            continue
        o = jiwer.process_characters(u["ref"], u["hyp"])
        out[u["id"]] = (o.substitutions + o.deletions + o.insertions,
                        o.substitutions + o.deletions + o.hits)
    return out


def paired_bootstrap(a: Dict[str, tuple], b: Dict[str, tuple], n: int = 2000,
                     seed: int = 0) -> tuple:
    """(CER_b - CER_a, 2.5 %, 97.5 %) resampling the utterances both runs scored."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("the runs share no scored utterance")
    ea = np.array([a[i][0] for i in ids], float)
    eb = np.array([b[i][0] for i in ids], float)
    na = np.array([a[i][1] for i in ids], float)
    diff = eb.sum() / na.sum() - ea.sum() / na.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(n, len(ids)))
    den = na[idx].sum(axis=1)
    d = (eb[idx].sum(axis=1) - ea[idx].sum(axis=1)) / den
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(diff), float(lo), float(hi)


def _read_log(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def collect(args, experiments: Sequence[str], seeds: Sequence[int], runs_dir: Path) -> dict:
    """Numbers of every finished run and the per-experiment aggregate."""
    runs, per_exp = [], {}
    for exp in experiments:
        rows = []
        for seed in seeds:
            d = runs_dir / f"{exp}-s{seed}"
            ev_path, res_path = d / "eval.json", d / "results.json"
            if not (ev_path.exists() and res_path.exists()):
                continue
            ev = json.loads(ev_path.read_text())
            res = json.loads(res_path.read_text())
            cfg = json.loads((d / "config.json").read_text())
            logs = [r for r in _read_log(d / "log.jsonl") if "loss" in r]
            sps = [r["steps_per_s"] for r in logs if r["step"] > 1]
            evals = [{"step": r["step"], "cer": r["cer"], "n": r["n"]}
                     for r in _read_log(d / "log.jsonl") if r.get("eval")]
            row = {"experiment": exp, "seed": seed, "run_dir": str(d), "cer": ev["cer"],
                   "wer": ev["wer"], "n_eval": ev["n"], "steps": res["step"],
                   "max_steps": args.max_steps, "cut_by_time": res["step"] < args.max_steps,
                   "train_s": res["elapsed_s"], "last_loss": res["last_loss"],
                   "steps_per_s": float(np.median(sps)) if sps else None,
                   "backend": cfg["model"]["backend"], "cer_during_training": evals,
                   "parameters": res["parameters"],
                   "train_command": _pretty(train_command(args, exp, seed, d)),
                   "eval_command": _pretty(eval_command(args, d))}
            rows.append(row)
            runs.append(row)
        if rows:
            cers = np.array([r["cer"] for r in rows])
            wers = np.array([r["wer"] for r in rows])
            per_exp[exp] = {
                "experiment": exp, "description": EXPERIMENTS[exp][0],
                "seeds": [r["seed"] for r in rows], "cer_mean": float(cers.mean()),
                "cer_std": float(cers.std(ddof=1)) if len(rows) > 1 else None,
                "cer_min": float(cers.min()), "cer_max": float(cers.max()),
                "wer_mean": float(wers.mean()),
                "wer_std": float(wers.std(ddof=1)) if len(rows) > 1 else None,
                "steps": sorted({r["steps"] for r in rows}),
                "train_s_mean": float(np.mean([r["train_s"] for r in rows])),
                "backend": sorted({r["backend"] for r in rows}),
                "command": runner_command(args, [exp], [r["seed"] for r in rows],
                                          out=os.path.join(args.out, "rows", exp)),
            }
    # seed noise: pooled within-experiment standard deviation of CER
    ss, dof = 0.0, 0
    for exp in per_exp:
        c = [r["cer"] for r in runs if r["experiment"] == exp]
        if len(c) > 1:
            ss += float(np.sum((np.array(c) - np.mean(c)) ** 2))
            dof += len(c) - 1
    seed_sd = math.sqrt(ss / dof) if dof else None
    base = experiments[0] if experiments and experiments[0] in per_exp else None
    errs = {}
    for r in runs:
        ev = json.loads((Path(r["run_dir"]) / "eval.json").read_text())
        errs[(r["experiment"], r["seed"])] = _utterance_errors(ev)
    for exp, agg in per_exp.items():
        agg["delta_cer"] = agg["delta_lo"] = agg["delta_hi"] = None
        agg["verdict"] = "baseline" if exp == base else "no baseline run"
        if base is None or exp == base:
            continue
        shared = [s for s in agg["seeds"] if s in per_exp[base]["seeds"]]
        if not shared:
            agg["verdict"] = "no seed shared with the baseline"
            continue
        a, b = {}, {}
        for s in shared:  # pool the seed-matched runs as one paired sample
            a.update({(s, k): v for k, v in errs[(base, s)].items()})
            b.update({(s, k): v for k, v in errs[(exp, s)].items()})
        a = {f"{k[0]}/{k[1]}": v for k, v in a.items()}
        b = {f"{k[0]}/{k[1]}": v for k, v in b.items()}
        diff, lo, hi = paired_bootstrap(a, b, n=args.bootstrap)
        agg.update(delta_cer=diff, delta_lo=lo, delta_hi=hi, delta_seeds=shared)
        in_ci = lo <= 0.0 <= hi
        # the s.d. of a difference of two seed means: sd * sqrt(1/n_a + 1/n_b)
        seed_noise = (None if seed_sd is None else
                      seed_sd * math.sqrt(1 / len(agg["seeds"]) + 1 / len(per_exp[base]["seeds"])))
        agg["delta_seed_sd"] = seed_noise
        in_seed = seed_noise is not None and abs(diff) < 2 * seed_noise
        if in_ci or in_seed:
            why = []
            if in_ci:
                why.append("bootstrap CI contains 0")
            if in_seed:
                why.append(f"abs(diff) < 2 x {seed_noise:.3f}, the seed s.d. of the difference")
            agg["verdict"] = "within noise (" + "; ".join(why) + ")"
        else:
            agg["verdict"] = ("better than baseline" if diff < 0 else "worse than baseline") + \
                (" (beyond utterance-bootstrap and seed noise)" if seed_sd is not None else
                 " (beyond utterance-bootstrap noise; seed spread not measured)")
    return {"runs": runs, "experiments": per_exp, "seed_sd": seed_sd, "baseline": base,
            "seed_sd_dof": dof}


def _fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def write_table(summary: dict, args, out: Path) -> str:
    per = summary["experiments"]
    lines = [
        "| experiment | seeds | CER mean | CER s.d. (min–max) | WER mean | steps | train s/run "
        "| ΔCER vs baseline [95% CI] | verdict | command |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for exp, a in per.items():
        spread = (f"{_fmt(a['cer_std'])} ({_fmt(a['cer_min'])}–{_fmt(a['cer_max'])})"
                  if a["cer_std"] is not None else "– (1 seed)")
        delta = ("–" if a["delta_cer"] is None else
                 f"{a['delta_cer']:+.3f} [{a['delta_lo']:+.3f}, {a['delta_hi']:+.3f}]")
        lines.append(
            f"| `{exp}`: {a['description']} | {','.join(map(str, a['seeds']))} | "
            f"{_fmt(a['cer_mean'])} | {spread} | {_fmt(a['wer_mean'])} | "
            f"{'/'.join(map(str, a['steps']))} | {a['train_s_mean']:.0f} | {delta} | "
            f"{a['verdict']} | `{a['command']}` |")
    backends = sorted({b for a in per.values() for b in a["backend"]})
    cut = [f"{r['experiment']}-s{r['seed']}" for r in summary["runs"] if r["cut_by_time"]]
    n_eval = sorted({r["n_eval"] for r in summary["runs"]})
    sd = summary["seed_sd"]
    notes = [
        "",
        f"Held-out set: `{os.path.join(args.data, 'test')}` ({'/'.join(map(str, n_eval))} "
        "utterances, voices never seen in training). Attention backend: "
        f"{', '.join(backends)}. Budget: {args.max_steps} optimizer steps per run "
        f"(batch {args.batch_size}, lr {args.lr}, warmup {args.warmup}, cosine decay)"
        + (f", safety cap {args.time_budget:.0f} s" if args.time_budget else "") + "."
        + (f" Data made with `{args.data_command}`." if args.data_command else ""),
        "",
        "Noise: ΔCER is the seed-matched paired difference to the baseline "
        f"(`{summary['baseline']}`), with a 95% bootstrap interval over held-out utterances "
        f"({args.bootstrap} resamples). Seed-to-seed s.d. of CER (pooled, "
        f"{summary['seed_sd_dof']} d.o.f.): "
        + (f"{sd:.3f}" if sd is not None else "not measured (one seed per experiment)")
        + ". A difference is *within noise* when the interval contains 0 or |ΔCER| is "
        "below twice the seed s.d. of a difference of means (s.d. × √(1/n₁ + 1/n₂), "
        "n = seeds per row); the utterance bootstrap does not include seed-to-seed "
        "variation, so with one seed a 'beyond noise' verdict is weaker than it reads.",
    ]
    notes += ["", "'train s/run' is wall time including the periodic evaluations, on a machine "
              "shared with other work: it varies with the load (the same config took 220-400 "
              "s), so it is no speed comparison (see benchmarks/train_speed.py for that).",
              "", "Whole grid: `" + summary.get("runner_command", "") + "`. A row's command "
              "trains only that row's runs (the run folders are shared; finished runs are "
              "reused) and writes its table under `rows/`."]
    if args.note:
        notes += ["", "Reading: " + args.note]
    if cut:
        notes.append(f"\nCut by the time cap before {args.max_steps} steps: {', '.join(cut)}.")
    text = "\n".join(lines + notes) + "\n"
    (out / "results.md").write_text(text)
    return text


def make_plots(summary: dict, args, runs_dir: Path, out: Path) -> List[Path]:
    from .plots import plot_checkpoint_utterance, plot_curves, read_losses
    written = []
    everything = {}
    for exp in summary["experiments"]:
        curves = {}
        for r in summary["runs"]:
            if r["experiment"] == exp:
                curves[f"seed {r['seed']}"] = read_losses(Path(r["run_dir"]) / "log.jsonl")
                everything[f"{exp} s{r['seed']}"] = curves[f"seed {r['seed']}"]
        written.append(plot_curves(curves, out / f"curves_{exp}.png",
                                   title=f"training loss: {exp}"))
    if everything:
        written.append(plot_curves(everything, out / "curves_all.png",
                                   title="training loss, every run"))
    base = summary["baseline"]
    if base is not None:
        r0 = next(r for r in summary["runs"] if r["experiment"] == base)
        ckpt = Path(r0["run_dir"]) / "last.pt"
        cfg = json.loads((Path(r0["run_dir"]) / "config.json").read_text())
        for stage in cfg["model"]["feature_order"]:
            written.append(plot_checkpoint_utterance(
                ckpt, os.path.join(args.data, "test"), out / f"utterance_{stage}.png",
                index=args.plot_index, stage=stage))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    experiments = _csv(args.experiments)
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown or not experiments:
        raise SystemExit(f"zeromask-experiments: unknown experiments {unknown}; "
                         f"known: {list(EXPERIMENTS)}")
    seeds = [int(s) for s in _csv(args.seeds)]
    args.backend = args.backend or default_backend()
    out = Path(args.out)
    runs_dir = Path(args.runs) if args.runs else out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        _prepare_cache(args.data)
        jobs = []
        for seed in seeds:  # every experiment's first seed before anyone's second
            for exp in experiments:
                d = runs_dir / f"{exp}-s{seed}"
                if (d / "eval.json").exists() and (d / "results.json").exists():
                    print(f"[experiments] {exp}-s{seed} already done, reused")
                    continue
                jobs.append({"name": f"{exp}-s{seed}", "run_dir": d,
                             "train_cmd": train_command(args, exp, seed, d),
                             "eval_cmd": eval_command(args, d)})
        run_all(jobs, max(1, args.parallel), args.threads)
    summary = collect(args, experiments, seeds, runs_dir)
    if not summary["runs"]:
        raise SystemExit("zeromask-experiments: no finished run to report")
    summary["runner_command"] = runner_command(args, experiments, seeds)
    summary["data"] = args.data
    table = write_table(summary, args, out)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plots = make_plots(summary, args, runs_dir, out)
    print(table)
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
