"""Seconds per training step of the reference speech model on one real batch, and where they
go (torch.profiler), for the demo recipe with optional ModelConfig overrides.

    python benchmarks/step_profile.py --data data/synth/train --threads 2
    python benchmarks/step_profile.py --data data/synth/train --set '{"feature_order": ["spectrogram"]}'
    python benchmarks/step_profile.py --data data/synth/train --profile   # the op table too

The batch: 32 utterances of similar length from the first 64 (sorted by length, the middle
32), padded as zeromask-train pads them. Two warm-up steps, then the mean of ``--steps``.
"""
import argparse
import json
import os
import time

import torch

from zeromask.cli.train import PAD_FRAMES
from zeromask.data import CharTokenizer, SpeechDataset, collate, find_utterances
from zeromask.models import ModelConfig, SpeechModel

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ("spectrogram", "waveform", "pitch", "f0", "input_ids", "labels", "frame_lengths")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a training folder (wav + txt)")
    p.add_argument("--cache-dir", help="feature cache (default: DATA/../.features)")
    p.add_argument("--config", default=os.path.join(HERE, "..", "scripts", "asr_demo.json"))
    p.add_argument("--set", default="{}", help="JSON of ModelConfig fields to override")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's op table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_kw = dict(json.load(open(args.config))["model"], **json.loads(args.set))
    cache = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.data)),
                                           ".features")
    tok = CharTokenizer()
    ds = SpeechDataset(find_utterances(args.data)[:64], tok, cache_dir=cache)
    items = sorted((ds[i] for i in range(len(ds))), key=lambda it: it["spectrogram"].shape[0])
    mid = max(0, len(items) // 2 - 16)
    batch = collate(items[mid:mid + 32], pad_multiple=PAD_FRAMES)
    torch.manual_seed(0)
    model = SpeechModel(ModelConfig(vocab_size=tok.vocab_size, **model_kw))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        out = model(**{k: batch[k] for k in KEYS})
        out["loss"].backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sec = (time.perf_counter() - t) / args.steps
    shape = tuple(batch["spectrogram"].shape)
    print(f"{sec:.3f} s per step (batch {shape}, {args.threads} threads, overrides "
          f"{args.set})")
    if args.profile:
        from torch.profiler import profile
        with profile() as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
