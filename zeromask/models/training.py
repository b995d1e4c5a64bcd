"""Training helpers shared by ``zeromask-train`` and ``zeromask-eval``.

Length-bucketed batching that splits the same way on every DDP rank, checkpoints that
carry everything a resume needs (model config, tokenizer, optimizer, scheduler, step, RNG),
and CER/WER evaluation with greedy decoding (jiwer).
"""
from __future__ import annotations

import math
import os
import random
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
                    tokenizer: Optional[CharTokenizer] = None, extra: Optional[dict] = None) -> None:
    """Atomically write a checkpoint (a torn file never replaces a good one)."""
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


def model_from_checkpoint(ckpt: dict, **overrides) -> SpeechModel:
    """A model with the checkpoint's config (``overrides`` e.g. ``backend=``) and weights."""
    cfg = ModelConfig.from_dict(dict(ckpt["config"], **overrides))
    model = SpeechModel(cfg)
    model.load_state_dict(ckpt["model"])
    return model


@torch.no_grad()
def evaluate(model: SpeechModel, loader, tokenizer: CharTokenizer, device="cpu",
             max_utts: Optional[int] = None, max_len: Optional[int] = None,
             progress: bool = False) -> dict:
    """Greedy-decode ``loader`` and score it (character and word error rates, jiwer).

    Returns ``{cer, wer, n, refs, hyps, ids}`` for the attention decoder's greedy output
    and, when the model has a CTC head, ``ctc_cer``, ``ctc_wer`` and ``ctc_hyps`` for greedy
    CTC decoding of the same utterances and ``joint_cer``, ``joint_wer``, ``joint_hyps`` for
    one-pass joint CTC/attention greedy decoding with CTC prefix scores
    (:meth:`SpeechModel.transcribe`).
    """
    import jiwer
    was_training = model.training
    model.eval()
    use_ctc = model.config.ctc_weight > 0
    refs, hyps, ctc_hyps, joint_hyps, ids, unended = [], [], [], [], [], []
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="eval", unit="batch", leave=False)
    for batch in it:
        dec = model.transcribe(**to_device(batch, device), max_len=max_len)
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
        unended = unended[:max_utts]
    model.train(was_training)
    keep = [k for k, r in enumerate(refs) if r.strip()]
    if not keep:
        raise ValueError("no non-empty reference transcripts to score")
    r = [refs[k] for k in keep]
    h = [hyps[k] for k in keep]
    res = {"cer": float(jiwer.cer(r, h)), "wer": float(jiwer.wer(r, h)), "n": len(keep),
           "refs": refs, "hyps": hyps, "ids": ids, "unended": sum(unended)}
    if use_ctc:
        c = [ctc_hyps[k] for k in keep]
        j = [joint_hyps[k] for k in keep]
        res.update(ctc_cer=float(jiwer.cer(r, c)), ctc_wer=float(jiwer.wer(r, c)),
                   ctc_hyps=ctc_hyps, joint_cer=float(jiwer.cer(r, j)),
                   joint_wer=float(jiwer.wer(r, j)), joint_hyps=joint_hyps)
    return res


DECODERS = (("", "attention greedy"), ("ctc_", "CTC greedy"), ("joint_", "joint CTC/attention"))


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
           "TENSOR_KEYS"]
