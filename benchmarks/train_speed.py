"""Training speed of the reference speech model: fused C++ backend vs the reference backend.

    python benchmarks/train_speed.py                    # default model, synthetic batch
    python benchmarks/train_speed.py --data DATA        # a real batch from DATA/train

Same model configuration (``zeromask.models.ModelConfig`` defaults unless flags say
otherwise), same batch, same seed; only ``backend`` differs. Each measurement is a fresh
subprocess per backend (so peak memory is that backend's own), and the backends alternate
round by round (A B A B ...) so load from other processes on a shared machine hits them
alike. Per round: ``--warmup`` untimed optimizer steps, then ``--steps`` timed steps
(forward, backward, gradient clipping, AdamW) on the same batch.

Reported per backend (median over rounds, with min-max): steps/s, utterances/s, and memory:

* CPU: peak resident set size of the worker process (``resource.getrusage(RUSAGE_SELF)
  .ru_maxrss``, the kernel's high-water mark), and the training part of it: that peak minus
  the resident size (``/proc/self/statm``) just before the first training step, when the
  model, optimizer and batch already exist. Memory outside the process (none here) is not
  seen; the high-water mark also contains the interpreter and torch (~300 MiB).
* CUDA: ``torch.cuda.max_memory_allocated`` during the timed steps, minus the allocation
  before them.

Also recorded: the eval-mode loss of the batch before training (the backends must agree:
same weights, same batch), and the machine's load average before and after.

Writes ``benchmarks/results/train_speed/<device>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    # Linux: kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_batch(batch: int, seconds: float, chars: int, seed: int = 0):
    """A collate()-shaped batch: speech-like log-mel with silent lead/trail (zero tokens),
    an F0 contour, energy, periodicity, waveform frames and random text."""
    import torch
    from zeromask.data import collate
    g = torch.Generator().manual_seed(seed)
    T = int(seconds * 100)
    items = []
    for b in range(batch):
        t = T - int(torch.randint(0, T // 4, (1,), generator=g))  # unequal lengths: padding
        lead, trail = int(0.1 * t), int(0.1 * t)
        spec = -30.0 + 10.0 * torch.randn(t, 80, generator=g)
        spec[:lead] = -100.0
        spec[t - trail:] = -100.0
        f0 = 120.0 + 40.0 * torch.sin(torch.linspace(0, 6.28, t))
        f0[:lead] = 0
        f0[t - trail:] = 0
        energy = (f0 > 0).float() * 0.1
        pitch = torch.stack([f0, energy, (f0 > 0).float() * 0.8], dim=-1)
        wave = 0.1 * torch.randn(t, 160, generator=g)
        n = chars - int(torch.randint(0, chars // 3, (1,), generator=g))
        tokens = torch.randint(1, 29, (n,), generator=g)
        items.append({"id": f"s{b}", "text": "x" * n, "spectrogram": spec, "waveform": wave,
                      "pitch": pitch, "f0": f0, "tokens": tokens})
    return collate(items)


def data_batch(data: str, batch: int):
    from zeromask.data import CharTokenizer, SpeechDataset, collate, find_utterances
    utts = sorted(find_utterances(os.path.join(data, "train")), key=lambda u: u.id)[:batch]
    ds = SpeechDataset(utts, CharTokenizer(), cache_dir=os.path.join(data, ".features"))
    return collate([ds[i] for i in range(len(utts))])


def worker(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    from zeromask.models import ModelConfig, SpeechModel
    from zeromask.models.training import to_device
    device = torch.device(args.device)
    raw = data_batch(args.data, args.batch) if args.data else synthetic_batch(
        args.batch, args.seconds, args.chars)
    batch = to_device(raw, device)
    cfg = ModelConfig(**dict(json.loads(args.model_json), backend=args.backend))
    torch.manual_seed(0)
    model = SpeechModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.eval()
    with torch.no_grad():
        loss0 = float(model(**batch)["loss"])
    model.train()

    def step():
        loss = model(**batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    rss_before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        alloc_before = torch.cuda.memory_allocated()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    float(last)  # synchronises on CUDA
    dt = time.perf_counter() - t0
    out = {"backend": args.backend, "steps_per_s": args.steps / dt,
           "utts_per_s": args.steps * batch["input_ids"].shape[0] / dt, "loss0": loss0,
           "frames": int(batch["spectrogram"].shape[1]),
           "tokens": int(batch["input_ids"].shape[1]),
           "batch": int(batch["input_ids"].shape[0]),
           "parameters": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["train_mib"] = (torch.cuda.max_memory_allocated() - alloc_before) / 2**20
    else:
        out["peak_mib"] = _maxrss_mib()
        out["train_mib"] = _maxrss_mib() - rss_before
    return out


def _device_name(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    from runner import cpu_name  # benchmarks/runner.py: /proc/cpuinfo's model name
    model = cpu_name()
    short = "-".join(model.lower().replace("(r)", "").replace("(tm)", "").split()[:3])
    return f"cpu-{short}-{threads}t"


def _summ(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=None,
                   help="comma-separated (default: cpp,reference, cpp only when built)")
    p.add_argument("--data", help="take the batch from DATA/train (cached features)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0, help="synthetic utterance length")
    p.add_argument("--chars", type=int, default=40, help="synthetic transcript length")
    p.add_argument("--model", default="{}",
                   help='ModelConfig fields as JSON, e.g. \'{"d_model": 128}\'')
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=str(HERE / "results" / "train_speed"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--model-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    import torch
    import zeromask
    avail = zeromask.available_backends()
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = (["cpp"] if avail.get("cpp") is None else []) + ["reference"]
    missing = {b: avail.get(b, "unknown backend") for b in backends if avail.get(b) is not None}
    if missing:
        raise SystemExit(f"backends not available here: {missing}")
    model_json = json.dumps(json.loads(args.model))
    load0 = os.getloadavg()[0]
    res = {b: [] for b in backends}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for r in range(args.rounds):
        order = backends if r % 2 == 0 else backends[::-1]
        for b in order:
            cmd = [sys.executable, __file__, "--worker", "--backend", b, "--model-json",
                   model_json, "--batch", str(args.batch), "--seconds", str(args.seconds),
                   "--chars", str(args.chars), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--threads", str(args.threads), "--device", args.device]
            if args.data:
                cmd += ["--data", args.data]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"worker {b} failed:\n{proc.stdout[-2000:]}\n"
                                 f"{proc.stderr[-3000:]}")
            res[b].append(json.loads(line[0][7:]))
            print(f"round {r} {b}: {res[b][-1]['steps_per_s']:.3f} steps/s, "
                  f"peak {res[b][-1]['peak_mib']:.0f} MiB", flush=True)
    load1 = os.getloadavg()[0]
    device = _device_name(args.device, args.threads)
    first = res[backends[0]][0]
    summary = {"device": device, "torch": torch.__version__, "date": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
        "model": json.loads(model_json), "batch": {k: first[k] for k in
                                                   ("batch", "frames", "tokens")},
        "source": args.data or f"synthetic ({args.seconds} s, {args.chars} chars)",
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "load_before": load0, "load_after": load1, "parameters": first["parameters"],
        "backends": {b: {"steps_per_s": _summ([x["steps_per_s"] for x in v]),
                         "utts_per_s": _summ([x["utts_per_s"] for x in v]),
                         "peak_mib": _summ([x["peak_mib"] for x in v]),
                         "train_mib": _summ([x["train_mib"] for x in v]),
                         "loss0": v[0]["loss0"]} for b, v in res.items()}}
    base = "reference"
    mem = ("peak RSS MiB (ru_maxrss)", "training MiB (peak − RSS before step 1)") \
        if args.device == "cpu" else ("peak allocated MiB", "training MiB")
    lines = [f"## Training speed: {device}, torch {torch.__version__}, "
             f"{args.threads} thread(s), {summary['date']}", "",
             f"Model: ModelConfig defaults{'' if args.model == '{}' else ' + ' + model_json}"
             f" ({first['parameters'] / 1e6:.2f} M parameters); batch {first['batch']} × "
             f"{first['frames']} frames × {first['tokens']} tokens, "
             f"{summary['source']}. {args.rounds} rounds per backend, alternating, each a "
             f"fresh process: {args.warmup} warm-up + {args.steps} timed AdamW steps. "
             f"Median (min–max) over rounds. Load average {load0:.2f} before, {load1:.2f} "
             "after.", "",
             f"| backend | steps/s | utts/s | ÷ {base} time | {mem[0]} | {mem[1]} | "
             "eval loss before training |", "|---|---|---|---|---|---|---|"]
    bsps = summary["backends"].get(base, {}).get("steps_per_s", {}).get("median")
    for b, s in summary["backends"].items():
        sp = s["steps_per_s"]
        ratio = f"{bsps / sp['median']:.2f}" if bsps else "–"
        lines.append(
            f"| {b} | {sp['median']:.3f} ({sp['min']:.3f}–{sp['max']:.3f}) | "
            f"{s['utts_per_s']['median']:.1f} | {ratio} | "
            f"{s['peak_mib']['median']:.0f} ({s['peak_mib']['min']:.0f}–"
            f"{s['peak_mib']['max']:.0f}) | {s['train_mib']['median']:.0f} "
            f"({s['train_mib']['min']:.0f}–{s['train_mib']['max']:.0f}) | "
            f"{s['loss0']:.6f} |")
    lines += ["", "Memory method: " + ("resource.getrusage(RUSAGE_SELF).ru_maxrss of the "
              "worker process (one per backend and round); 'training' subtracts the RSS "
              "read from /proc/self/statm right before the first step (model, optimizer and "
              "batch already built)." if args.device == "cpu" else
              "torch.cuda.max_memory_allocated.")]
    from runner import write_report  # benchmarks/runner.py
    write_report(args.out, device, lines, summary, "train_speed.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
