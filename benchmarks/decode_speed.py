"""Greedy decoding speed of the reference speech model: characters per second with and without
the KV cache, and for one-pass joint CTC/attention decoding.

    python benchmarks/decode_speed.py --checkpoint runs/demo/last.pt --data data/synth-7200/test

Loads a trained checkpoint, takes ``--utts`` utterances of DATA (the first in file order,
then sorted by length into batches of ``--batch``), encodes each batch once, and times only
the decoder, three ways on the same encoder outputs:

* ``attention, KV cache``: the decoder's greedy search, each step one token's work
  (self-attention keys/values and the cross-attention memory projected once);
* ``attention, no cache``: the same search re-running the whole decoder on the prefix at
  every step (``use_cache=False``); its output must equal the cached one (checked);
* ``joint CTC/attention``: one-pass joint greedy decoding (KV cache + CTC prefix scores over
  the whole vocabulary, ``SpeechModel.transcribe``'s ``"joint"``).

Characters per second = characters emitted (each hypothesis plus its end token, as the
decoder computes them) / decoder seconds; median and min-max over ``--rounds``. Writes
``OUT/<cpu>-<threads>t.md`` and ``.json`` (default ``benchmarks/results/decode_speed``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _summ(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a zeromask-train checkpoint (last.pt)")
    p.add_argument("--data", required=True, help="a folder of wav + txt (e.g. DATA/test)")
    p.add_argument("--cache-dir", help="feature cache (default: DATA/../.features)")
    p.add_argument("--utts", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "decode_speed"))
    args = p.parse_args(argv)

    import torch
    from runner import cpu_name, write_report  # benchmarks/runner.py
    from zeromask.cli.train import PAD_FRAMES
    from zeromask.data import CharTokenizer, SpeechDataset, collate, find_utterances
    from zeromask.models import downsampled_lengths, frame_lengths_of
    from zeromask.models.training import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt).eval()
    tokenizer = CharTokenizer.from_json(ckpt["tokenizer"])
    cache = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.data)),
                                           ".features")
    ds = SpeechDataset(find_utterances(args.data)[: args.utts], tokenizer, cache_dir=cache)
    ds.prepare()
    items = sorted((ds[i] for i in range(len(ds))), key=lambda x: x["spectrogram"].shape[0])
    batches = [collate(items[i:i + args.batch], pad_multiple=PAD_FRAMES)
               for i in range(0, len(items), args.batch)]
    cfg = model.config

    def attention(cache):
        return lambda mem, f0, lens: model._greedy(mem, f0, lens.shape[0], None,
                                                   use_cache=cache, limits=lens)

    decoders = {"attention, KV cache": attention(True), "attention, no cache": attention(False)}
    if cfg.ctc_weight > 0:
        decoders["joint CTC/attention"] = lambda mem, f0, lens: model._joint_greedy(
            mem, f0, model.ctc_log_probs(mem), lens, cfg.ctc_weight, None)
    ways = {w: [] for w in decoders}
    outputs, chars = {}, {}
    with torch.no_grad():
        encoded = []
        for b in batches:
            lengths = frame_lengths_of(b["spectrogram"])
            mem = model.encode(b["spectrogram"], b["waveform"], b["pitch"], b["f0"],
                               frame_lengths=lengths)
            encoded.append((mem, b["f0"], downsampled_lengths(lengths, cfg.downsample)))
        for r in range(args.rounds):
            for way, decode in decoders.items():
                t0 = time.perf_counter()
                hyps = [decode(*e) for e in encoded]
                dt = time.perf_counter() - t0
                outputs[way] = hyps
                chars[way] = sum(len(h) + 1 for batch in hyps for h in batch)
                ways[way].append(chars[way] / dt)
                print(f"round {r} {way}: {chars[way] / dt:.0f} chars/s", flush=True)
    if outputs["attention, no cache"] != outputs["attention, KV cache"]:
        raise SystemExit("the cached and uncached greedy outputs differ")
    slug = "-".join(cpu_name().lower().replace("(r)", "").replace("(tm)", "").split()[:3])
    device = f"cpu-{slug}-{args.threads}t"
    summary = {"device": device, "cpu": cpu_name(), "threads": args.threads,
               "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "checkpoint": str(args.checkpoint), "step": ckpt.get("step"),
               "data": str(args.data), "utterances": len(items), "batch": args.batch,
               "rounds": args.rounds, "chars": chars,
               "chars_per_s": {w: _summ(v) for w, v in ways.items()}}
    base = summary["chars_per_s"]["attention, no cache"]["median"]
    lines = [f"## Greedy decoding speed: {summary['cpu']}, {args.threads} thread(s), torch "
             f"{torch.__version__}, {summary['date']}", "",
             f"Checkpoint {args.checkpoint} (step {summary['step']}, "
             f"{sum(x.numel() for x in model.parameters()) / 1e6:.2f} M parameters), "
             f"{len(items)} utterances of {args.data} in batches of {args.batch} (sorted by "
             f"length); decoder time only (each batch encoded once); median (min-max) over "
             f"{args.rounds} rounds.", "",
             "| decoding | characters | characters/s | x no-cache speed |", "|---|---:|---|---:|"]
    for w, s in summary["chars_per_s"].items():
        lines.append(f"| {w} | {chars[w]} | {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) "
                     f"| {s['median'] / base:.2f} |")
    write_report(args.out, device, lines + [""], summary, "decode_speed.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
