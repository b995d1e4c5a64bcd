"""``zeromask-train``: train the reference speech model (single process or torchrun DDP).

Data: ``--data DIR`` with ``DIR/train`` and ``DIR/test`` (as ``zeromask-make-data`` writes;
wav+txt or LibriSpeech layouts), or ``--train DIR --test DIR``. Configuration comes from
``--config FILE`` (JSON: ``{"model": {...ModelConfig fields}, "train": {...flag names}}``)
and flags, flags winning. Writes under ``--out``: ``config.json``, ``log.jsonl`` (one line
per logged step and per evaluation), ``last.pt`` (every ``--ckpt-every`` steps and at the
end), ``best.pt`` (best held-out CER) and ``results.json``. A run whose ``--out`` already
has ``last.pt`` resumes from it (``--no-resume`` starts over): weights, optimizer, step (the
learning-rate schedule is a function of step and elapsed time), RNG states, and the position
inside the epoch (the batches of the interrupted epoch already trained on are skipped, so a
resumed run sees the same batch sequence as an uninterrupted one).

Stops at ``--max-steps`` or after ``--time-budget`` seconds of training, whichever comes
first; the periodic held-out evaluations are not counted. The budget counts the training
time of every invocation of the run together (the checkpoint carries the elapsed seconds so
far), so a resumed run only gets what is left of it; a resume whose budget is already spent
trains no step. Multi-process: ``torchrun --nproc_per_node N -m zeromask.cli.train ...``
(gloo on CPU, nccl on GPU); rank 0 logs, evaluates and writes checkpoints.

Example (CPU, synthesized data)::

    zeromask-make-data --out data/synth --n 3000
    zeromask-train --data data/synth --out runs/base --time-budget 900
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..models.config import FRONTENDS, INPUT_NORMS, START_TOKENS, ZERO_TOKENS, ModelConfig
from ..models.training import Dist
from . import UsageError, cli_errors

logger = logging.getLogger("zeromask")
#: batches are padded to a multiple of this many frames (see zeromask.data.collate)
PAD_FRAMES = 32

# flag -> ModelConfig field for model options given on the command line
_MODEL_FLAGS = {
    "d_model": int, "num_heads": int, "num_kv_heads": int, "ffn_mult": int, "enc_layers": int,
    "dec_self_layers": int, "dec_cross_layers": int, "dropout": float, "downsample": int,
    "zero_mode": str, "zero_scale": float, "rotary_mode": str, "curriculum_steps": int,
    "max_decode_len": int, "backend": str, "silence_top_db": float, "ctc_weight": float,
    "label_smoothing": float, "conv_kernel": int, "ctc_input": str, "input_norm": str,
    "frontend": str, "vtlp": float, "zero_tokens": str, "start_token": str,
}
_MODEL_HELP = {
    "d_model": "model width", "num_heads": "attention heads",
    "num_kv_heads": "key/value heads (GQA; default: num_heads)",
    "ffn_mult": "feed-forward width / d_model",
    "enc_layers": "encoder layers per feature (see --encoder-layers)",
    "dec_self_layers": "decoder self-attention layers",
    "dec_cross_layers": "cross-attention layers per feature stage",
    "dropout": "dropout probability", "downsample": "encoder frame-rate reduction (power of 2)",
    "zero_mode": "zero-token rule: weight x s (prob) or logit x s (score)",
    "zero_scale": "zero-token scale s", "rotary_mode": "F0 -> theta mapping",
    "curriculum_steps": "enable feature stage k from step k * N (0: all from the start)",
    "max_decode_len": "longest greedy hypothesis, characters",
    "backend": "attention backend (default: automatic)",
    "silence_top_db": "frames this many dB below the loudest are zero tokens",
    "ctc_weight": "joint CTC/attention weight of the CTC loss (0: no CTC head)",
    "label_smoothing": "decoder cross-entropy label smoothing",
    "conv_kernel": "Conformer convolution kernel in every encoder layer (0: none)",
    "ctc_input": "what the CTC head reads: sum of the encoders, or one feature",
    "input_norm": "input scaling: fixed, or per-utterance (CMVN / RMS) on top",
    "frontend": "subsampling: linear layer + convolutions (project) or convolutions (conv)",
    "vtlp": "vocal tract length perturbation: mel-axis warp factors in [1 - x, 1 + x] (0: off)",
    "zero_tokens": "which keys are zero tokens: silent and padding frames and text id 0 "
                   "(silence), padding frames only (padding), or none",
    "start_token": "decoder start token: id 0, a zero token (zero), or its own id, attended "
                   "normally (distinct)",
}
_MODEL_CHOICES = {"zero_mode": ["prob", "score", "hard"], "rotary_mode": ["echo", "additive"],
                  "backend": ["reference", "cpp", "triton", "cuda"],
                  "ctc_input": ["sum", "spectrogram", "waveform", "pitch"],
                  "input_norm": list(INPUT_NORMS), "frontend": list(FRONTENDS),
                  "zero_tokens": list(ZERO_TOKENS), "start_token": list(START_TOKENS)}
# training flag -> (type, help); the defaults are in _TRAIN_DEFAULTS
_TRAIN_FLAGS = {
    "batch_size": (int, "utterances per optimizer step (per rank)"),
    "eval_batch_size": (int, "utterances per evaluation batch"),
    "lr": (float, "peak AdamW learning rate"),
    "weight_decay": (float, "AdamW weight decay"),
    "warmup": (int, "linear warmup steps, then a cosine to 0 at the step or time limit"),
    "max_steps": (int, "stop after this many optimizer steps"),
    "time_budget": (float, "stop after this many seconds of training (evaluations not "
                           "counted)"),
    "eval_every": (int, "evaluate every N steps (0: only at the end)"),
    "ckpt_every": (int, "write OUT/last.pt every N steps (and on Ctrl-C / SIGTERM)"),
    "log_every": (int, "log a line to OUT/log.jsonl every N steps"),
    "eval_max": (int, "held-out utterances per periodic evaluation"),
    "samples": (int, "greedy samples printed per evaluation"),
    "grad_clip": (float, "gradient norm clip (0: none)"),
    "ema": (float, "decay of an exponential moving average of the weights, e.g. 0.999 "
                   "(0: none); evaluations, best.pt and zeromask-eval then use the average"),
    "seed": (int, "initial weights, batch order, dropout"),
    "num_workers": (int, "DataLoader worker processes"),
    "speed_perturb": (float, "speed perturbation: each training access changes the tempo by "
                             "a factor in [1/(1+x), 1+x] (0: off)"),
    "feature_workers": (int, "processes that fill the feature cache before training"),
    "threads": (int, "torch CPU threads per process (default: torch's choice)"),
}
_TRAIN_DEFAULTS = dict(batch_size=16, lr=1e-3, weight_decay=0.01, warmup=200, max_steps=None,
                       time_budget=None, eval_every=500, ckpt_every=200, log_every=10,
                       eval_max=200, samples=5, grad_clip=1.0, ema=0.0, seed=0, num_workers=0,
                       speed_perturb=0.0, feature_workers=0, threads=None, eval_batch_size=32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeromask-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="folder with train/ and test/ subfolders")
    d.add_argument("--train", help="training folder (overrides DATA/train)")
    d.add_argument("--test", help="held-out folder (overrides DATA/test)")
    d.add_argument("--cache-dir", help="feature cache (default: DATA/.features or TRAIN/../.features)")
    d.add_argument("--out", required=True, help="run folder: checkpoints, logs, results")
    d.add_argument("--config", help="JSON file with 'model' and 'train' sections")
    m = p.add_argument_group("model (ModelConfig; see its docstring)")
    model_defaults = ModelConfig()
    for name, typ in _MODEL_FLAGS.items():
        choices = _MODEL_CHOICES.get(name)
        m.add_argument("--" + name.replace("_", "-"), type=typ, default=None, choices=choices,
                       metavar=None if choices else typ.__name__.upper(),
                       help=f"{_MODEL_HELP[name]} (default: "
                            f"{getattr(model_defaults, name)})")
    m.add_argument("--feature-order", help="comma-separated, e.g. spectrogram,pitch,waveform")
    m.add_argument("--encoder-layers",
                   help="layers per feature encoder, e.g. spectrogram=4,pitch=1,waveform=1")
    m.add_argument("--spec-augment",
                   help="SpecAugment 'freq_masks,freq_width,time_masks,time_fraction' "
                        "(e.g. 2,15,2,0.05) or 'off'")
    m.add_argument("--no-zero-scaling", action="store_true",
                   help="-inf masking of zero tokens instead of zero-soft scaling")
    m.add_argument("--no-f0-rotary", action="store_true", help="constant-theta rotary")
    m.add_argument("--no-rotary", action="store_true",
                   help="no rotary in any attention (positions from the absolute sinusoids alone)")
    m.add_argument("--learnable-zero-scale", action="store_true")
    m.add_argument("--cross-rotary", action="store_true")
    m.add_argument("--no-abs-pos", action="store_true",
                   help="no sinusoidal absolute positions (rotary only)")
    t = p.add_argument_group("training (defaults in brackets; --config's 'train' section "
                             "and then these flags override them)")
    for name, (typ, text) in _TRAIN_FLAGS.items():
        t.add_argument("--" + name.replace("_", "-"), type=typ,
                       help=f"{text} [{_TRAIN_DEFAULTS[name]}]")
    t.add_argument("--no-resume", action="store_true", help="ignore OUT/last.pt")
    t.add_argument("--no-eval", action="store_true", help="skip evaluation entirely")
    t.add_argument("--no-final-eval", action="store_true",
                   help="no evaluation after the last step (e.g. when zeromask-eval follows)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--save-rank-states", action="store_true",
                   help="DDP check: every rank writes OUT/rank<R>.pt with its final weights")
    return p


def resolve(args: argparse.Namespace):
    """(ModelConfig kwargs, train options) from --config, then flags."""
    file_cfg = {}
    if args.config:
        file_cfg = json.loads(Path(args.config).read_text())
        unknown = set(file_cfg) - {"model", "train"}
        if unknown:
            raise UsageError(f"--config has unknown sections {sorted(unknown)}")
    model_kw = dict(file_cfg.get("model", {}))
    for name in _MODEL_FLAGS:
        v = getattr(args, name)
        if v is not None:
            model_kw[name] = v
    if args.feature_order:
        model_kw["feature_order"] = [f.strip() for f in args.feature_order.split(",") if f.strip()]
    if args.encoder_layers:
        try:
            model_kw["encoder_layers"] = {
                k.strip(): int(v) for k, v in (item.split("=") for item in
                                               args.encoder_layers.split(",") if item.strip())}
        except ValueError:
            raise UsageError("--encoder-layers wants FEATURE=N[,FEATURE=N...], "
                             f"got {args.encoder_layers!r}")
    if args.spec_augment:
        if args.spec_augment.strip().lower() in ("off", "none", "0"):
            model_kw["spec_augment"] = None
        else:
            try:
                parts = [float(x) for x in args.spec_augment.split(",")]
            except ValueError:
                parts = []
            if len(parts) != 4:
                raise UsageError("--spec-augment wants 4 comma-separated "
                                 f"numbers or 'off', got {args.spec_augment!r}")
            model_kw["spec_augment"] = parts
    if args.no_zero_scaling:
        model_kw["zero_scaling"] = False
    if args.no_f0_rotary:
        model_kw["f0_rotary"] = False
    if args.no_rotary:
        model_kw["rotary"] = False
    if args.learnable_zero_scale:
        model_kw["learnable_zero_scale"] = True
    if args.cross_rotary:
        model_kw["cross_rotary"] = True
    if args.no_abs_pos:
        model_kw["abs_pos"] = False
    train = dict(_TRAIN_DEFAULTS)
    unknown = set(file_cfg.get("train", {})) - set(train)
    if unknown:
        raise UsageError(f"unknown train options in --config: {sorted(unknown)}")
    train.update(file_cfg.get("train", {}))
    for k in _TRAIN_DEFAULTS:
        v = getattr(args, k, None)
        if v is not None:
            train[k] = v
    if not 0.0 <= float(train["ema"]) < 1.0:
        raise UsageError(f"--ema must be in [0, 1) (0: no average), got {train['ema']}")
    if train["max_steps"] is None and train["time_budget"] is None:
        raise UsageError("give --max-steps or --time-budget (or both)")
    return model_kw, train


class _Interrupt:
    """SIGINT / SIGTERM during training: remember it, so the loop stops after the current
    step and saves ``last.pt``; a second signal interrupts at once (the default action)."""

    _active: list = []  # installed and not yet restored (restore_all on any way out)

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
            _Interrupt._active.append(self)

    @classmethod
    def restore_all(cls) -> None:
        for handler in list(cls._active):
            handler.restore()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt "
              "(send it again to stop at once)", file=sys.stderr)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self in _Interrupt._active:
            _Interrupt._active.remove(self)


def _folders(args):
    train = args.train or (os.path.join(args.data, "train") if args.data else None)
    test = args.test or (os.path.join(args.data, "test") if args.data else None)
    if train is None:
        raise UsageError("give --data DIR (with train/ and test/) or --train DIR")
    cache = args.cache_dir or os.path.join(args.data or os.path.dirname(os.path.abspath(train)),
                                           ".features")
    return train, test, cache


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_errors("zeromask-train"):
        model_kw, opt = resolve(args)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        dist_env = Dist()
        try:
            return _train(args, model_kw, opt, dist_env)
        finally:
            _Interrupt.restore_all()  # the caller's handlers back, even after an error
            dist_env.close()


def _train(args, model_kw: dict, opt: dict, de: Dist) -> int:
    """Resume or start the run in ``args.out``: model config, data, then the
    :class:`~zeromask.models.training.Trainer`'s loop."""
    from ..data import CharTokenizer
    from ..models.training import CheckpointError, Trainer, TrainingError, load_checkpoint

    if opt["threads"]:
        torch.set_num_threads(int(opt["threads"]))
    out = Path(args.out)
    train_dir, test_dir, cache_dir = _folders(args)
    tokenizer = CharTokenizer()
    last = out / "last.pt"
    ckpt = None
    if last.exists() and not args.no_resume:
        try:
            ckpt = load_checkpoint(last, map_location="cpu")
        except CheckpointError as exc:
            raise UsageError(f"cannot resume: {exc}. To start over, pass --no-resume (or "
                             f"move {last} away)") from None
        # the saved architecture wins; flags may only change the backend on resume
        model_kw = dict(ckpt["config"], **{k: v for k, v in model_kw.items() if k == "backend"})
        tokenizer = CharTokenizer.from_json(ckpt["tokenizer"])
    model_kw.setdefault("vocab_size", tokenizer.vocab_size)
    cfg = ModelConfig(**model_kw) if ckpt is None else ModelConfig.from_dict(model_kw)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UsageError(f"vocab_size {cfg.vocab_size} < tokenizer's "
                         f"{tokenizer.vocab_size}")
    seed = int(opt["seed"])
    random.seed(seed + de.rank)
    torch.manual_seed(seed)  # same initial weights on every rank (DDP also broadcasts)

    train_ds, test_ds = _datasets(args, opt, de, tokenizer, train_dir, test_dir, cache_dir)
    if de.main:
        (out / "config.json").write_text(json.dumps(
            {"model": cfg.to_dict(), "train": opt, "data": {"train": train_dir, "test": test_dir,
                                                             "cache": cache_dir}}, indent=2))
    try:
        trainer = Trainer(out, cfg, tokenizer, opt, de, train_ds, test_ds, ckpt=ckpt,
                          progress=not args.no_progress, pad_multiple=PAD_FRAMES)
    except TrainingError as exc:
        raise UsageError(str(exc)) from None
    try:
        if de.main:
            n_test = len(test_ds.utterances) if test_ds is not None else 0
            print(f"model {trainer.n_params / 1e6:.2f} M parameters; features "
                  f"{list(cfg.feature_order)}; zero_mode={cfg.zero_mode} "
                  f"zero_scaling={cfg.zero_scaling} f0_rotary={cfg.f0_rotary}; "
                  f"{len(train_ds.utterances)} train / {n_test} test utterances; "
                  f"world {de.world} on {de.device}")
        interrupted = _Interrupt()
        trainer.run(interrupted)
        interrupted.restore()
        if interrupted.signum is not None:  # Ctrl-C / SIGTERM: save, say how to go on, stop
            if de.main:
                trainer.save()
                print(f"interrupted ({interrupted.name}) at step {trainer.step}: {last} "
                      "saved; rerun the same command to resume", file=sys.stderr)
            return 128 + interrupted.signum
        if args.save_rank_states:
            torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
                       out / f"rank{de.rank}.pt")
        if de.main:
            trainer.finish(final_eval=not args.no_final_eval)
    finally:
        trainer.close()
    de.barrier()
    return 0


def _datasets(args, opt: dict, de: Dist, tokenizer, train_dir, test_dir, cache_dir):
    """(train, test or None) datasets with every feature cached (main rank first, then the
    others read the cache); unreadable files are skipped and named, too many end the run."""
    from ..data import SpeechDataset, find_utterances
    train_utts = find_utterances(train_dir)
    test_utts = find_utterances(test_dir) if (test_dir and os.path.isdir(test_dir)
                                              and not args.no_eval) else []
    train_ds = SpeechDataset(train_utts, tokenizer, cache_dir=cache_dir,
                             speed_perturb=float(opt["speed_perturb"]))
    test_ds = SpeechDataset(test_utts, tokenizer, cache_dir=cache_dir) if test_utts else None

    def prepare(workers: int, progress: bool) -> None:
        try:
            for ds in (train_ds, test_ds):
                if ds is not None:
                    ds.prepare(num_workers=workers, progress=progress)
        except RuntimeError as exc:
            raise UsageError(f"{exc}") from None

    if de.main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        prepare(int(opt["feature_workers"]), not args.no_progress)
    de.barrier()  # the cache is full before any rank reads it
    if not de.main:  # cache hits: only the main rank's bad files are tried again, and dropped
        prepare(0, False)
    return train_ds, test_ds


if __name__ == "__main__":
    sys.exit(main())
