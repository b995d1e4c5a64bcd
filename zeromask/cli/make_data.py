"""``zeromask-make-data --out DIR --n N``: synthesize a labelled speech set with espeak-ng."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zeromask-make-data",
        description="Synthesize a labelled English speech set with espeak-ng: varied voices, "
                    "pitch, speed and silences; test voices are held out of training.")
    p.add_argument("--out", required=True, help="output folder (train/, test/, manifest.jsonl)")
    p.add_argument("--n", type=int, required=True, help="number of utterances in all")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of utterances in the test split (default 0.1)")
    p.add_argument("--voice-test-fraction", type=float, default=0.15,
                   help="share of voices held out for the test split (default 0.15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--jobs", type=int, default=None, help="parallel espeak-ng processes")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..data.synth import EspeakNotFound, make_dataset
    t0 = time.time()
    try:
        done = make_dataset(args.out, args.n, test_fraction=args.test_fraction,
                            voice_test_fraction=args.voice_test_fraction, seed=args.seed,
                            sample_rate=args.sample_rate, jobs=args.jobs,
                            progress=not args.no_progress)
    except EspeakNotFound as exc:
        print(f"zeromask-make-data: error: {exc}", file=sys.stderr)
        return 2
    n_test = sum(d["split"] == "test" for d in done)
    hours = sum(d["seconds"] for d in done) / 3600
    voices = {d["split"]: set() for d in done}
    for d in done:
        voices[d["split"]].add(d["voice"])
    print(f"wrote {len(done)} utterances ({len(done) - n_test} train, {n_test} test; "
          f"{hours:.2f} h; {len(voices.get('train', ()))} train voices, "
          f"{len(voices.get('test', ()))} held-out test voices) to {args.out} in "
          f"{time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
