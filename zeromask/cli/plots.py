"""Plots of the reference speech model (matplotlib, Agg backend: no display needed).

* :func:`plot_utterance`: one utterance stacked on a shared time axis — the log-mel
  spectrogram with its F0 contour drawn over it, energy, periodicity, the zero-token mask
  (frame rate, and at the encoder's downsampled rate) and the cross-attention map of one
  decoder stage (text characters x encoder frames, head-averaged, teacher-forced on the
  reference transcript).
* :func:`plot_curves`: training loss vs step for several runs (one line each).
* :func:`plot_cer_vs_time`: held-out CER (attention greedy, and CTC greedy where logged)
  against training wall-clock time, from the evaluations in ``log.jsonl``.
* :func:`plot_question_curves`: several rows x seeds of an experiment grid, training loss
  and held-out CER against step (zeromask-experiments' ``curves_<question>.png``).
* :func:`plot_cross_attention_compare`: the cross-attention of several checkpoints on one
  held-out utterance, side by side (zeromask-experiments' ``cross_attention.png``).

Command line::

    python -m zeromask.cli.plots utterance --checkpoint RUN/best.pt --data DATA/test \\
        --index 0 --stage spectrogram --out utt.png
    python -m zeromask.cli.plots curves --out curves.png RUN_A/log.jsonl RUN_B/log.jsonl
    python -m zeromask.cli.plots cer --out cer.png RUN/log.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np


def _save(fig, path) -> Path:
    """Lay out, write and close a figure; the parent folder is created."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _plt().close(fig)
    return path


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def read_losses(log_path: Union[str, os.PathLike]) -> Tuple[List[int], List[float]]:
    """(steps, losses) of the training records of a ``zeromask-train`` ``log.jsonl``."""
    steps, losses = [], []
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(int(rec["step"]))
            losses.append(float(rec["loss"]))
    return steps, losses


def read_evals(log_path: Union[str, os.PathLike]) -> List[dict]:
    """The evaluation records (``"eval": true``) of a ``zeromask-train`` ``log.jsonl``."""
    out = []
    for line in Path(log_path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("eval"):
                out.append(rec)
    return out


def plot_cer_vs_time(runs: Dict[str, Sequence[dict]], path: Union[str, os.PathLike],
                     title: str = "held-out CER against training time",
                     target: Optional[float] = 0.05) -> Path:
    """Held-out CER (log scale) against training minutes, one line per run and decoder.

    ``runs``: ``{label: evaluation records}`` as :func:`read_evals` returns them (keys
    ``elapsed`` in seconds, ``cer`` and optionally ``ctc_cer`` and ``joint_cer``); ``target`` draws a
    horizontal line (None: none).
    """
    if not any(runs.values()):
        raise ValueError("no evaluation records to plot (train with --eval-every N)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, recs in runs.items():
        if not recs:
            continue
        t = [r["elapsed"] / 60.0 for r in recs]
        line, = ax.plot(t, [max(r["cer"], 1e-4) for r in recs], "o-", lw=1.4, ms=3.5,
                        label=f"{label}: attention decoder, greedy")
        if all("ctc_cer" in r for r in recs):
            ax.plot(t, [max(r["ctc_cer"], 1e-4) for r in recs], "s--", lw=1.1, ms=3,
                    color=line.get_color(), alpha=0.8, label=f"{label}: CTC head, greedy")
        if all("joint_cer" in r for r in recs):
            ax.plot(t, [max(r["joint_cer"], 1e-4) for r in recs], "^-", lw=2.0, ms=4,
                    color=line.get_color(), label=f"{label}: joint CTC/attention, greedy")
    if target is not None:
        ax.axhline(target, color="0.3", lw=0.8, ls=":", label=f"target CER {target:g}")
    ax.set_yscale("log")
    ax.set_xlabel("training time (minutes; evaluations not counted)")
    ax.set_ylabel("character error rate")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_curves(curves: Dict[str, Tuple[Sequence[int], Sequence[float]]],
                path: Union[str, os.PathLike], title: str = "training loss",
                styles: Optional[Dict[str, dict]] = None) -> Path:
    """Loss vs step, one line per entry of ``curves`` ({label: (steps, losses)})."""
    if not curves:
        raise ValueError("no curves to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, (steps, losses) in curves.items():
        if len(steps) == 0:
            continue
        ax.plot(steps, losses, label=label, lw=1.3, **(styles or {}).get(label, {}))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)
    return _save(fig, path)


def plot_question_curves(runs: Dict[str, Dict[int, dict]], path: Union[str, os.PathLike],
                         title: str = "training curves", cer_key: str = "cer") -> Path:
    """Training loss (left) and held-out CER (right, log scale) against step.

    ``runs``: ``{row: {seed: {"losses": (steps, losses), "evals": evaluation records}}}``
    (:func:`read_losses`, :func:`read_evals`); one colour per row, one line style per seed.
    ``cer_key``: the evaluation field drawn (e.g. ``"joint_cer"``; ``"cer"`` where a record
    lacks it).
    """
    if not runs:
        raise ValueError("no runs to plot")
    plt = _plt()
    fig, (ax_l, ax_c) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110)
    styles = ["-", "--", ":", "-."]
    for i, (row, seeds) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for j, seed in enumerate(sorted(seeds)):
            r = seeds[seed]
            ls = styles[j % len(styles)]
            label = f"{row} (seed {seed})"
            steps, losses = r["losses"]
            if len(steps):
                ax_l.plot(steps, losses, color=color, ls=ls, lw=1.1, label=label)
            ev = [(e["step"], e.get(cer_key, e.get("cer"))) for e in r.get("evals", [])]
            ev = [(s, c) for s, c in ev if c is not None]
            if ev:
                ax_c.plot([s for s, _ in ev], [max(c, 1e-4) for _, c in ev], color=color,
                          ls=ls, marker="o", ms=3, lw=1.1, label=label)
    ax_l.set_xlabel("optimizer step")
    ax_l.set_ylabel("training loss")
    ax_l.grid(alpha=0.3)
    ax_c.set_xlabel("optimizer step")
    ax_c.set_ylabel(f"held-out CER ({cer_key.replace('_cer', '') or 'attention'} decoder)")
    ax_c.set_yscale("log")
    ax_c.grid(alpha=0.3, which="both")
    ax_l.legend(fontsize=6, ncol=2 if sum(map(len, runs.values())) > 8 else 1)
    fig.suptitle(f"{title} (colour: row, line style: seed)", fontsize=10)
    return _save(fig, path)


def plot_cross_attention_compare(checkpoints: Dict[str, Union[str, os.PathLike]], data: str,
                                 path: Union[str, os.PathLike], index: int = 0,
                                 stage: Optional[str] = None, layer: int = 0,
                                 cache_dir: Optional[str] = None) -> Path:
    """The cross-attention of each checkpoint (``{label: last.pt}``) on the same held-out
    utterance ``index`` (sorted ids of ``data``), side by side: per column the silent frames
    (and whether that model treats them as zero tokens), the attention map (characters x
    encoder frames, head-averaged, teacher-forced on the reference) of decoder stage
    ``stage`` (default: the first checkpoint's first), the share of attention on silent
    frames, and the greedy hypothesis."""
    import torch
    from matplotlib.colors import PowerNorm
    from .. import zero
    from ..data import CharTokenizer, SpeechDataset, collate, find_utterances
    from ..models.asr import downsample_mask
    from ..models.training import load_checkpoint, model_from_checkpoint
    if not checkpoints:
        raise ValueError("no checkpoints to compare")
    cache = cache_dir or os.path.join(os.path.dirname(os.path.abspath(data)), ".features")
    utts = sorted(find_utterances(data), key=lambda u: u.id)
    plt = _plt()
    n = len(checkpoints)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 6.5), dpi=110, squeeze=False,
                             gridspec_kw={"height_ratios": [0.35, 4]})
    item = None
    for c, (label, ckpt_path) in enumerate(checkpoints.items()):
        ckpt = load_checkpoint(ckpt_path)
        model = model_from_checkpoint(ckpt).eval()
        model.set_step(int(ckpt.get("step", 0)))
        tok = CharTokenizer.from_json(ckpt["tokenizer"])
        if item is None:
            ds = SpeechDataset(utts, tok, cache_dir=cache)
            item = ds[index]
            batch = collate([item])
            hop_s = ds.config.hop_length / ds.config.sample_rate
        cfg = model.config
        st = stage or cfg.feature_order[0]
        if st not in cfg.feature_order:
            raise ValueError(f"{label}: stage {st!r} is not in its feature_order "
                             f"{list(cfg.feature_order)}")
        tensors = {k: batch[k] for k in ("spectrogram", "waveform", "pitch", "f0", "input_ids")}
        with torch.no_grad():
            spec = batch["spectrogram"]
            silent = downsample_mask(zero.from_audio(
                spec, spec, top_db=cfg.silence_top_db, threshold_db=cfg.silence_threshold_db),
                cfg.downsample)[0].numpy()
            is_zero = downsample_mask(model.zero_mask(spec), cfg.downsample)[0].numpy()
            att = model.cross_attention_weights(**tensors)[st][layer][0].numpy()
            hyp = tok.decode(model.generate(**{k: v for k, v in tensors.items()
                                               if k != "input_ids"})[0])
        t_end = len(silent) * cfg.downsample * hop_s
        ax = axes[0, c]
        ax.imshow(np.stack([silent, is_zero]).astype(float), aspect="auto", cmap="Greys",
                  vmin=0, vmax=1.4, interpolation="nearest", extent=[0, t_end, 1.5, -0.5])
        ax.set_yticks([0, 1])
        ax.set_yticklabels(["silent", "zero token"], fontsize=6)
        ax.set_xticks([])
        on_silence = float(att[:, silent.astype(bool)].sum(-1).mean()) if silent.any() else 0.0
        short = hyp if len(hyp) <= 40 else hyp[:37] + "..."
        ax.set_title(f"{label}\nattention on silent frames {on_silence:.1%}\n"
                     f"hyp: \"{short}\"", fontsize=7)
        ax = axes[1, c]
        chars = list(item["text"]) + ["<end>"]
        ax.imshow(att, origin="upper", aspect="auto", cmap="viridis", interpolation="nearest",
                  norm=PowerNorm(0.5, vmin=0.0, vmax=max(float(att.max()), 1e-9)),
                  extent=[0, t_end, len(chars) - 0.5, -0.5])
        if len(chars) <= 60:
            ax.set_yticks(range(len(chars)))
            ax.set_yticklabels(["\u2423" if ch == " " else ch for ch in chars], fontsize=5)
        ax.set_xlabel("time (s)")
        if c == 0:
            ax.set_ylabel(f"predicting (stage '{st}', layer {layer}, mean of heads)")
    fig.suptitle(f"{item['id']}: \"{item['text']}\" (cross-attention, teacher-forced; "
                 "square-root colour scale)", fontsize=9)
    return _save(fig, path)


def plot_utterance(model, item: dict, tokenizer, path: Union[str, os.PathLike],
                   stage: Optional[str] = None, layer: int = 0, feature_config=None,
                   title: Optional[str] = None) -> Path:
    """Stacked features, zero tokens and one decoder stage's cross-attention of ``item``.

    ``item`` is a :class:`zeromask.data.SpeechDataset` item (one utterance). ``stage``: the
    feature whose cross-attention stage is drawn (default: the first of ``feature_order``);
    ``layer``: which cross layer of that stage. The attention is computed teacher-forced on
    the reference transcript (row ``i`` is the query that predicts character ``i``; the
    last row predicts "end").
    """
    import torch
    from ..audio import FeatureConfig
    from ..data import collate
    from ..models.asr import downsample_mask

    plt = _plt()
    fc = feature_config or FeatureConfig()
    cfg = model.config
    stage = stage or cfg.feature_order[0]
    if stage not in cfg.feature_order:
        raise ValueError(f"stage {stage!r} is not in the model's feature_order "
                         f"{list(cfg.feature_order)}")
    batch = collate([item])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        tensors = {k: batch[k] for k in ("spectrogram", "waveform", "pitch", "f0", "input_ids")}
        zero_frames = model.zero_mask(batch["spectrogram"])[0].numpy()
        zero_down = downsample_mask(model.zero_mask(batch["spectrogram"]), cfg.downsample)[0]
        weights = model.cross_attention_weights(**tensors)
        hyp = tokenizer.decode(model.generate(**{k: v for k, v in tensors.items()
                                                 if k != "input_ids"})[0])
    model.train(was_training)
    if stage not in weights or not weights[stage]:
        raise RuntimeError(f"stage {stage!r} gave no attention weights (curriculum: is it "
                           "enabled at the model's step?)")
    att = weights[stage][min(layer, len(weights[stage]) - 1)][0].numpy()  # (N, T')
    spec = item["spectrogram"].numpy()
    pitch = item["pitch"].numpy()
    f0, energy, per = pitch[:, 0], pitch[:, 1], pitch[:, 2]
    T = spec.shape[0]
    hop_s = fc.hop_length / fc.sample_rate
    t = np.arange(T) * hop_s
    t_end = T * hop_s

    fig, axes = plt.subplots(5, 1, figsize=(9, 10), dpi=110, sharex=True,
                             gridspec_kw={"height_ratios": [3, 1, 1, 0.8, 3]})
    ax = axes[0]
    ax.imshow(spec.T, origin="lower", aspect="auto", cmap="magma",
              extent=[0, t_end, -0.5, spec.shape[1] - 0.5])
    voiced = f0 > 0
    ax.set_ylabel("mel band")
    tw = ax.twinx()  # F0 in Hz on its own axis, over the spectrogram
    tw.plot(t, np.where(voiced, f0, np.nan), color="cyan", lw=1.6, label="F0 (Hz, right axis)")
    tw.set_ylim(0, max(400.0, 1.1 * float(f0.max()) if voiced.any() else 400.0))
    tw.set_ylabel("F0 (Hz)", color="c")
    tw.legend(loc="upper right", fontsize=7)
    f0_txt = f"{np.median(f0[voiced]):.0f} Hz median" if voiced.any() else "unvoiced"
    ax.set_title(title or f"{item['id']}: \"{item['text']}\"  (F0 {f0_txt})", fontsize=9)

    axes[1].plot(t, energy, color="tab:orange", lw=1)
    axes[1].set_ylabel("energy\n(RMS)")
    axes[2].plot(t, per, color="tab:green", lw=1)
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_ylabel("periodicity")

    ax = axes[3]
    ax.fill_between(t, 0, zero_frames.astype(float), step="mid", color="0.3",
                    label=f"zero tokens, frame rate ({zero_frames.mean():.0%})")
    zd = zero_down.numpy().astype(float)
    td = (np.arange(len(zd)) * cfg.downsample + (cfg.downsample - 1) / 2) * hop_s
    ax.step(td, 1.15 * zd, where="mid", color="tab:red", lw=1.2,
            label=f"zero tokens after /{cfg.downsample} ({zd.mean():.0%})")
    ax.set_ylim(-0.1, 1.3)
    ax.set_yticks([0, 1])
    ax.set_ylabel("zero\nmask")
    ax.legend(loc="upper right", fontsize=6, ncol=2)

    ax = axes[4]
    chars = list(item["text"]) + ["<end>"]
    from matplotlib.colors import PowerNorm
    im = ax.imshow(att, origin="upper", aspect="auto", cmap="viridis", interpolation="nearest",
                   norm=PowerNorm(0.5, vmin=0.0, vmax=max(float(att.max()), 1e-9)),
                   extent=[0, len(zd) * cfg.downsample * hop_s, len(chars) - 0.5, -0.5])
    fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.04, pad=0.18,
                 label="attention weight (square-root colour scale)")
    if len(chars) <= 60:
        ax.set_yticks(range(len(chars)))
        ax.set_yticklabels(["\u2423" if c == " " else c for c in chars], fontsize=6)
    ax.set_ylabel("predicting")
    ax.set_xlabel("time (s)")
    short = hyp if len(hyp) <= 70 else hyp[:67] + "..."
    ax.set_title(f"cross-attention of decoder stage '{stage}', layer {layer} (mean of heads, "
                 f"teacher-forced)\ngreedy hypothesis: \"{short}\"", fontsize=8)
    for a in axes:
        a.set_xlim(0, t_end)
    return _save(fig, path)


def plot_checkpoint_utterance(checkpoint: Union[str, os.PathLike], data: str,
                              path: Union[str, os.PathLike], index: int = 0,
                              stage: Optional[str] = None, layer: int = 0,
                              cache_dir: Optional[str] = None,
                              backend: Optional[str] = None) -> Path:
    """:func:`plot_utterance` for utterance ``index`` (sorted ids) of the folder ``data``."""
    from ..data import CharTokenizer, SpeechDataset, find_utterances
    from ..models.training import load_checkpoint, model_from_checkpoint
    if os.path.isdir(os.path.join(data, "test")):
        data = os.path.join(data, "test")
    cache = cache_dir or os.path.join(os.path.dirname(os.path.abspath(data)), ".features")
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, **({"backend": backend} if backend else {}))
    if "step" in ckpt:
        model.set_step(int(ckpt["step"]))
    tok = CharTokenizer.from_json(ckpt["tokenizer"])
    utts = sorted(find_utterances(data), key=lambda u: u.id)
    ds = SpeechDataset(utts, tok, cache_dir=cache)
    return plot_utterance(model, ds[index], tok, path, stage=stage, layer=layer,
                          feature_config=ds.config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeromask-plots", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("utterance", help="features, zero mask and cross-attention of one "
                                          "held-out utterance")
    u.add_argument("--checkpoint", required=True)
    u.add_argument("--data", required=True, help="folder (or a folder with test/)")
    u.add_argument("--index", type=int, default=0)
    u.add_argument("--stage", help="decoder stage (feature) to show")
    u.add_argument("--layer", type=int, default=0)
    u.add_argument("--cache-dir")
    u.add_argument("--backend")
    u.add_argument("--out", required=True)
    c = sub.add_parser("curves", help="loss vs step of runs' log.jsonl")
    c.add_argument("logs", nargs="+", help="log.jsonl files (label = the run folder name)")
    c.add_argument("--out", required=True)
    c.add_argument("--title", default="training loss")
    e = sub.add_parser("cer", help="held-out CER vs training time of runs' log.jsonl")
    e.add_argument("logs", nargs="+", help="log.jsonl files (label = the run folder name)")
    e.add_argument("--out", required=True)
    e.add_argument("--title", default="held-out CER against training time")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "utterance":
        out = plot_checkpoint_utterance(args.checkpoint, args.data, args.out, index=args.index,
                                        stage=args.stage, layer=args.layer,
                                        cache_dir=args.cache_dir, backend=args.backend)
    elif args.cmd == "cer":
        runs = {Path(p).parent.name or str(p): read_evals(p) for p in args.logs}
        out = plot_cer_vs_time(runs, args.out, title=args.title)
    else:
        curves = {Path(p).parent.name or str(p): read_losses(p) for p in args.logs}
        out = plot_curves(curves, args.out, title=args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
