"""Training helpers shared by ``zeromask-train`` and ``zeromask-eval``.

Length-bucketed batching that splits the same way on every DDP rank, checkpoints that
carry everything a resume needs (model config, tokenizer, optimizer, scheduler, step, RNG),
CER/WER evaluation with greedy decoding (jiwer), and :class:`Trainer`, the training loop
in small named steps (setup, resume, one optimizer step, logging, evaluation, checkpoint).
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..data.text import CharTokenizer
from .asr import SpeechModel
from .config import ModelConfig

TENSOR_KEYS = ("spectrogram", "waveform", "pitch", "f0", "input_ids", "labels",
               "frame_lengths")


def utterance_frames(path: str, hop_length: int, sample_rate: int) -> int:
    """Frame count of an audio file from its header (no decoding)."""
    import soundfile as sf
    info = sf.info(path)
    n = int(round(info.frames * sample_rate / info.samplerate))
    return 1 + n // hop_length


def dataset_frames(ds) -> List[int]:
    """Every utterance's feature frame count of a :class:`SpeechDataset` (from the audio
    file's length, not its features)."""
    fc = ds.config
    return [utterance_frames(u.audio, fc.hop_length, fc.sample_rate) for u in ds.utterances]


def length_sorted_loader(ds, batch_size: int, pad_multiple: int = 1,
                         indices: Optional[Sequence[int]] = None):
    """A DataLoader over ``ds`` (or its ``indices``) in batches of ``batch_size`` utterances
    of similar length (shortest first): the least padding, for evaluation."""
    from ..data import collate
    lengths = dataset_frames(ds)
    order = sorted(range(len(lengths)) if indices is None else indices,
                   key=lambda i: lengths[i])
    return torch.utils.data.DataLoader(
        ds, batch_sampler=[order[i:i + batch_size] for i in range(0, len(order), batch_size)],
        collate_fn=functools.partial(collate, pad_multiple=pad_multiple))


class BucketBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of similar length, identical on every rank for one (seed, epoch).

    Indices are shuffled, cut into pools of ``pool`` batches, sorted by length inside a pool
    and cut into batches; the batch order is shuffled again. Rank ``r`` of ``world`` takes
    batches ``r, r + world, ...`` and every rank gets the same number of batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0,
                 world: int = 1, pool: int = 50, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.pool, self.drop_last = pool, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> List[List[int]]:
        rng = random.Random(self.seed * 100003 + self.epoch)
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        size = self.batch_size * self.pool
        batches = []
        for i in range(0, len(idx), size):
            chunk = sorted(idx[i:i + size], key=lambda j: self.lengths[j])
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        per_rank = len(batches) // self.world if self.world > 1 else len(batches)
        return batches[self.rank::self.world][:per_rank]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def to_device(batch: dict, device) -> Dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in TENSOR_KEYS if k in batch}


def lr_factor(step: int, warmup: int, max_steps: Optional[int], elapsed: float = 0.0,
              budget: Optional[float] = None, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine decay to
    ``min_ratio`` at the end of the run, whichever end comes first: ``max_steps`` steps or
    ``budget`` seconds (progress is the larger of ``step / max_steps`` and ``elapsed /
    budget``), so a time-capped run still anneals. Flat after warmup when neither is set.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = []
    if max_steps and max_steps > warmup:
        progress.append((step - warmup) / max(1, max_steps - warmup))
    if budget:
        progress.append(elapsed / float(budget))
    if not progress:
        return 1.0
    t = min(1.0, max(0.0, max(progress)))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def lr_lambda(warmup: int, max_steps: Optional[int], min_ratio: float = 0.1):
    """:func:`lr_factor` by step alone (for ``torch.optim.lr_scheduler.LambdaLR``)."""
    def f(step: int) -> float:
        return lr_factor(step, warmup, max_steps, min_ratio=min_ratio)
    return f


def save_checkpoint(path: Union[str, os.PathLike], *, model: SpeechModel, optimizer=None,
                    scheduler=None, step: int = 0, epoch: int = 0,
                    tokenizer: Optional[CharTokenizer] = None, extra: Optional[dict] = None,
                    ema: Optional["WeightAverage"] = None) -> None:
    """Atomically write a checkpoint (a torn file never replaces a good one). ``ema``: the
    run's :class:`WeightAverage`, stored under ``"ema"`` (its weights, decay and count)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "config": model.config.to_dict(),
        "tokenizer": (tokenizer or CharTokenizer()).to_json(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "extra": extra or {},
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt or not written by zeromask-train."""


#: what every zeromask checkpoint holds (see :func:`save_checkpoint`)
CHECKPOINT_KEYS = ("model", "config", "tokenizer", "step")


def load_checkpoint(path: Union[str, os.PathLike], map_location="cpu") -> dict:
    """A checkpoint written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` when there is no file and :class:`CheckpointError` (naming
    the file and what is wrong) when it is truncated, corrupt or not a zeromask checkpoint.
    """
    import pickle
    import zipfile
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError, ModuleNotFoundError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a zeromask checkpoint (no {', '.join(missing)})")
    return ckpt


#: ``weights`` of :func:`model_from_checkpoint`
WEIGHTS = ("auto", "ema", "raw")


def checkpoint_weights(ckpt: dict, weights: str = "auto") -> str:
    """Which weights ``weights`` picks in ``ckpt``: ``"ema"`` (the moving average a run
    trained with ``--ema`` keeps) or ``"raw"`` (the optimizer's own). ``"auto"``: the
    average where the checkpoint has one. Raises ValueError for another name, or for
    ``"ema"`` on a checkpoint without an average."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    has_ema = isinstance(ckpt.get("ema"), dict)
    if weights == "ema" and not has_ema:
        raise ValueError("this checkpoint holds no weight average (train with --ema to "
                         "keep one); choose the raw weights ('raw')")
    return "ema" if weights == "ema" or (weights == "auto" and has_ema) else "raw"


def model_from_checkpoint(ckpt: dict, weights: str = "auto", **overrides) -> SpeechModel:
    """A model with the checkpoint's config (``overrides`` e.g. ``backend=``) and weights:
    ``weights`` as :func:`checkpoint_weights` picks them (default: the moving average where
    the run kept one, else the raw weights)."""
    cfg = ModelConfig.from_dict(dict(ckpt["config"], **overrides))
    model = SpeechModel(cfg)
    which = checkpoint_weights(ckpt, weights)
    model.load_state_dict(ckpt["ema"]["model"] if which == "ema" else ckpt["model"])
    return model


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging; the EMA of
    timm and ESPnet), through :class:`torch.optim.swa_utils.AveragedModel`: after each
    optimizer step every parameter ``a <- decay * a + (1 - decay) * w`` (the first update
    copies ``w``). Buffers are not averaged: :meth:`averaged` copies the live model's
    (its step counter, constants) before the average is used. ``decay`` in ``(0, 1)``; the
    average spans about ``1 / (1 - decay)`` steps."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay, self.model = decay, model
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                     use_buffers=False)

    @torch.no_grad()
    def update(self) -> None:
        self.average.update_parameters(self.model)

    @torch.no_grad()
    def averaged(self) -> torch.nn.Module:
        """The averaged model (the live model's buffers copied in)."""
        for mine, live in zip(self.average.module.buffers(), self.model.buffers()):
            mine.copy_(live)
        return self.average.module

    def state_dict(self) -> dict:
        return {"decay": self.decay, "n_averaged": int(self.average.n_averaged),
                "model": self.averaged().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.average.module.load_state_dict(state["model"])
        self.average.n_averaged.fill_(int(state["n_averaged"]))


@torch.no_grad()
def evaluate(model: SpeechModel, loader, tokenizer: CharTokenizer, device="cpu",
             max_utts: Optional[int] = None, max_len: Optional[int] = None,
             progress: bool = False, tempo_factors: Optional[Sequence[float]] = None,
             beam: int = 1) -> dict:
    """Greedy-decode ``loader`` and score it (character and word error rates, jiwer).

    Returns ``{cer, wer, n, refs, hyps, ids}`` for the attention decoder's greedy output
    and, when the model has a CTC head, ``ctc_cer``, ``ctc_wer`` and ``ctc_hyps`` for greedy
    CTC decoding of the same utterances and ``joint_cer``, ``joint_wer``, ``joint_hyps`` for
    one-pass joint CTC/attention greedy decoding with CTC prefix scores
    (:meth:`SpeechModel.transcribe`). With ``tempo_factors``, transcribe's test-time tempo
    search, and ``tempos``: the factor chosen per utterance. ``beam > 1``: the joint
    decoder is transcribe's joint CTC/attention beam search with that many beams.
    """
    import jiwer
    was_training = model.training
    model.eval()
    use_ctc = model.config.ctc_weight > 0
    refs, hyps, ctc_hyps, joint_hyps, ids, unended, tempos = [], [], [], [], [], [], []
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="eval", unit="batch", leave=False)
    for batch in it:
        dec = model.transcribe(**to_device(batch, device), max_len=max_len,
                               tempo_factors=tempo_factors, beam=beam)
        tempos.extend(dec.get("tempo", [1.0] * len(dec["attention"])))
        out = dec["attention"]
        ctc = dec.get("ctc", [[]] * len(out))
        joint = dec.get("joint", [[]] * len(out))
        unended.extend(dec["unended"])
        for r, h, c, j, i in zip(batch["text"], out, ctc, joint, batch["id"]):
            refs.append(r)
            hyps.append(tokenizer.decode(h))
            ctc_hyps.append(tokenizer.decode(c))
            joint_hyps.append(tokenizer.decode(j))
            ids.append(i)
        if max_utts is not None and len(refs) >= max_utts:
            break
    if max_utts is not None:
        refs, hyps, ids = refs[:max_utts], hyps[:max_utts], ids[:max_utts]
        ctc_hyps, joint_hyps = ctc_hyps[:max_utts], joint_hyps[:max_utts]
        unended, tempos = unended[:max_utts], tempos[:max_utts]
    model.train(was_training)
    keep = [k for k, r in enumerate(refs) if r.strip()]
    if not keep:
        raise ValueError("no non-empty reference transcripts to score")
    r = [refs[k] for k in keep]
    h = [hyps[k] for k in keep]
    res = {"cer": float(jiwer.cer(r, h)), "wer": float(jiwer.wer(r, h)), "n": len(keep),
           "refs": refs, "hyps": hyps, "ids": ids, "unended": sum(unended), "tempos": tempos}
    if use_ctc:
        c = [ctc_hyps[k] for k in keep]
        j = [joint_hyps[k] for k in keep]
        res.update(ctc_cer=float(jiwer.cer(r, c)), ctc_wer=float(jiwer.wer(r, c)),
                   ctc_hyps=ctc_hyps, joint_cer=float(jiwer.cer(r, j)),
                   joint_wer=float(jiwer.wer(r, j)), joint_hyps=joint_hyps)
    return res


DECODERS = (("", "attention greedy"), ("ctc_", "CTC greedy"), ("joint_", "joint CTC/attention"))


def print_samples(result: dict, n: int, file=None) -> None:
    """The first ``n`` (reference, hypothesis) pairs of an :func:`evaluate` result."""
    import sys
    file = file or sys.stdout
    for ref, hyp, uid in list(zip(result["refs"], result["hyps"], result["ids"]))[:n]:
        print(f"  [{uid}] ref: {ref}\n  {' ' * (len(uid) + 2)} hyp: {hyp}", file=file)


def score_summary(res: dict) -> str:
    """One line of the CER/WER of every decoder in an :func:`evaluate` result, and how
    many attention hypotheses never emitted the end token (their CER can exceed 1)."""
    line = "; ".join(f"{name} CER {res[p + 'cer']:.4f} WER {res[p + 'wer']:.4f}"
                     for p, name in DECODERS if p + "cer" in res)
    if res.get("unended"):
        line += (f" ({res['unended']} attention hypotheses never emitted the end token and "
                 "stopped at their encoder's length)")
    return line


def score_groups(res: dict, labels: Dict[str, str]) -> Dict[str, dict]:
    """CER/WER of every decoder of an :func:`evaluate` result per group of utterances.

    ``labels``: utterance id -> group name (e.g. a manifest field, see
    :func:`zeromask.data.manifest_labels`); utterances without a label, or with an empty
    reference, are left out. Returns ``{group: {"n", "cer", "wer", "ctc_cer", ...}}`` in
    sorted group order (jiwer's corpus-level rates within each group).
    """
    import jiwer
    members: Dict[str, List[int]] = {}
    for k, uid in enumerate(res["ids"]):
        if uid in labels and res["refs"][k].strip():
            members.setdefault(labels[uid], []).append(k)
    out = {}
    for group in sorted(members):
        ks = members[group]
        refs = [res["refs"][k] for k in ks]
        rec = {"n": len(ks)}
        for p, _ in DECODERS:
            hyps = res.get(p + "hyps")
            if hyps is not None and p + "cer" in res:
                h = [hyps[k] for k in ks]
                rec[p + "cer"] = float(jiwer.cer(refs, h))
                rec[p + "wer"] = float(jiwer.wer(refs, h))
        out[group] = rec
    return out


def score_record(res: dict) -> dict:
    """The CER/WER numbers of an :func:`evaluate` result (for logs and JSON)."""
    rec = {p + m: res[p + m] for p, _ in DECODERS for m in ("cer", "wer") if p + m in res}
    if "unended" in res:
        rec["unended"] = res["unended"]
    return rec


__all__ = ["score_summary", "score_record", "score_groups", "BucketBatchSampler", "utterance_frames", "to_device", "lr_lambda", "lr_factor",
           "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "evaluate",
           "WeightAverage", "checkpoint_weights", "WEIGHTS",
           "TENSOR_KEYS"]


# --------------------------------------------------------------------------------------
# the training loop (zeromask-train), in small named steps
# --------------------------------------------------------------------------------------
class Dist:
    """torchrun environment: rank, world size, device; no-op when single-process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.enabled:
            import torch.distributed as dist
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (a stop decision everyone shares)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, x: float) -> float:
        if not self.enabled:
            return x
        import torch.distributed as dist
        t = torch.tensor([x], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def close(self):
        if self.enabled:
            import torch.distributed as dist
            dist.destroy_process_group()


class ResumableBatches:
    """A :class:`BucketBatchSampler` whose next epoch can start ``skip`` batches in.

    ``skip`` applies once (the epoch a resume lands in), then resets to 0; the batches are
    the sampler's own for that epoch, so a resumed run continues the interrupted sequence.
    """

    def __init__(self, sampler, skip: int = 0):
        self.sampler, self.skip = sampler, int(skip)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        batches = list(self.sampler)[self.skip:]
        self.skip = 0
        return iter(batches)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class TrainingError(ValueError):
    """A run that cannot start as configured (the message says why)."""


class _Window:
    """Loss and throughput since the last logged step (rank-averaged when logged)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss = self.ctc = 0.0
        self.n = self.utts = 0
        self.t = time.time()

    def add(self, loss: float, ctc: Optional[float], utts: int) -> None:
        self.loss += loss
        self.ctc += ctc or 0.0
        self.n += 1
        self.utts += utts


class Trainer:
    """One training run of :class:`SpeechModel`: the loop of ``zeromask-train``.

    Args:
        out: the run folder (``last.pt``, ``best.pt``, ``log.jsonl``, ``results.json``).
        cfg: the model's :class:`ModelConfig`; tokenizer: its :class:`CharTokenizer`.
        opt: the training options (``zeromask.cli.train.resolve``'s second result: lr,
            weight_decay, warmup, max_steps, time_budget (s), batch_size, eval_batch_size,
            grad_clip, seed, log_every, ckpt_every, eval_every, eval_max, samples,
            num_workers).
        dist: a :class:`Dist`; train_ds / test_ds: prepared :class:`SpeechDataset` s (test_ds
            None: no evaluation).
        ckpt: a checkpoint of this run to resume (:func:`load_checkpoint`), or None.
        progress: a tqdm bar over the limit that ends the run (seconds or steps).
        pad_multiple: batches are padded to a multiple of this many frames.

    :meth:`run` trains until ``max_steps``, the time budget (training time of every
    invocation, evaluation excluded) or an interruption, and :meth:`finish` writes the
    final checkpoint, evaluation and ``results.json``.
    """

    def __init__(self, out, cfg: ModelConfig, tokenizer: CharTokenizer, opt: dict, dist: Dist,
                 train_ds, test_ds=None, *, ckpt: Optional[dict] = None, progress: bool = True,
                 pad_multiple: int = 1):
        self.out, self.cfg, self.tokenizer, self.opt, self.dist = Path(out), cfg, tokenizer, opt, dist
        self.train_ds, self.test_ds = train_ds, test_ds
        self.progress, self.pad_multiple = progress, int(pad_multiple)
        self.last = self.out / "last.pt"
        self.step = self.epoch = self.in_epoch = 0
        self.elapsed0 = 0.0
        self.best = float("inf")
        self.last_loss = float("nan")
        self.bar = None
        self.resumed = ckpt is not None
        self._log_fh = None
        self._build_data()
        self._build_model()
        if ckpt is not None:
            self._resume(ckpt)
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log_fh = self._open_log()
        self._wrap_ddp()
        self.t0 = time.time() - self.elapsed0  # elapsed time counts every invocation

    # -- setup --------------------------------------------------------------------------
    def _build_data(self) -> None:
        from ..data import collate
        opt, dist = self.opt, self.dist
        seed = int(opt["seed"])
        sampler = BucketBatchSampler(dataset_frames(self.train_ds), int(opt["batch_size"]),
                                     seed=seed, rank=dist.rank, world=dist.world)
        if len(sampler) == 0:
            raise TrainingError(f"{len(self.train_ds.utterances)} training utterances make "
                                f"no batch for {dist.world} rank(s)")
        self.batches = ResumableBatches(sampler)
        # its own generator: a DataLoader iterator draws a base seed, which must not move
        # the global RNG (dropout, SpecAugment) differently in a resumed run
        self.loader = torch.utils.data.DataLoader(
            self.train_ds, batch_sampler=self.batches,
            collate_fn=functools.partial(collate, pad_multiple=self.pad_multiple),
            num_workers=int(opt["num_workers"]), generator=torch.Generator().manual_seed(seed))
        self.eval_loader = None
        if self.test_ds is not None and dist.main:
            self.eval_loader = length_sorted_loader(self.test_ds, int(opt["eval_batch_size"]),
                                                    self.pad_multiple)

    def _build_model(self) -> None:
        self.model = SpeechModel(self.cfg).to(self.dist.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(self.opt["lr"]),
                                           weight_decay=float(self.opt["weight_decay"]))
        decay = float(self.opt.get("ema") or 0.0)
        self.ema = WeightAverage(self.model, decay) if decay > 0 else None
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def _open_log(self):
        """``log.jsonl`` for appending, holding only lines up to the step training starts
        from: emptied for a fresh run (a run folder kept without its checkpoint, as a
        committed grid keeps it, starts over), and for a resumed one cut after the
        checkpoint's step (the lines logged between that checkpoint and the interruption
        are trained again)."""
        path = self.out / "log.jsonl"
        kept = []
        if self.resumed and path.exists():
            for ln in path.read_text().splitlines():
                try:
                    if json.loads(ln).get("step", 0) <= self.step:
                        kept.append(ln)
                except ValueError:  # a line cut short by a kill
                    pass
        fh = open(path, "w")
        fh.write("".join(ln + "\n" for ln in kept))
        fh.flush()
        return fh

    def _resume(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None:
            if isinstance(ckpt.get("ema"), dict):
                self.ema.load_state_dict(ckpt["ema"])
            elif self.dist.main:  # a run resumed with --ema that had none: start it now
                print(f"{self.last} holds no weight average: --ema starts averaging at "
                      f"step {ckpt['step']}")
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        extra = ckpt.get("extra", {})
        self.elapsed0 = float(extra.get("elapsed", 0.0))
        self.best = extra.get("best_cer", self.best)
        in_epoch = extra.get("batch_in_epoch")
        if in_epoch is None:  # a checkpoint from before batch_in_epoch was saved
            in_epoch = 0
            note = f"restarts epoch {self.epoch} from its first batch"
        else:
            note = f"skips the {in_epoch} batch(es) of epoch {self.epoch} already trained on"
            if not self.dist.enabled and "python" in ckpt.get("rng", {}):
                random.setstate(ckpt["rng"]["python"])
        self.in_epoch = int(in_epoch)
        self.batches.skip = self.in_epoch
        if self.dist.main:
            print(f"resumed from {self.last} at step {self.step} ({self.elapsed0:.1f} s "
                  f"elapsed so far); {note}")

    def _wrap_ddp(self) -> None:
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            dev = self.dist.device
            self.net = DDP(self.model, device_ids=[self.dist.local_rank]
                           if dev.type == "cuda" else None,
                           find_unused_parameters=self.cfg.curriculum_steps > 0)

    # -- the pieces of a step -----------------------------------------------------------
    def elapsed(self) -> float:
        """Training seconds so far, every invocation of the run together."""
        return time.time() - self.t0

    def set_lr(self) -> float:
        """The schedule's rate now (a function of step and elapsed time: nothing to save)."""
        o = self.opt
        lr = float(o["lr"]) * lr_factor(self.step, int(o["warmup"]), o["max_steps"],
                                        self.elapsed(), o["time_budget"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, batch: dict) -> Dict[str, float]:
        """One optimizer step on ``batch``: {"loss", "ctc_loss" (None without CTC), "lr",
        "utts" (over every rank)}."""
        self.model.set_step(self.step)
        lr = self.set_lr()
        tb = to_device(batch, self.dist.device)
        outputs = self.net(**tb)
        loss = outputs["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.opt["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.opt["grad_clip"]))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        ctc = outputs["ctc_loss"].item() if "ctc_loss" in outputs else None
        return {"loss": loss.item(), "ctc_loss": ctc, "lr": lr,
                "utts": tb["input_ids"].shape[0] * self.dist.world}

    def log(self, rec: dict) -> None:
        """One line of ``log.jsonl`` (main rank)."""
        if self._log_fh is not None:
            self._log_fh.write(json.dumps(rec) + "\n")
            self._log_fh.flush()

    def _log_window(self, window: _Window, lr: float, has_ctc: bool) -> None:
        mean_loss = self.dist.mean(window.loss / window.n)
        dt = max(time.time() - window.t, 1e-9)
        rec = {"step": self.step, "loss": mean_loss, "lr": lr, "steps_per_s": window.n / dt,
               "utts_per_s": window.utts / dt, "elapsed": self.elapsed(),
               "features": self.model.active_features(self.step)}
        if has_ctc:
            rec["ctc_loss"] = self.dist.mean(window.ctc / window.n)
        self.log(rec)
        self.last_loss = mean_loss
        if self.bar is not None:
            self.bar.set_postfix(step=self.step, loss=f"{mean_loss:.3f}",
                                 it_s=f"{window.n / dt:.2f}", utt_s=f"{window.utts / dt:.1f}",
                                 lr=f"{lr:.2e}")
        window.reset()

    def inference_model(self) -> SpeechModel:
        """The weights evaluations score and ``best.pt`` keeps: the moving average with
        ``ema``, else the model being trained."""
        return self.ema.averaged() if self.ema is not None else self.model

    def evaluate(self, tag: str) -> Optional[dict]:
        """Score the held-out set (main rank; None without one) with
        :meth:`inference_model`, print it with samples, log it, and keep ``best.pt``; a
        periodic evaluation does not count as training time."""
        if self.eval_loader is None:
            return None
        t_eval = time.time()
        res = evaluate(self.inference_model(), self.eval_loader, self.tokenizer, self.dist.device,
                       max_utts=int(self.opt["eval_max"]), progress=self.progress)
        if tag != "final":
            self.t0 += time.time() - t_eval
        text = io.StringIO()
        print(f"[{tag} step {self.step}] held-out {score_summary(res)} on {res['n']} "
              "utterances", file=text)
        print_samples(res, int(self.opt["samples"]), file=text)
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text.getvalue().rstrip("\n"))  # above the bar, which stays whole
        else:
            print(text.getvalue(), end="")
        self.log(dict({"step": self.step, "eval": True, "n": res["n"],
                       "elapsed": self.elapsed()}, **score_record(res)))
        if res["cer"] < self.best:
            self.best = res["cer"]
            save_checkpoint(self.out / "best.pt", model=self.inference_model(), step=self.step,
                            epoch=self.epoch, tokenizer=self.tokenizer,
                            extra={"cer": res["cer"], "wer": res["wer"]})
        return res

    def save(self) -> None:
        """``last.pt``: everything a resume needs (weights, optimizer, step, epoch and the
        position in it, RNG, elapsed time, best CER)."""
        save_checkpoint(self.last, model=self.model, optimizer=self.optimizer, step=self.step,
                        epoch=self.epoch, tokenizer=self.tokenizer,
                        extra={"best_cer": self.best, "elapsed": self.elapsed(),
                               "batch_in_epoch": self.in_epoch}, ema=self.ema)

    def _every(self, key: str) -> bool:
        n = int(self.opt[key])
        return bool(n) and self.step % n == 0

    def _done(self, interrupted) -> bool:
        """The stop decision every rank shares: max_steps, the budget, a signal."""
        budget, max_steps = self.opt["time_budget"], self.opt["max_steps"]
        out_of_time = budget is not None and self.elapsed() >= float(budget)
        signalled = interrupted is not None and interrupted.signum is not None
        return self.dist.any(out_of_time or (max_steps is not None and self.step >= max_steps)
                             or signalled)

    def _open_bar(self) -> None:
        budget = self.opt["time_budget"]
        if not (self.dist.main and self.progress):
            return
        from tqdm import tqdm
        # the bar runs over the limit that ends the run: seconds with a time budget (its
        # estimate is then right), else steps
        if budget is not None:
            total = round(float(budget))
            self.bar = tqdm(total=total, initial=min(round(self.elapsed0), total), desc="train",
                            unit="s", dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                       "[{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=self.opt["max_steps"], initial=self.step, desc="train",
                            unit="step", dynamic_ncols=True)

    def _advance_bar(self) -> None:
        if self.bar is None:
            return
        if self.opt["time_budget"] is not None:
            self.bar.update(max(0, min(round(self.elapsed()), self.bar.total) - self.bar.n))
        else:
            self.bar.update(1)

    # -- the loop -----------------------------------------------------------------------
    def run(self, interrupted=None) -> None:
        """Train until max_steps, the time budget or ``interrupted.signum`` (an object whose
        ``signum`` a signal handler sets) says stop."""
        budget, max_steps = self.opt["time_budget"], self.opt["max_steps"]
        stop = max_steps is not None and self.step >= max_steps
        if self.resumed and budget is not None and self.elapsed0 >= float(budget):
            stop = True
            if self.dist.main:
                print(f"time budget {float(budget):.1f} s already spent "
                      f"({self.elapsed0:.1f} s): no further training")
        self._open_bar()
        redirect = None
        if self.bar is not None:  # log lines (the backend choice) above the bar
            from tqdm.contrib.logging import logging_redirect_tqdm
            redirect = logging_redirect_tqdm()
            redirect.__enter__()
        try:
            self.model.train()
            window = _Window()
            while not stop:
                self.batches.set_epoch(self.epoch)
                for batch in self.loader:
                    self.in_epoch += 1
                    res = self.train_step(batch)
                    window.add(res["loss"], res["ctc_loss"], res["utts"])
                    if self._every("log_every") or self.step == 1:
                        self._log_window(window, res["lr"], res["ctc_loss"] is not None)
                    self._advance_bar()
                    stop = self._done(interrupted)
                    if self.dist.main and self._every("ckpt_every"):
                        self.save()
                    if self.dist.main and self._every("eval_every") and not stop:
                        self.evaluate("eval")
                        self.model.train()
                        window.t = time.time()  # throughput counts training only
                    if self.dist.enabled and self._every("eval_every"):
                        self.dist.barrier()
                    if stop:
                        break
                else:
                    self.epoch += 1
                    self.in_epoch = 0
        finally:
            if redirect is not None:
                redirect.__exit__(None, None, None)
            if self.bar is not None:
                self.bar.close()

    def finish(self, final_eval: bool = True) -> dict:
        """After :meth:`run` (main rank): ``last.pt``, the final evaluation, and
        ``results.json``, whose dict it returns."""
        elapsed = self.elapsed()
        self.save()
        res = self.evaluate("final") if final_eval else None
        results = {"step": self.step, "epoch": self.epoch, "elapsed_s": elapsed,
                   "this_invocation_s": elapsed - self.elapsed0, "last_loss": self.last_loss,
                   "parameters": self.n_params, "config": self.cfg.to_dict()}
        if res is not None:
            results.update(score_record(res), n_eval=res["n"], best_cer=self.best)
        (self.out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"done: step {self.step}, {elapsed:.1f} s, last loss {self.last_loss:.4f}; "
              f"checkpoint {self.last}")
        return results

    def close(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
