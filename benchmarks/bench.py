"""The benchmark command: zeromask against SDPA and the other ways users do this today.

    python benchmarks/bench.py                        # the cpu suite (gpu with CUDA)
    python benchmarks/bench.py --suite cpu-quick      # a one-minute version
    python benchmarks/bench.py --suite model          # the speech model's shapes (issue 15)
    python benchmarks/bench.py --help                 # every option

Runs a suite of shapes for the attention op and the rotary op, forward and forward+backward,
over every *provider* (one way of computing the op: ``bench_attention.py``,
``bench_rotary.py``), prints which CPU it runs on, a markdown table, and how far the times
are from the committed results of the same suite, and writes, under
``runs/bench/<device-slug>/`` of this checkout (git-ignored; ``--out
benchmarks/results/<device-slug>`` publishes a run into the repository, a deliberate
step)::

    <suite>.md                      the table (device, versions, date, commit in its header)
    <suite>.json                    every raw number
    <suite>_attention_time.png      median time vs L, one line per provider
    <suite>_attention_memory.png    peak memory vs L, one line per provider
    <suite>_rotary_time.png / <suite>_rotary_memory.png
    model_attention_time.png / model_attention_ratio.png   (model suite: bars per shape)

The exit status is 1 when a provider's output disagrees with the float64 reference. This
is not installed with the package: it runs from a source checkout (``bash run.sh`` runs
it after setting up).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # runner, report and the op files sit beside this one
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import report  # noqa: E402
import runner  # noqa: E402
import zeromask  # noqa: E402
from runner import DTYPES, MODES, OPS, SUITES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/bench.py",
        description="Benchmark zeromask's attention and rotary against SDPA, SDPA+bias+rope, "
                    "FlexAttention+rope and the naive reference; print a markdown table and "
                    "write it with PNG plots and raw JSON under runs/bench/<device>/.")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="shape set (default: gpu when CUDA is available, else cpu); cpu: "
                        "L 256..2048, D 64/128, fp32; cpu-quick: L 256/512, D 64; gpu: "
                        "L 1k..16k, D 64/128, bf16; model: the reference speech model's "
                        "attention calls (encoder, decoder, cross, decode steps, per-call "
                        "overhead, head dims 24-96), 1 thread unless --threads")
    p.add_argument("--full", action="store_true",
                   help="the long version: cpu adds L=4096; gpu adds fp16")
    p.add_argument("--lengths", type=int, nargs="+", help="override the sequence lengths")
    p.add_argument("--head-dims", type=int, nargs="+", help="override the head dims")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="override the dtypes")
    p.add_argument("--batch", type=int, help="override the batch size")
    p.add_argument("--heads", type=int, help="override the number of heads")
    p.add_argument("--shapes", nargs="+", metavar="TAG",
                   help="model suite: only these of its calls ("
                        + ", ".join(runner.MODEL_TAGS) + ")")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: both")
    p.add_argument("--ops", nargs="+", choices=OPS, help="default: both")
    p.add_argument("--providers", nargs="+",
                   help="names or globs, e.g. 'zeromask' (every zeromask[*]) sdpa naive; the "
                        "baseline (sdpa / rope-table) is always kept (model suite default: "
                        "zeromask sdpa sdpa+bias+rope naive)")
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--zero-mode", choices=("prob", "score"), default=None,
                   help="zero_mode of zeromask[*] and naive (default prob)")
    p.add_argument("--zero-frac", type=float, default=None, help="fraction of zero keys (0.2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: every core this process may use; "
                        "1 for the model suite)")
    p.add_argument("--min-reps", type=int, default=3, help="timed calls at least (3)")
    p.add_argument("--max-reps", type=int, default=1000, help="timed calls at most (1000)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of interleaved timing per provider of a shape, beyond "
                        "--min-reps calls (cpu 0.4, gpu 0.5, model 1.0)")
    p.add_argument("--mem-cap-gb", type=float, default=None,
                   help="skip providers that materialise L x L above this estimate (default: "
                        "half the available RAM on CPU, 80%% of free GPU memory)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check of each forward against the float64 reference")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: runs/bench/<device-slug>/ of this checkout: "
                        "never a tracked file; publish with --out "
                        "benchmarks/results/<device-slug>)")
    p.add_argument("--note", default=None, help="a line added to the report header")
    p.add_argument("--update-readme", type=Path, nargs="?", default=None, metavar="README",
                   const=HERE / "README.md",
                   help="also write this run's summary (target check, attention times, "
                        "plots) into README (default: benchmarks/README.md) between "
                        f"'{report.MARKER}:<device>/<suite>' comment markers")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the compute-ceiling measurement (the CPU's fp32 FMA peak, at "
                        "the start and the end of the run, from benchmarks/fma_peak.cpp "
                        "built on first use) that the target check compares with")
    p.add_argument("--no-compare", action="store_true",
                   help="do not compare with the committed results under benchmarks/results/")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--list", action="store_true",
                   help="list the providers and whether each can run here, then exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    suite = args.suite or runner.default_suite()
    cfg = runner.make_config(
        suite, full=args.full, shapes=args.shapes, lengths=args.lengths,
        head_dims=args.head_dims, dtypes=args.dtypes, batch=args.batch, heads=args.heads,
        modes=args.modes, ops=args.ops, causal=args.causal or None, zero_mode=args.zero_mode,
        zero_frac=args.zero_frac)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print(f"suite {suite!r} needs a CUDA device and torch {torch.__version__} sees none; "
              "use --suite cpu", file=sys.stderr)
        return 2
    if cfg.device == "cpu":
        torch.set_num_threads(args.threads or cfg.threads or runner.usable_cores())
    elif args.threads:
        torch.set_num_threads(args.threads)
    budget_s = args.time_budget if args.time_budget is not None else (
        cfg.time_budget if cfg.time_budget is not None else
        0.5 if cfg.device == "cuda" else 0.4)

    chosen = args.providers or cfg.providers
    provs = {op: runner.select_providers(runner.providers(op, cfg.zero_mode), chosen)
             for op in cfg.ops}
    if args.list:
        print("zeromask backends:", json.dumps(zeromask.available_backends()))
        for op, ps in provs.items():
            for p in ps:
                print(f"{op:9s} {p.name:22s} {p.semantics}")
        return 0

    cpu = runner.cpu_info() if cfg.device == "cpu" else None
    cpu_text = runner.describe_cpu(cpu, torch.get_num_threads()) if cpu else None
    print(f"benchmark suite {suite!r} on "
          + (cpu_text or runner.device_name(cfg.device)), flush=True)

    out_dir = args.out
    if out_dir is None:
        # a user's run writes where nothing is tracked (runs/ is git-ignored); publishing
        # into benchmarks/results/ is a deliberate --out
        root = runner.repo_root() or Path.cwd()
        out_dir = root / "runs" / "bench" / runner.device_slug(cfg.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    mem_budget = runner.memory_budget(cfg.device, args.mem_cap_gb)
    workloads = cfg.workloads()
    n_cells = sum(len(provs[w.op]) for w in workloads)
    rows: List[runner.Row] = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=n_cells, unit="cell", disable=args.no_progress, dynamic_ncols=True)
    except ImportError:  # the [bench] extra brings tqdm; run without a bar otherwise
        bar = None
    ref_cache: dict = {}
    started = time.perf_counter()
    load_start = runner.loadavg()
    why_no_ceiling: List[str] = []
    ceilings = [] if args.no_ceiling else [runner.compute_ceiling(cfg.device,
                                                                  why_not=why_no_ceiling)]
    for w in workloads:
        got = runner.run_workload(provs[w.op], w, runner.make_inputs(w), mem_budget=mem_budget,
                                  min_reps=args.min_reps, max_reps=args.max_reps,
                                  budget_s=budget_s,
                                  ref_cache=None if args.no_check else ref_cache,
                                  measure_memory=not args.no_memory,
                                  progress=bar.set_description if bar is not None else None)
        rows += got
        if bar is not None:
            bar.update(len(got))
    if bar is not None:
        bar.close()
    if ceilings and ceilings[0]:  # again at the end: the better of two, as load comes and goes
        ceilings.append(runner.compute_ceiling(cfg.device))
    runner.add_ratios(rows)

    stem = suite + ("-full" if args.full else "")
    meta = {
        "suite": suite, "device": cfg.device, "device_name": runner.device_name(cfg.device),
        "device_slug": runner.device_slug(cfg.device), "cpu": cpu, "cpu_description": cpu_text,
        "versions": runner.versions(),
        "commit": runner.git_commit(runner.repo_root() or Path.cwd()),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "threads": torch.get_num_threads(), "min_reps": args.min_reps,
        "max_reps": args.max_reps, "time_budget_s": budget_s,
        "memory_method": runner.MEMORY_METHOD[cfg.device], "mem_cap_bytes": mem_budget,
        "backends": zeromask.available_backends(),
        "flops": "4*B*H*Lq*Lk*D forward (/2 causal with Lq = Lk; the visible pairs for a "
                 "causal Lq < Lk); fwd+bwd = 3.5x forward (bwd = 2.5x)",
        "compute_ceiling": max((c for c in ceilings if c), key=lambda c: c["flop_per_s"],
                               default=None),
        "compute_ceiling_unavailable": why_no_ceiling[0] if why_no_ceiling else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_1min": [load_start, runner.loadavg()],
        "cpu_cores": runner.usable_cores(),
        "config": {**asdict(cfg)}, "note": args.note,
        "command": shlex.join(["python", "benchmarks/bench.py",
                               *(sys.argv[1:] if argv is None else argv)]),
    }
    # read before this run's files are written: with --out benchmarks/results/<slug> the
    # comparison is with the run being replaced
    meta["committed"] = [] if args.no_compare else report.compare_committed(rows, meta, stem)
    info = {op: {p.name: p.semantics for p in ps} for op, ps in provs.items()}
    table = report.markdown(meta, rows, info)
    md_path = out_dir / f"{stem}.md"
    json_path = out_dir / f"{stem}.json"
    written = [md_path, json_path]
    pngs = []
    if not args.no_plots:
        title_of = (lambda op, what: f"zeromask benchmarks {stem}: {op} {what} on "
                    f"{cpu_text or meta['device_name']} (torch {meta['versions']['torch']}, "
                    f"{meta['commit'][:12]}, {meta['date']})")
        if cfg.shapes is not None:
            for what in ("ratio", "time"):
                got = report.plot_model(rows, what, out_dir / f"{stem}_attention_{what}.png",
                                        title_of("attention", what))
                if got:
                    pngs.append(got)
        else:
            for op in cfg.ops:
                for what in ("time", "memory"):
                    got = report.plot(rows, op, what, out_dir / f"{stem}_{op}_{what}.png",
                                      title_of(op, what))
                    if got:
                        pngs.append(got)
    plots_md = "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs)
    md_path.write_text(table + plots_md)
    report.write_json(json_path, meta, info, rows)
    written += pngs
    if args.update_readme is not None:
        readme = args.update_readme
        report.update_readme(readme, f"{meta['device_slug']}/{stem}",
                             report.readme_block(meta, rows, out_dir, readme, stem))
        written.append(readme)
    print(table)
    print(f"\n{len(rows)} cells in {meta['wall_s']} s on {cpu_text or meta['device_name']}; "
          "wrote:")
    for path in written:
        print(f"  {path}")
    if meta["committed"]:
        print("\nAgainst the committed results of this suite:")
        for line in report.comparison_lines(meta["committed"], meta):
            print(line)
    elif not args.no_compare:
        print(f"\nNo committed result of suite {suite!r} ({stem}.json) under "
              f"{runner.results_dir()} shares a row with this run.")
    mismatches = [r for r in rows if r.mismatch]
    if mismatches:
        print("\nMISMATCH against the reference: " + ", ".join(
            f"{r.provider} {r.op} {r.mode} {r.shape()} "
            f"(err {r.max_abs_err:.2e} > {r.err_tol:.2e})" for r in mismatches), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
