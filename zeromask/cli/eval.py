"""``zeromask-eval``: CER/WER of a checkpoint on a held-out folder, with greedy samples.

    zeromask-eval --checkpoint runs/base/best.pt --data data/synth/test

``--data`` is a wav+txt or LibriSpeech-style folder (a folder with a ``test/`` subfolder is
read from there). ``--backend`` runs the same weights on another attention backend.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import UsageError, cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeromask-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a last.pt / best.pt from zeromask-train")
    p.add_argument("--data", required=True, help="held-out folder (or a folder with test/)")
    p.add_argument("--cache-dir", help="feature cache (default: DATA/../.features)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-utts", type=int, default=None)
    p.add_argument("--samples", type=int, default=10, help="greedy samples to print")
    p.add_argument("--backend", default=None, help="attention backend override")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"),
                   help="the checkpoint's weights to score: 'ema' (the moving average of a "
                        "run trained with --ema), 'raw' (the optimizer's), 'auto' (the "
                        "average where there is one; default)")
    p.add_argument("--max-len", type=int, default=None, help="longest decoded text")
    p.add_argument("--json", help="write the metrics (and all hypotheses) here")
    p.add_argument("--by", default=None,
                   help="also score each group of a manifest field, comma-separated (e.g. "
                        "engine,voice,augment; engine/augment crosses two): needs "
                        "DATA/../manifest.jsonl of zeromask-make-data")
    p.add_argument("--tempo-search", default=None, metavar="FACTORS",
                   help="test-time tempo search: comma-separated time-resampling factors "
                        "(e.g. 0.65,0.8,1,1.25,1.5); per utterance the factor whose joint "
                        "hypothesis has the best CTC log-likelihood per token is kept; one "
                        "decoding per factor (default: off, factor 1 only)")
    p.add_argument("--beam", type=int, default=1,
                   help="joint CTC/attention decoding with this many beams per utterance "
                        "(about that many times the decoder's work; default 1: greedy)")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_factors(text: str) -> list:
    """``"0.8,1,1.25"`` -> ``[0.8, 1.0, 1.25]``; ValueError naming the bad item."""
    import math
    out = []
    for item in text.split(","):
        try:
            r = float(item)
        except ValueError:
            raise ValueError(f"--tempo-search: {item.strip()!r} is not a number") from None
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"--tempo-search: factors must be positive, got {item.strip()}")
        out.append(r)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_errors("zeromask-eval"):
        return _evaluate(args)


def _evaluate(args) -> int:
    from ..data import CharTokenizer, SpeechDataset, find_utterances
    from ..data import manifest_labels
    from ..models.training import (DECODERS, checkpoint_weights, evaluate,
                                   length_sorted_loader, load_checkpoint,
                                   model_from_checkpoint, print_samples, score_groups,
                                   score_record, score_summary)
    from .train import PAD_FRAMES

    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data
    if os.path.isdir(os.path.join(data, "test")):
        data = os.path.join(data, "test")
    cache = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(data)), ".features")
    tempo = None
    if args.tempo_search:
        try:
            tempo = parse_factors(args.tempo_search)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    ckpt = load_checkpoint(args.checkpoint)
    overrides = {"backend": args.backend} if args.backend else {}
    try:
        weights = checkpoint_weights(ckpt, args.weights)
    except ValueError as exc:
        raise UsageError(f"--weights {args.weights}: {exc}") from None
    model = model_from_checkpoint(ckpt, weights, **overrides)
    if tempo is not None and model.config.ctc_weight <= 0:
        raise UsageError("--tempo-search needs a model with a CTC head (ctc_weight > 0)")
    if args.beam < 1:
        raise UsageError(f"--beam must be >= 1, got {args.beam}")
    if args.beam > 1 and model.config.ctc_weight <= 0:
        raise UsageError("--beam > 1 needs a model with a CTC head (ctc_weight > 0)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tokenizer = CharTokenizer.from_json(ckpt["tokenizer"])
    ds = SpeechDataset(find_utterances(data), tokenizer, cache_dir=cache)
    try:
        ds.prepare()  # unreadable files are skipped and named
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    first = None if args.max_utts is None else list(range(len(ds.utterances)))[: args.max_utts]
    loader = length_sorted_loader(ds, args.batch_size, PAD_FRAMES, first)
    by = {}  # read before the evaluation, so a bad field fails at once
    fields = [f.strip() for f in (args.by or "").split(",") if f.strip()]
    if fields:
        try:
            by = manifest_labels(data, fields)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--by {args.by}: {exc}") from None
    t0 = time.time()
    res = evaluate(model, loader, tokenizer, device, max_len=args.max_len,
                   progress=not args.no_progress, tempo_factors=tempo, beam=args.beam)
    dt = time.time() - t0
    print(f"checkpoint {args.checkpoint} (step {ckpt.get('step')}, {weights} weights) on "
          f"{data}: {score_summary(res)} ({res['n']} utterances, {dt:.1f} s)")
    if tempo is not None:
        chosen = res["tempos"]
        print("tempo search: " + ", ".join(f"x{r:g} {chosen.count(r)}" for r in tempo)
              + " utterances")
    print_samples(res, args.samples)
    groups = {}
    for field, labels in by.items():
        groups[field] = score_groups(res, labels)
        print(f"by {field}:")
        for name, rec in groups[field].items():
            print(f"  {name} ({rec['n']} utterances): " + "; ".join(
                f"{label} CER {rec[p + 'cer']:.3f}" for p, label in DECODERS
                if p + "cer" in rec))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"checkpoint": str(args.checkpoint), "step": ckpt.get("step"), "data": data,
             **score_record(res), "n": res["n"], "seconds": dt, "tempo_search": tempo,
             "beam": args.beam, "weights": weights,
             **({"groups": groups} if groups else {}),
             "utterances": [
                 dict({"id": res["ids"][k], "ref": res["refs"][k], "hyp": res["hyps"][k]},
                      **{p + "hyp": res[p + "hyps"][k] for p in ("ctc_", "joint_")
                         if p + "hyps" in res},
                      **({"tempo": res["tempos"][k]} if tempo is not None else {}))
                 for k in range(len(res["ids"]))]},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
