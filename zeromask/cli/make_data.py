"""``zeromask-make-data --out DIR --n N``: synthesize a labelled speech set (espeak-ng, flite,
festival): train/, test/ (held-out voices) and shifted/ (held-out engine and accent)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from ..data import synth


def _describe_train_ranges() -> str:
    """``--train-ranges``' help, written from :data:`~zeromask.data.synth.TRAIN_RANGES`."""
    def span(lo_hi, unit=""):
        return f"{lo_hi[0]:g} to {lo_hi[1]:g}{unit}"
    return "; ".join(
        f"{name} = speed {span(r.speed, 'x')}, pitch {span(r.pitch, ' semitones')}, "
        f"SNR {span(r.snr_db, ' dB')}, RT60 {span(r.rt60, ' s')}"
        for name, r in synth.TRAIN_RANGES.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zeromask-make-data",
        description="Synthesize a labelled English speech set: train/ (espeak-ng and flite "
                    "voices, varied speed, pitch and silences, half with noise or "
                    "reverberation), test/ (held-out espeak-ng voices) and shifted/ (festival "
                    "and a held-out espeak-ng accent, speed and pitch outside the training "
                    "ranges, noisier rooms). Re-running continues an interrupted run.")
    p.add_argument("--out", required=True,
                   help="output folder (train/, test/, shifted/, manifest.jsonl)")
    p.add_argument("--n", type=int, required=True,
                   help="number of train + test utterances")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of the N utterances in the test split (default 0.1)")
    p.add_argument("--voice-test-fraction", type=float, default=0.15,
                   help="share of espeak-ng voices held out for the test split (default 0.15)")
    p.add_argument("--engines", default="espeak-ng,flite",
                   help="training engines, comma-separated: espeak-ng (required), flite "
                        "(default espeak-ng,flite); festival is only in shifted/")
    p.add_argument("--flite-fraction", type=float, default=0.3,
                   help="share of training utterances spoken by flite (default 0.3)")
    p.add_argument("--augment-fraction", type=float, default=0.5,
                   help="share of training utterances with noise and/or reverberation "
                        "(default 0.5)")
    p.add_argument("--train-ranges", choices=tuple(synth.TRAIN_RANGES), default="narrow",
                   help="speed/pitch/SNR/RT60 ranges of train/: " + _describe_train_ranges()
                        + " (default narrow)")
    p.add_argument("--n-shifted", type=int, default=None,
                   help="utterances in shifted/ (default max(50, round(0.1 N)))")
    p.add_argument("--no-shifted", action="store_true",
                   help="make no shifted/ set (festival not needed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--jobs", type=int, default=None, help="parallel synthesis processes")
    p.add_argument("--no-progress", action="store_true")
    return p


def summarize(records) -> list:
    """One line per split: utterances, hours, engines (utterances, voices), augmented."""
    lines = []
    order = [s for s in ("train", "test", "shifted") if any(r["split"] == s for r in records)]
    for split in order:
        rs = [r for r in records if r["split"] == split]
        hours = sum(r["seconds"] for r in rs) / 3600
        parts = []
        for eng in dict.fromkeys(r["engine"] for r in rs):
            er = [r for r in rs if r["engine"] == eng]
            nv = len({r["voice"] for r in er})
            parts.append(f"{eng} {len(er)} utt / {nv} voice{'s' * (nv != 1)}")
        n_aug = sum(bool(r.get("augment")) for r in rs)
        lines.append(f"  {split}: {len(rs)} utterances, {hours:.2f} h; {', '.join(parts)}; "
                     f"{n_aug} augmented")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..data.synth import EngineNotFound, make_dataset
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    t0 = time.time()
    try:
        done = make_dataset(args.out, args.n, test_fraction=args.test_fraction,
                            voice_test_fraction=args.voice_test_fraction, seed=args.seed,
                            sample_rate=args.sample_rate, jobs=args.jobs,
                            progress=not args.no_progress, engines=engines,
                            flite_fraction=args.flite_fraction,
                            augment_fraction=args.augment_fraction,
                            train_ranges=args.train_ranges,
                            n_shifted=0 if args.no_shifted else args.n_shifted)
    except EngineNotFound as exc:
        print(f"zeromask-make-data: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"zeromask-make-data: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zeromask-make-data: interrupted (finished utterances are kept: run the same "
              "command again to continue)", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a failed synthesis, or another run on the same folder
        print(f"zeromask-make-data: error: {exc}\n(finished utterances are kept: run the same "
              "command again to continue)", file=sys.stderr)
        return 1
    counts = {s: sum(d["split"] == s for d in done) for s in ("train", "test", "shifted")}
    hours = sum(d["seconds"] for d in done) / 3600
    kept = f", {done.reused} kept from an earlier run" if done.reused else ""
    removed = f", {done.removed} stale removed" if done.removed else ""
    print(f"wrote {len(done)} utterances ({counts['train']} train, {counts['test']} test, "
          f"{counts['shifted']} shifted; {hours:.2f} h) to {args.out} in "
          f"{time.time() - t0:.1f} s ({done.rendered} rendered{kept}{removed})")
    print("\n".join(summarize(done)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
