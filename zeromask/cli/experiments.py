"""Experiment runner: the design's open questions, one resumable grid of seeded runs.

    python -m zeromask.cli.experiments --data DATA --config scripts/asr_demo.json \\
        --out experiments/issue16 --experiments all --seeds 0,1,2 --max-steps 1200 \\
        --threads 1 --parallel 2

Rows (``EXPERIMENTS``), grouped by question (``QUESTIONS``); ``--experiments`` takes row
names, question ids (``q1`` .. ``q6``) or ``all``, and adds each row's reference:

``q1`` zero tokens soft or hard: ``prob`` (the baseline), ``score``, ``hard`` (-inf on the
       same tokens), ``no-zero`` (no zero tokens: silence and the start token attended
       normally; only the batch padding stays masked, ``--zero-tokens padding``)
``q2`` ``learned-s``: learnable zero scale (from 1e-6) vs ``prob``'s fixed 1e-6; where each
       attention's s ends up is read from the checkpoints
``q3`` ``start-distinct``: a start token of its own, attended normally, vs id 0 (a zero
       token); also the first-character error rate
``q4`` ``const-theta`` (constant learnable theta), ``no-rotary`` vs per-frame f0 theta
``q5`` each stream alone (``prob`` is the recipe's streams: the spectrogram alone with
       scripts/asr_demo.json; ``waveform-only``, ``pitch-only``), ``all-streams``
       (spectrogram, pitch, waveform), and the stage orders ``order-psw``, ``order-wps``
       against ``all-streams``
``q6`` ``curriculum`` (stage k from step k * C) against ``all-streams``

Every run is one ``python -m zeromask.cli.train`` subprocess (its exact command is recorded)
on the same data, recipe (``--config``), step budget and seed list; only the row's own flags
differ (every row pins ``--zero-mode prob`` unless it sets its own). After training, the
run's ``last.pt`` is scored by ``zeromask.cli.eval`` on ``DATA/test`` (voices never seen in
training) and, when it exists, ``DATA/shifted`` (the second held-out set); eval keeps every
hypothesis, so differences can be bootstrapped over utterances. The scored decoder is
``--decoder`` (joint CTC/attention by default; the attention decoder where a model has no
CTC head).

Written under ``--out`` (tables, JSON and plots again after every finished run):

``results.md``        the tables: per row (grouped by question) mean test and shifted CER
                      over seeds, s.d., the difference to the row's reference with its
                      interval and noise verdict, and the command reproducing the row; the
                      first-character error rates; the learned zero scales
``results.json``      the same numbers, per run too (commands, backend, every zero scale)
``curves_<q>.png``    per question: training loss and held-out CER against step (100 test
                      utterances during training, the whole test set at the end), one
                      colour per row, one line style per seed
``cross_attention.png``  the rows of q1 (baseline, ``score``, ``hard``, ``no-zero``; the
                      first seed they share whose checkpoints are all here): their
                      cross-attention on the same held-out utterance, side by side
``utterance_<stage>.png``  the baseline (its first seed with a checkpoint): spectrogram + F0, energy, periodicity, zero tokens
                      and that stage's cross-attention for one held-out utterance
``runs/<row>-s<seed>/``  the runs. Resuming: a run whose training finished is not trained
                      again (an interrupted one resumes from its ``last.pt``), a held-out set
                      already scored on the final checkpoint is not scored again, so a rerun
                      of the same command does only what is missing.

Noise (:func:`compare`): a difference to the reference counts only when it exceeds both
noises: the paired bootstrap 95% interval of the CER difference over held-out utterances
(seed-matched runs pooled) excludes 0, *and* it is at least twice the seed noise of a
difference of two means, ``sd * sqrt(2 / n)`` with ``n`` shared seeds and ``sd`` the
seed-to-seed standard deviation of CER pooled over every row with two or more seeds. With
one seed the seed spread is not measured and no difference counts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One row: its question, what it is, its zeromask-train flags ("{curriculum}" is
    replaced by ``--curriculum-steps``) and the row it is compared with."""
    question: str
    description: str
    flags: Tuple[str, ...] = ()
    reference: Optional[str] = "prob"


QUESTIONS: Dict[str, str] = {
    "q1": "Zero tokens: soft or hard?",
    "q2": "Learnable zero scale vs fixed 1e-6",
    "q3": "Does the model need the start token?",
    "q4": "Pitch in the rotary",
    "q5": "Which features carry the information?",
    "q6": "Curriculum vs all stages from the start",
}
ALL_STREAMS = "spectrogram,pitch,waveform"
#: every row's flags start with these unless the row sets the flag itself
BASE_FLAGS = ("--zero-mode", "prob")
EXPERIMENTS: Dict[str, Experiment] = {
    "prob": Experiment("q1", "zero-soft `prob` (weight x s, s = 1e-6), the recipe as it is: "
                             "the baseline", (), None),
    "score": Experiment("q1", "zero-soft `score` (Echo's logit x s)", ("--zero-mode", "score")),
    "hard": Experiment("q1", "hard -inf masking of the same zero tokens",
                       ("--zero-mode", "hard")),
    "no-zero": Experiment("q1", "no zero tokens: silence and the start token attended "
                                "normally (only batch padding masked)",
                          ("--zero-tokens", "padding")),
    "learned-s": Experiment("q2", "learnable zero scale s (from 1e-6)",
                            ("--learnable-zero-scale",)),
    "start-distinct": Experiment("q3", "a distinct start token (its own id, attended "
                                       "normally) instead of id 0",
                                 ("--start-token", "distinct")),
    "const-theta": Experiment("q4", "constant learnable theta instead of per-frame f0 theta",
                              ("--no-f0-rotary",)),
    "no-rotary": Experiment("q4", "no rotary at all (absolute positions only)",
                            ("--no-rotary",)),
    "waveform-only": Experiment("q5", "the waveform stream alone",
                                ("--feature-order", "waveform")),
    "pitch-only": Experiment("q5", "the pitch stream alone (f0, energy, periodicity)",
                             ("--feature-order", "pitch")),
    "all-streams": Experiment("q5", "all three streams, stages spectrogram, pitch, waveform",
                              ("--feature-order", ALL_STREAMS)),
    "order-psw": Experiment("q5", "stage order pitch, spectrogram, waveform",
                            ("--feature-order", "pitch,spectrogram,waveform"), "all-streams"),
    "order-wps": Experiment("q5", "stage order waveform, pitch, spectrogram",
                            ("--feature-order", "waveform,pitch,spectrogram"), "all-streams"),
    "curriculum": Experiment("q6", "curriculum: stage k (spectrogram, pitch, waveform) from "
                                   "step k x C",
                             ("--feature-order", ALL_STREAMS, "--curriculum-steps",
                              "{curriculum}"), "all-streams"),
}
#: the held-out sets scored, where DATA has them
SPLITS = ("test", "shifted")
#: --decoder -> (eval.json hypothesis key, metric prefix)
DECODER_KEYS = {"joint": ("joint_hyp", "joint_"), "attention": ("hyp", ""),
                "ctc": ("ctc_hyp", "ctc_")}


def default_backend() -> str:
    """'cpp' when the fused C++ backend is available here, else 'reference'."""
    import zeromask
    return "cpp" if zeromask.available_backends().get("cpp") is None else "reference"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeromask-experiments",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train/, test/ (and shifted/)")
    p.add_argument("--config", default=None,
                   help="zeromask-train recipe for every run (e.g. scripts/asr_demo.json)")
    p.add_argument("--out", default="experiments/results", help="results folder")
    p.add_argument("--runs", help="run folders (default OUT/runs)")
    p.add_argument("--experiments", default="all",
                   help="comma-separated rows, question ids (q1..q6) or 'all'; each row's "
                        f"reference is added (rows: {', '.join(EXPERIMENTS)})")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps per run")
    p.add_argument("--time-budget", type=float, default=None,
                   help="safety cap in seconds per run (a run cut by it is marked; results "
                        "then depend on the machine's load)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    p.add_argument("--warmup", type=int, default=None, help="default: the recipe's")
    p.add_argument("--curriculum-steps", type=int, default=None,
                   help="C for the curriculum row (default max_steps // 4)")
    p.add_argument("--backend", default=None,
                   help="attention backend for every run (default: cpp if built, else "
                        "reference)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    p.add_argument("--eval-max", type=int, default=None,
                   help="held-out utterances scored per set (default: all)")
    p.add_argument("--curve-evals", type=int, default=4,
                   help="held-out evaluations during training (100 test utterances each), "
                        "for the curves; 0: none")
    p.add_argument("--decoder", default="joint", choices=list(DECODER_KEYS),
                   help="the decoder whose CER/WER the tables compare")
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


def select_experiments(spec: str) -> List[str]:
    """Row names from ``--experiments`` (names, question ids, 'all'), each row's reference
    added before it, registry order within what was asked for. Raises ValueError."""
    wanted = []
    for tok in _csv(spec):
        if tok == "all":
            wanted += list(EXPERIMENTS)
        elif tok in QUESTIONS:
            wanted += [e for e, x in EXPERIMENTS.items() if x.question == tok]
        elif tok in EXPERIMENTS:
            wanted.append(tok)
        else:
            raise ValueError(f"unknown experiment {tok!r}; known: {', '.join(EXPERIMENTS)}, "
                             f"questions {', '.join(QUESTIONS)} or all")
    if not wanted:
        raise ValueError("no experiment given")
    out: List[str] = []

    def add(e: str) -> None:
        ref = EXPERIMENTS[e].reference
        if ref is not None and ref not in out:
            add(ref)
        if e not in out:
            out.append(e)
    for e in EXPERIMENTS:  # registry order
        if e in wanted:
            add(e)
    return out


def question_rows(experiments: Sequence[str]) -> Dict[str, List[str]]:
    """{question: its rows in table order}: each row preceded by its reference."""
    out: Dict[str, List[str]] = {}
    for e in experiments:
        rows = out.setdefault(EXPERIMENTS[e].question, [])
        ref = EXPERIMENTS[e].reference
        if ref is not None and ref not in rows and ref in experiments:
            rows.append(ref)
        if e not in rows:
            rows.append(e)
    return {q: out[q] for q in QUESTIONS if q in out}


def splits_of(data: str) -> List[str]:
    return [s for s in SPLITS if os.path.isdir(os.path.join(data, s))]


def runner_command(args, experiments: Sequence[str], seeds: Sequence[int],
                   out: Optional[str] = None) -> str:
    """The ``python -m zeromask.cli.experiments`` command for these experiments/seeds.

    ``out``: its results folder (a row's command writes its own, not the grid's table);
    the run folders are the same, so it trains only the runs that are missing.
    """
    cmd = ["python", "-m", "zeromask.cli.experiments", "--data", args.data,
           "--out", out or args.out, "--experiments", ",".join(experiments),
           "--seeds", ",".join(map(str, seeds)), "--max-steps", str(args.max_steps)]
    for flag in ("config", "batch_size", "lr", "warmup", "time_budget", "curriculum_steps",
                 "eval_max"):
        v = getattr(args, flag)
        if v is not None:
            cmd += ["--" + flag.replace("_", "-"), str(v)]
    cmd += ["--backend", args.backend, "--threads", str(args.threads),
            "--curve-evals", str(args.curve_evals), "--decoder", args.decoder]
    if args.train_args:
        cmd += ["--train-args", args.train_args]
    cmd += ["--runs", args.runs or os.path.join(args.out, "runs")]
    return " ".join(shlex.quote(c) for c in cmd)


def row_flags(args, exp: str) -> List[str]:
    """The zeromask-train flags that make row ``exp`` (``BASE_FLAGS`` unless it sets them)."""
    curriculum = args.curriculum_steps or max(1, args.max_steps // 4)
    flags = [f.replace("{curriculum}", str(curriculum)) for f in EXPERIMENTS[exp].flags]
    base = [] if BASE_FLAGS[0] in flags else list(BASE_FLAGS)
    return base + flags


def train_command(args, exp: str, seed: int, run_dir: Path) -> List[str]:
    cmd = [sys.executable, "-m", "zeromask.cli.train", "--data", args.data,
           "--out", str(run_dir), "--seed", str(seed), "--max-steps", str(args.max_steps)]
    if args.config:
        cmd += ["--config", args.config]
    for flag in ("batch_size", "lr", "warmup", "time_budget"):
        v = getattr(args, flag)
        if v is not None:
            cmd += ["--" + flag.replace("_", "-"), str(v)]
    every = max(1, args.max_steps // args.curve_evals) if args.curve_evals > 0 else 0
    cmd += ["--backend", args.backend, "--threads", str(args.threads), "--no-progress",
            "--log-every", "10", "--ckpt-every", "50", "--eval-every", str(every),
            "--eval-max", "100", "--samples", "0", "--no-final-eval"]
    return cmd + row_flags(args, exp) + shlex.split(args.train_args)


def eval_command(args, run_dir: Path, split: str = "test") -> List[str]:
    cmd = [sys.executable, "-m", "zeromask.cli.eval", "--checkpoint", str(run_dir / "last.pt"),
           "--data", os.path.join(args.data, split),
           "--cache-dir", os.path.join(args.data, ".features"),
           "--json", str(run_dir / f"eval_{split}.json"),
           "--no-progress", "--samples", "3", "--threads", str(args.threads)]
    if args.eval_max is not None:
        cmd += ["--max-utts", str(args.eval_max)]
    return cmd


def _pretty(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote("python" if c == sys.executable else c) for c in cmd)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_done(args, run_dir: Path) -> bool:
    """The run finished training: results.json at ``--max-steps`` (or its time cap)."""
    res = _read_json(run_dir / "results.json")
    if res is None:
        return False
    return res["step"] >= args.max_steps or (
        args.time_budget is not None and res["elapsed_s"] >= args.time_budget)


def eval_done(run_dir: Path, split: str) -> bool:
    """``split`` was scored on the checkpoint training ended with."""
    res, ev = _read_json(run_dir / "results.json"), _read_json(run_dir / f"eval_{split}.json")
    return res is not None and ev is not None and ev.get("step") == res["step"]


def plan(args, experiments: Sequence[str], seeds: Sequence[int], runs_dir: Path) -> List[dict]:
    """The jobs still to do: per run, its training (unless finished) and the evaluations
    not yet done on its final checkpoint; every row's first seed before anyone's second."""
    jobs = []
    splits = splits_of(args.data)
    for seed in seeds:
        for exp in experiments:
            d = runs_dir / f"{exp}-s{seed}"
            cmds = []
            trained = train_done(args, d)
            if not trained:
                cmds.append(train_command(args, exp, seed, d))
            cmds += [eval_command(args, d, s) for s in splits
                     if not (trained and eval_done(d, s))]
            if not cmds:
                print(f"[experiments] {exp}-s{seed} already done, reused", flush=True)
                continue
            jobs.append({"name": f"{exp}-s{seed}", "run_dir": d, "cmds": cmds})
    return jobs


def _prepare_cache(data: str) -> None:
    """Fill the feature cache once, before parallel runs would race to fill it."""
    from ..data import CharTokenizer, SpeechDataset, find_utterances
    cache = os.path.join(data, ".features")
    for split in ("train",) + SPLITS:
        d = os.path.join(data, split)
        if os.path.isdir(d):
            SpeechDataset(find_utterances(d), CharTokenizer(), cache_dir=cache).prepare()


def run_all(jobs: List[dict], parallel: int, threads: int,
            on_done: Optional[Callable[[dict, int], None]] = None) -> None:
    """Run each job's commands in order (a failing one stops that job), ``parallel`` jobs
    at a time on a :class:`concurrent.futures.ThreadPoolExecutor` (each thread waits on its
    own subprocesses; output goes to ``RUN/stdout.txt``); ``on_done(job, rc)`` after each
    job (one at a time), e.g. to rewrite the tables.

    SIGTERM or Ctrl-C stops the runs in flight too (zeromask-train saves its checkpoint on
    SIGTERM; a rerun of the same command resumes) and starts no new one.
    """
    import signal
    from concurrent.futures import ThreadPoolExecutor, as_completed

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running, lock, stopping = set(), threading.Lock(), threading.Event()
    done_lock = threading.Lock()

    def run_job(job: dict) -> int:
        job["run_dir"].mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        rc = 0
        with open(job["run_dir"] / "stdout.txt", "a") as log:
            for cmd in job["cmds"]:
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
        if on_done is not None and not stopping.is_set():
            with done_lock:
                try:
                    on_done(job, rc)
                except Exception as exc:  # a report error must not stop the grid
                    print(f"[experiments] report after {job['name']} failed: "
                          f"{type(exc).__name__}: {exc}", flush=True)
        return rc

    def _term(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, _term)
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        futures = []
        for job in jobs:
            print(f"[experiments] queue {job['name']}: "
                  + " && ".join(_pretty(c) for c in job["cmds"]), flush=True)
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


# ----------------------------------------------------------------------------- statistics
def paired_bootstrap(a: Dict[str, tuple], b: Dict[str, tuple], n: int = 2000,
                     seed: int = 0) -> tuple:
    """(rate_b - rate_a, 2.5 %, 97.5 %) resampling the utterances both runs scored; each
    value is (errors, reference count) of one utterance (characters for CER, (0|1, 1) for
    a per-utterance error such as the first character)."""
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


def pooled_sd(groups: Sequence[Sequence[float]]) -> Tuple[Optional[float], int]:
    """(pooled within-group standard deviation, degrees of freedom) over the groups with
    two or more values; (None, 0) when there is none."""
    ss, dof = 0.0, 0
    for g in groups:
        if len(g) > 1:
            x = np.asarray(g, float)
            ss += float(np.sum((x - x.mean()) ** 2))
            dof += len(g) - 1
    return (math.sqrt(ss / dof) if dof else None), dof


def compare(ref: Dict[int, Dict[str, tuple]], exp: Dict[int, Dict[str, tuple]],
            seed_sd: Optional[float], n: int = 2000, rng_seed: int = 0) -> dict:
    """A row against its reference: ``ref`` / ``exp`` are ``{seed: {utterance: (errors,
    count)}}``. The seed-matched runs are pooled into one paired sample (keys ``seed/utt``)
    for :func:`paired_bootstrap`; the seed noise of the difference of the two means is
    ``seed_sd * sqrt(2 / shared seeds)``. ``significant`` only when the interval excludes 0
    and ``|delta| >= 2 x`` that noise (so never without a measured ``seed_sd``).

    Returns ``{delta, lo, hi, seeds, seed_noise, significant, verdict, why}``.
    """
    shared = sorted(set(ref) & set(exp))
    if not shared:
        return {"delta": None, "lo": None, "hi": None, "seeds": [], "seed_noise": None,
                "significant": False, "verdict": "no seed shared with the reference",
                "why": ""}
    a = {f"{s}/{k}": v for s in shared for k, v in ref[s].items()}
    b = {f"{s}/{k}": v for s in shared for k, v in exp[s].items()}
    diff, lo, hi = paired_bootstrap(a, b, n=n, seed=rng_seed)
    seed_noise = None if seed_sd is None else seed_sd * math.sqrt(2.0 / len(shared))
    in_ci = lo <= 0.0 <= hi
    in_seed = seed_noise is not None and abs(diff) < 2 * seed_noise
    why = []  # (no '|': it goes into markdown tables)
    if in_ci:
        why.append("interval contains 0")
    if in_seed:
        why.append(f"below 2 x seed noise {seed_noise:.4f}")
    if seed_noise is None:
        why.append("seed spread not measured (one seed a row)")
    significant = not (in_ci or in_seed) and seed_noise is not None
    if significant:
        verdict = "better" if diff < 0 else "worse"
    elif not (in_ci or in_seed):
        verdict = "beyond utterance noise only"
    else:
        verdict = "within noise"
    return {"delta": diff, "lo": lo, "hi": hi, "seeds": shared, "seed_noise": seed_noise,
            "significant": significant, "verdict": verdict, "why": "; ".join(why)}


# ----------------------------------------------------------------------------- collecting
_ERR_CACHE: Dict[tuple, Dict[str, tuple]] = {}


def utterance_errors(path: Path, key: str = "hyp") -> Dict[str, tuple]:
    """{utterance id: (character errors, reference characters)} of one hypothesis field of
    an eval JSON (memoised on the file's modification time)."""
    ck = (str(path), path.stat().st_mtime_ns, key)
    if ck not in _ERR_CACHE:
        import jiwer
        out = {}
        for u in json.loads(path.read_text())["utterances"]:
            if not u["ref"].strip():
                continue
            o = jiwer.process_characters(u["ref"], u.get(key, ""))
            out[u["id"]] = (o.substitutions + o.deletions + o.insertions,
                            o.substitutions + o.deletions + o.hits)
        _ERR_CACHE[ck] = out
    return _ERR_CACHE[ck]


def first_char_errors(eval_json: dict, key: str = "hyp") -> Dict[str, tuple]:
    """{utterance id: (1 if the hypothesis's first character is not the reference's (an
    empty hypothesis counts as wrong) else 0, 1)} over the non-empty references."""
    out = {}
    for u in eval_json["utterances"]:
        ref = u["ref"].strip().lower()
        if ref:
            out[u["id"]] = (int(u.get(key, "").strip().lower()[:1] != ref[:1]), 1)
    return out


def zero_scales(checkpoint: Path) -> Dict[str, float]:
    """{attention: zero scale s} of every learnable zero scale in a checkpoint (as the
    module uses it: clamped to [1.01 x MIN_ZERO_SCALE, 1]); {} when none is learnable."""
    import torch
    from ..modules import _LOG_MIN_ZERO_SCALE
    sd = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    suffix = ".zero_scale_log"
    return {k[:-len(suffix)]: float(v.clamp(_LOG_MIN_ZERO_SCALE, 0.0).exp())
            for k, v in sd.items() if k.endswith(suffix)}


def run_zero_scales(run_dir: Path) -> Optional[Dict[str, float]]:
    """:func:`zero_scales` of ``run_dir/last.pt``, kept beside it in ``zero_scales.json``
    so that a run's numbers outlive its checkpoint (the committed grid keeps no ``.pt``);
    None when neither is there."""
    ckpt, cached = run_dir / "last.pt", run_dir / "zero_scales.json"
    if ckpt.exists():
        if not cached.exists() or cached.stat().st_mtime < ckpt.stat().st_mtime:
            _write_atomic(cached, json.dumps(zero_scales(ckpt), indent=2))
    return _read_json(cached)


def _read_log(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _mean_sd(x: Sequence[float]) -> dict:
    a = np.asarray(x, float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else None,
            "min": float(a.min()), "max": float(a.max())}


def read_run(args, exp: str, seed: int, d: Path, splits: Sequence[str]) -> Optional[dict]:
    """The numbers of one run with finished training and a test evaluation, else None."""
    res = _read_json(d / "results.json")
    if res is None or not eval_done(d, "test") or not train_done(args, d):
        return None
    cfg = json.loads((d / "config.json").read_text())
    log = _read_log(d / "log.jsonl")
    sps = [r["steps_per_s"] for r in log if "loss" in r and r["step"] > 1]
    row = {"experiment": exp, "seed": seed, "run_dir": str(d), "steps": res["step"],
           "max_steps": args.max_steps, "cut_by_time": res["step"] < args.max_steps,
           "train_s": res["elapsed_s"], "last_loss": res["last_loss"],
           "steps_per_s": float(np.median(sps)) if sps else None,
           "backend": cfg["model"]["backend"], "feature_order": cfg["model"]["feature_order"],
           "parameters": res["parameters"],
           "cer_during_training": [{k: r[k] for k in r if k in ("step", "n") or
                                    k.endswith("cer")} for r in log if r.get("eval")],
           "train_command": _pretty(train_command(args, exp, seed, d)),
           "eval_commands": {}, "splits": {}}
    for split in splits:
        if not eval_done(d, split):
            continue
        path = d / f"eval_{split}.json"
        ev = json.loads(path.read_text())
        key, prefix = DECODER_KEYS[args.decoder]
        if prefix + "cer" not in ev:  # no CTC head: the attention decoder
            key, prefix = DECODER_KEYS["attention"]
        att, main = first_char_errors(ev, "hyp"), first_char_errors(ev, key)
        row["splits"][split] = {
            "decoder": "attention" if prefix == "" else prefix[:-1], "hyp_key": key,
            "cer": ev[prefix + "cer"], "wer": ev[prefix + "wer"], "n": ev["n"],
            "all": {k: ev[k] for k in ev if k.endswith("cer") or k.endswith("wer")},
            "first_char_error": float(np.mean([e for e, _ in main.values()])),
            "first_char_error_attention": float(np.mean([e for e, _ in att.values()])),
            "unended": ev.get("unended")}
        row["eval_commands"][split] = _pretty(eval_command(args, d, split))
    s = run_zero_scales(d)
    if s is not None:
        row["zero_scales"] = s
        if s:
            row["zero_scale"] = _mean_sd(list(s.values()))
    return row


def collect(args, experiments: Sequence[str], seeds: Sequence[int], runs_dir: Path) -> dict:
    """Numbers of every finished run, the per-row aggregates and each row's comparison with
    its reference on every held-out set (CER of ``--decoder``, and the first-character
    error rates)."""
    splits = splits_of(args.data)
    runs = [r for exp in experiments for seed in seeds
            if (r := read_run(args, exp, seed, runs_dir / f"{exp}-s{seed}", splits))]
    by = {e: [r for r in runs if r["experiment"] == e] for e in experiments}
    metrics = [(s, m) for s in splits for m in ("cer", "first_char_error_attention",
                                                "first_char_error")]
    seed_sd, dof = {}, {}
    for split, m in metrics:
        groups = [[r["splits"][split][m] for r in rows if split in r["splits"]]
                  for rows in by.values()]
        seed_sd[f"{split}/{m}"], dof[f"{split}/{m}"] = pooled_sd(groups)

    def per_utt(rows, split, m):
        out = {}
        for r in rows:
            if split not in r["splits"]:
                continue
            path = Path(r["run_dir"]) / f"eval_{split}.json"
            key = r["splits"][split]["hyp_key"]
            if m == "cer":
                out[r["seed"]] = utterance_errors(path, key)
            else:
                ev = json.loads(path.read_text())
                out[r["seed"]] = first_char_errors(
                    ev, "hyp" if m == "first_char_error_attention" else key)
        return out

    per_exp = {}
    for exp, rows in by.items():
        if not rows:
            continue
        x = EXPERIMENTS[exp]
        agg = {"experiment": exp, "question": x.question, "description": x.description,
               "reference": x.reference, "flags": row_flags(args, exp),
               "seeds": [r["seed"] for r in rows],
               "feature_order": rows[0]["feature_order"],
               "steps": sorted({r["steps"] for r in rows}),
               "train_s_mean": float(np.mean([r["train_s"] for r in rows])),
               "backend": sorted({r["backend"] for r in rows}),
               "command": runner_command(args, [exp], [r["seed"] for r in rows],
                                         out=os.path.join(args.out, "rows", exp)),
               "splits": {}, "vs_reference": {}}
        for split in splits:
            have = [r for r in rows if split in r["splits"]]
            if have:
                agg["splits"][split] = dict(
                    {m: _mean_sd([r["splits"][split][m] for r in have])
                     for m in ("cer", "wer", "first_char_error_attention", "first_char_error")},
                    seeds=[r["seed"] for r in have],
                    decoder=sorted({r["splits"][split]["decoder"] for r in have}))
        scales = [v for r in rows for v in r.get("zero_scales", {}).values()]
        if scales:
            agg["zero_scale"] = dict(_mean_sd(scales), n=len(scales), runs=len(rows))
        ref = x.reference
        if ref is not None:
            for split, m in metrics:
                if ref not in by or not by[ref]:
                    c = {"verdict": "no reference run", "significant": False,
                         "delta": None}
                else:
                    c = compare(per_utt(by[ref], split, m), per_utt(rows, split, m),
                                seed_sd[f"{split}/{m}"], n=args.bootstrap)
                agg["vs_reference"][f"{split}/{m}"] = c
        per_exp[exp] = agg
    return {"runs": runs, "experiments": per_exp, "seed_sd": seed_sd, "seed_sd_dof": dof,
            "splits": splits, "questions": question_rows([e for e in experiments
                                                          if e in per_exp]),
            "decoder": args.decoder}


# ----------------------------------------------------------------------------- the tables
def _fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def _mean_cell(stats: Optional[dict]) -> Tuple[str, str]:
    if not stats:
        return "–", "–"
    m = stats["mean"]
    sd = (f"{stats['sd']:.3f} ({stats['min']:.3f}–{stats['max']:.3f})"
          if stats["sd"] is not None else "– (1 seed)")
    return f"{m:.3f}", sd


def _delta_cell(c: Optional[dict], ref: Optional[str]) -> Tuple[str, str]:
    """(Δ cell, verdict cell); ``ref`` None: the row is shown as a reference."""
    if ref is None:
        return "reference", ""
    if c is None:
        return "–", "not scored"
    if c.get("delta") is None:
        return "–", c["verdict"]
    verdict = f"**{c['verdict']}**" if c["significant"] else c["verdict"]
    if c.get("why") and not c["significant"]:
        verdict += f": {c['why']}"
    return f"{c['delta']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] vs `{ref}`", verdict


def write_table(summary: dict, args, out: Path) -> str:
    per, splits = summary["experiments"], summary["splits"]
    other = [s for s in splits if s != "test"]
    head = ["row", "seeds", "streams", "test CER", "s.d. (min–max)", "ΔCER vs reference "
            "[95% CI]", "verdict", "test WER"]
    for s in other:
        head += [f"{s} CER (s.d.)", f"Δ {s} [95% CI]", f"{s} verdict", f"{s} WER"]
    head += ["steps", "command"]
    lines = [f"Decoder: {summary['decoder']} (greedy); CER and WER of every held-out "
             "utterance scored.", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for q, rows in summary["questions"].items():
        lines.append(f"| **{q}. {QUESTIONS[q]}** |" + " |" * (len(head) - 1))
        for exp in rows:
            a = per[exp]
            # a row of another question is here as this one's reference
            ref = a["reference"] if a["question"] == q else None
            t = a["splits"].get("test", {})
            cer, sd = _mean_cell(t.get("cer"))
            d, v = _delta_cell(a["vs_reference"].get("test/cer"), ref)
            cells = [f"`{exp}`: {a['description']}", ",".join(map(str, a["seeds"])),
                     ",".join(a["feature_order"]), cer, sd, d, v,
                     _mean_cell(t.get("wer"))[0]]
            for s in other:
                st = a["splits"].get(s, {})
                c, csd = _mean_cell(st.get("cer"))
                d, v = _delta_cell(a["vs_reference"].get(f"{s}/cer"), ref)
                cells += [f"{c} ({csd.split(' ')[0]})", d, v, _mean_cell(st.get("wer"))[0]]
            cells += ["/".join(map(str, a["steps"])), f"`{a['command']}`"]
            lines.append("| " + " | ".join(cells) + " |")
    # first characters (question 3's second number), every row
    lines += ["", "First-character error rate (how often the hypothesis's first character "
              "is not the reference's; an empty hypothesis counts as wrong), held-out "
              f"`test`{', ' + ', '.join(f'`{s}`' for s in other) if other else ''}:", "",
              "| row | split | attention decoder | Δ vs reference [95% CI] | verdict | "
              f"{summary['decoder']} decoder | Δ vs reference [95% CI] | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(e for rows in summary["questions"].values() for e in rows))
    for exp in order:  # each row once, against its own reference
        a = per[exp]
        for s in splits:
            st = a["splits"].get(s)
            if not st:
                continue
            cells = [f"`{exp}` ({a['question']})", s]
            for m in ("first_char_error_attention", "first_char_error"):
                d, v = _delta_cell(a["vs_reference"].get(f"{s}/{m}"), a["reference"])
                cells += [f"{st[m]['mean']:.3f}", d, v]
            lines.append("| " + " | ".join(cells) + " |")
    learned = [(e, a) for e, a in per.items() if "zero_scale" in a]
    if learned:
        lines += ["", "Learned zero scales (every attention's s in each run's `last.pt`, all "
                  "seeds together; the start value 1e-6):", "",
                  "| row | attentions x runs | mean s | min s | max s |", "|---|---|---|---|---|"]
        for e, a in learned:
            z = a["zero_scale"]
            lines.append(f"| `{e}` | {z['n'] // z['runs']} x {z['runs']} | {z['mean']:.3g} | "
                         f"{z['min']:.3g} | {z['max']:.3g} |")
    backends = sorted({b for a in per.values() for b in a["backend"]})
    cut = [f"{r['experiment']}-s{r['seed']}" for r in summary["runs"] if r["cut_by_time"]]
    n_eval = {s: sorted({r["splits"][s]["n"] for r in summary["runs"] if s in r["splits"]})
              for s in splits}
    sd = summary["seed_sd"]
    recipe = f"recipe `{args.config}`" if args.config else "zeromask-train's defaults"
    extra = ", ".join(f"{k.replace('_', ' ')} {getattr(args, k)}"
                      for k in ("batch_size", "lr", "warmup") if getattr(args, k) is not None)
    notes = [
        "",
        "Held-out sets: " + "; ".join(f"`{os.path.join(args.data, s)}` "
                                      f"({'/'.join(map(str, n_eval[s]))} utterances)"
                                      for s in splits)
        + ". Attention backend: " + ", ".join(backends)
        + f". Budget: {args.max_steps} optimizer steps per run, {recipe}"
        + (f" with {extra}" if extra else "") + f", {args.threads} thread(s) a run"
        + (f", safety cap {args.time_budget:.0f} s" if args.time_budget else "") + "."
        + (f" Data made with `{args.data_command}`." if args.data_command else ""),
        "",
        "Noise: Δ is the seed-matched paired difference to the row's reference, with a 95% "
        f"bootstrap interval over held-out utterances ({args.bootstrap} resamples). "
        "Seed-to-seed s.d. (pooled over the rows with 2+ seeds): "
        + "; ".join(f"{k} {_fmt(v, 4)} ({summary['seed_sd_dof'][k]} d.o.f.)"
                    for k, v in sd.items() if k.endswith("/cer") or "attention" in k)
        + ". A difference counts (**better** / **worse**) only when the interval excludes 0 "
        "and |Δ| is at least twice the seed noise of a difference of two means, s.d. × "
        "√(2/n) with n shared seeds and s.d. pooled over the rows with 2+ seeds (a row with "
        "one seed is judged with the other rows' seed spread, against the larger threshold "
        "2 s.d. √2; with no row of 2+ seeds nothing counts). Pure noise passes this rule about "
        "once in 15 comparisons (tests/test_experiments.py), so in a grid of many rows one "
        "such verdict may be chance; one that holds on both held-out sets is firmer.",
        "",
        "Whole grid: `" + summary.get("runner_command", "") + "`. A row's command trains "
        "only that row's runs and its reference's (the run folders are shared; finished runs "
        "are reused) and writes its table under `rows/`.",
    ]
    if args.note:
        notes += ["", "Reading: " + args.note]
    if cut:
        notes.append(f"\nCut by the time cap before {args.max_steps} steps: {', '.join(cut)}.")
    text = "\n".join(lines + notes) + "\n"
    _write_atomic(out / "results.md", text)
    return text


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report(args, experiments, seeds, runs_dir: Path, out: Path) -> Optional[dict]:
    """Collect the finished runs, write results.md and results.json; None when none."""
    summary = collect(args, experiments, seeds, runs_dir)
    if not summary["runs"]:
        return None
    summary["runner_command"] = runner_command(args, experiments, seeds)
    summary["data"] = args.data
    summary["table"] = write_table(summary, args, out)
    _write_atomic(out / "results.json", json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- plots
def _checkpoints_here(ckpts, plot: Path) -> bool:
    """True when every checkpoint a plot is drawn from exists; else says which is missing
    (a grid resumed from committed results keeps its numbers, not its checkpoints) and
    that the plot, if drawn earlier, is left as it was."""
    missing = [str(c) for c in ckpts if not Path(c).exists()]
    if missing:
        print(f"[experiments] {plot.name} not redrawn: no checkpoint {', '.join(missing)}",
              flush=True)
    return not missing

def make_plots(summary: dict, args, out: Path) -> List[Path]:
    from .plots import (plot_checkpoint_utterance, plot_cross_attention_compare,
                        plot_question_curves, read_evals, read_losses)
    written = []
    for q, rows in summary["questions"].items():
        curves = {}
        for exp in rows:
            for r in summary["runs"]:
                if r["experiment"] == exp:
                    log = Path(r["run_dir"]) / "log.jsonl"
                    evals = read_evals(log)
                    final = r["splits"]["test"]  # the last point: the whole test set
                    evals.append({"step": r["steps"], final["hyp_key"].replace("hyp", "cer"):
                                  final["cer"]})
                    curves.setdefault(exp, {})[r["seed"]] = {"losses": read_losses(log),
                                                             "evals": evals}
        if curves:
            written.append(plot_question_curves(
                curves, out / f"curves_{q}.png", title=f"{q}. {QUESTIONS[q]}",
                cer_key=DECODER_KEYS[args.decoder][1] + "cer"))
    # q1's rows on one utterance, side by side: the first seed they all have whose
    # checkpoints are all here (a grid resumed from committed numbers has lost the earlier
    # seeds' checkpoints), else the first seed they all have, else each row's first seed
    runs = {(r["experiment"], r["seed"]): r for r in summary["runs"]}
    q1 = summary["questions"].get("q1", [])
    seeds = {e: sorted(s for x, s in runs if x == e) for e in q1}
    shared = sorted(set.intersection(*map(set, seeds.values()))) if seeds else []

    def q1_checkpoints(seed_of):
        return {f"{e} (seed {seed_of(e)})": Path(runs[(e, seed_of(e))]["run_dir"]) / "last.pt"
                for e in q1}
    test = os.path.join(args.data, "test")
    if len(q1) >= 2:
        candidates = [q1_checkpoints(lambda e, s=s: s) for s in shared]
        present = [c for c in candidates if all(p.exists() for p in c.values())]
        ckpts = (present or candidates or [q1_checkpoints(lambda e: seeds[e][0])])[0]
        if _checkpoints_here(ckpts.values(), out / "cross_attention.png"):
            written.append(plot_cross_attention_compare(
                ckpts, test, out / "cross_attention.png", index=args.plot_index,
                cache_dir=os.path.join(args.data, ".features")))
    base = "prob" if "prob" in summary["experiments"] else None
    if base is not None:
        base_runs = sorted((r for r in summary["runs"] if r["experiment"] == base),
                           key=lambda r: r["seed"])
        # its first seed with a checkpoint here, else its first seed
        r0 = next((r for r in base_runs if (Path(r["run_dir"]) / "last.pt").exists()),
                  base_runs[0])
        for stage in r0["feature_order"]:
            if not _checkpoints_here([Path(r0["run_dir"]) / "last.pt"],
                                     out / f"utterance_{stage}.png"):
                continue
            written.append(plot_checkpoint_utterance(
                Path(r0["run_dir"]) / "last.pt", test, out / f"utterance_{stage}.png",
                index=args.plot_index, stage=stage,
                cache_dir=os.path.join(args.data, ".features")))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        experiments = select_experiments(args.experiments)
    except ValueError as exc:
        raise SystemExit(f"zeromask-experiments: {exc}")
    if args.max_steps < 1:
        raise SystemExit("zeromask-experiments: --max-steps must be >= 1")
    if args.config and not os.path.isfile(args.config):
        raise SystemExit(f"zeromask-experiments: --config {args.config} is not a file")
    seeds = [int(s) for s in _csv(args.seeds)]
    args.backend = args.backend or default_backend()
    out = Path(args.out)
    runs_dir = Path(args.runs) if args.runs else out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        _prepare_cache(args.data)
        jobs = plan(args, experiments, seeds, runs_dir)

        def on_done(job, rc):
            summary = report(args, experiments, seeds, runs_dir, out)
            if summary is not None:
                make_plots(summary, args, out)
        run_all(jobs, max(1, args.parallel), args.threads, on_done=on_done)
    summary = report(args, experiments, seeds, runs_dir, out)
    if summary is None:
        raise SystemExit("zeromask-experiments: no finished run to report")
    plots = make_plots(summary, args, out)
    print(summary["table"])
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
