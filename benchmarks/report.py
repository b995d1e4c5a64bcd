"""The report of the benchmarks: the markdown table, the raw JSON, the plots, the block a
README quotes, and how far a run is from the committed results of the same suite.

``markdown`` opens with the check of the suite's targets (docs/design.md section 6 for the
``cpu``/``gpu`` suites, issue 15's for ``model``), then one table per op, mode and shape
group. Every function takes the :class:`runner.Row` list of one run and its ``meta``.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from runner import (BASELINE, DTYPES, HEAD_DIM_REFERENCE, MEMORY_METHOD, MODEL_TARGETS, MODES,
                    OVERHEAD_TARGETS_S, SECTION6_CPU, SECTION6_GPU_FLEX, SECTION6_GPU_FWD,
                    SECTION6_GPU_FWDBWD, SHORT_DTYPE, Row, cell_key, results_dir)

#: README blocks written by --update-readme sit between these markers (KEY: slug/suite)
MARKER = "benchmarks"


def _fmt_ms(s: Optional[float]) -> str:
    if s is None:
        return "—"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_rate(x: Optional[float], unit: float) -> str:
    return "—" if x is None else f"{x / unit:.3g}"


def _fmt_mib(b: Optional[int]) -> str:
    if b is None:
        return "—"
    return f"{b / 2**20:.3g}" if b < 100 * 2**20 else f"{b / 2**20:.0f}"


def _fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "—"
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _fmt_spread(r: Row) -> str:
    """Interquartile range of the timed calls as a percentage of their median."""
    if not r.median_s or len(r.times_s) < 3:
        return "—"
    q1, _, q3 = statistics.quantiles(r.times_s, n=4, method="inclusive")
    return f"{100 * (q3 - q1) / r.median_s:.0f}%"


def _fmt_err(r: Row) -> str:
    if r.max_abs_err is None:
        return "not checked" if r.status == "ok" else "—"
    return f"{r.max_abs_err:.1e}" + (" MISMATCH" if r.mismatch else "")


def fused_backends(device: str) -> List[str]:
    return ["triton", "cuda"] if device == "cuda" else ["cpp"]


def _needed_rate(fused: Optional[Row], ratio: float, target: float, peak: Optional[float],
                 unit: float, unit_name: str) -> str:
    """For a missed speed-up target ("other ÷ fused ≥ target"): the FLOP rate the fused
    kernel would need to meet it, against the measured compute ceiling."""
    if not (peak and fused and fused.flop_per_s) or ratio >= target:
        return ""
    need = fused.flop_per_s * target / ratio  # fused time other/target, same FLOPs
    if need > peak:
        return (f" (needs {need / unit:.3g} {unit_name}, {need / peak:.2f}x the compute "
                "ceiling: out of reach on this machine)")
    return f" (needs {need / unit:.3g} {unit_name}, {need / peak:.0%} of the compute ceiling)"


def _fmt_share(fused: Optional[Row], peak: Optional[float], label: Optional[str]) -> str:
    if not (peak and fused and fused.flop_per_s) or "no fused" in (label or ""):
        return "—"
    return f"{fused.flop_per_s / peak:.0%}"


def section6(rows: List[Row], device: str, ceiling: Optional[dict] = None) -> List[str]:
    """The docs/design.md section-6 lines for this run; ``ceiling`` (:func:`compute_ceiling`)
    adds how each fused time compares with the device's compute peak, and what rate a
    missed speed-up target would need."""
    lines: List[str] = []
    att = [r for r in rows if r.op == "attention"]

    def get(name, mode, length, d, dtype):
        for r in att:
            if (r.provider == name and r.mode == mode and r.length == length
                    and r.head_dim == d and r.dtype == dtype and r.status == "ok"):
                return r
        return None

    if device == "cpu":
        s6 = SECTION6_CPU
        shape = (f"B{s6['batch']} H{s6['heads']} L{s6['length']} D{s6['head_dim']} fp32")
        present = [r for r in att if r.batch == s6["batch"] and r.heads == s6["heads"]
                   and r.length == s6["length"] and r.head_dim == s6["head_dim"]
                   and r.dtype == "fp32"]
        lines.append(f"### docs/design.md section 6, CPU check ({shape})")
        lines.append("")
        if not present:
            lines.append(f"This run has no {shape} row (the `cpu` suite has it).")
            lines.append("")
            return lines
        cells = [(s6["length"], s6["head_dim"], "fp32")]
        targets = ("fused ÷ sdpa time ≤ 1.25; naive ÷ fused ≥ 3; flex+rope ÷ fused ≥ 3")
    else:
        cells = sorted({(r.length, r.head_dim, r.dtype) for r in att})
        lines.append("### docs/design.md section 6, GPU check")
        lines.append("")
        targets = (f"fused throughput ≥ {SECTION6_GPU_FWD}x flash SDPA's forward and ≥ "
                   f"{SECTION6_GPU_FWDBWD}x fwd+bwd, i.e. fused ÷ sdpa time ≤ "
                   f"{1 / SECTION6_GPU_FWD:.2f} forward, ≤ {1 / SECTION6_GPU_FWDBWD:.2f} "
                   f"fwd+bwd; flex+rope ÷ fused ≥ {SECTION6_GPU_FLEX}; memory O(L) (see the "
                   f"peak MiB column)")
    lines.append(f"Targets: {targets}. Ratios are of median times measured side by side "
                 "in this run; the last column compares the fastest calls instead, which "
                 "outside load disturbs least.")
    lines.append("")
    peak = ceiling["flop_per_s"] if ceiling else None
    unit, unit_name = (1e12, "TFLOP/s") if device == "cuda" else (1e9, "GFLOP/s")
    if ceiling:
        lines.append(f"Compute ceiling: {ceiling['what']}, {peak / unit:.3g} {unit_name} in "
                     "this run. Exact attention is two matrix products forward (five more "
                     "backward) plus a softmax, so no kernel runs them faster than this; a "
                     "speed-up target that needs more is out of reach on this machine.")
        lines.append("")
    lines.append("| mode | L | D | dtype | fused provider | fused ms | sdpa ms | fused ÷ sdpa "
                 "| naive ÷ fused | flex+rope ÷ fused | verdict | fused ÷ sdpa, fastest calls "
                 "| fused rate ÷ compute ceiling |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    modes = [m for m in MODES if any(r.mode == m for r in att)]
    for mode in modes:
        for (length, d, dtype) in cells:
            fused = None
            for b in fused_backends(device):
                fused = get(f"zeromask[{b}]", mode, length, d, dtype)
                if fused:
                    break
            label = fused.provider if fused else None
            if fused is None:  # no fused kernel here: show the reference for information
                fused = get("zeromask[reference]", mode, length, d, dtype)
                label = f"{fused.provider} (no fused backend)" if fused else "none"
            sd = get("sdpa", mode, length, d, dtype)
            nv = get("naive", mode, length, d, dtype)
            fx = get("flex+rope", mode, length, d, dtype)
            ft = fused.median_s if fused else None
            r_sdpa = ft / sd.median_s if (ft and sd) else None
            r_naive = nv.median_s / ft if (ft and nv) else None
            r_flex = fx.median_s / ft if (ft and fx) else None
            if fused is None or "no fused" in (label or ""):
                verdict = "no fused backend"
            else:
                if device == "cpu":
                    checks = [("fused ÷ sdpa", r_sdpa, "≤", 1.25), ("naive ÷ fused", r_naive,
                              "≥", 3.0), ("flex+rope ÷ fused", r_flex, "≥", 3.0)]
                else:
                    need = SECTION6_GPU_FWD if mode == "fwd" else SECTION6_GPU_FWDBWD
                    checks = [("fused ÷ sdpa", r_sdpa, "≤", 1 / need),
                              ("flex+rope ÷ fused", r_flex, "≥", SECTION6_GPU_FLEX)]
                missed = [f"{n} {v:.2f} not {op} {t:.2f}"
                          + (_needed_rate(fused, v, t, peak, unit, unit_name) if op == "≥"
                             else "")
                          for n, v, op, t in checks
                          if v is not None and not (v <= t if op == "≤" else v >= t)]
                absent = [n for n, v, _, _ in checks if v is None]
                verdict = ("misses: " + "; ".join(missed)) if missed else "meets"
                if absent:
                    verdict += " (not measured: " + ", ".join(absent) + ")"
            r_min = fused.min_s / sd.min_s if (fused and sd and fused.min_s and sd.min_s) \
                else None
            lines.append(f"| {mode} | {length} | {d} | {dtype} | {label} | {_fmt_ms(ft)} | "
                         f"{_fmt_ms(sd.median_s if sd else None)} | {_fmt_ratio(r_sdpa)} | "
                         f"{_fmt_ratio(r_naive)} | {_fmt_ratio(r_flex)} | {verdict} | "
                         f"{_fmt_ratio(r_min)} | {_fmt_share(fused, peak, label)} |")
    lines.append("")
    return lines




def _fmt_us(s: float) -> str:
    us = s * 1e6
    return f"{us:.3g}" if us < 100 else f"{us:.0f}"


def _fmt_time(s: Optional[float]) -> str:
    """``13.8 us`` below a millisecond, ``2.48 ms`` above."""
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{_fmt_us(s)} us"
    return f"{_fmt_ms(s)} ms"


def is_model_suite(meta: dict) -> bool:
    return bool(meta["config"].get("shapes"))


def _fused(rows: Sequence[Row], device: str, key: tuple) -> Optional[Row]:
    """The fused kernel's row of one shape (``zeromask[cpp]`` on a CPU), if it ran."""
    for b in fused_backends(device):
        r = next((r for r in rows if r.provider == f"zeromask[{b}]" and cell_key(r) == key
                  and r.status == "ok"), None)
        if r:
            return r
    return None


def _row(rows: Sequence[Row], name: str, key: tuple) -> Optional[Row]:
    return next((r for r in rows if r.provider == name and cell_key(r) == key
                 and r.status == "ok"), None)


def model_verdict(fused: Optional[Row], sdpa: Optional[Row]) -> str:
    """Issue 15's verdict for one model shape and mode: the fused time against plain SDPA's
    (≤ 0.9x forward, ≤ 1.0x fwd+bwd), and for the per-call overhead shape (B1 H1 L1 D16)
    against its absolute targets (≤ 25 us forward, ≤ 120 us fwd+bwd)."""
    if fused is None:
        return "no fused backend"
    if fused.tag == "overhead":
        limit = OVERHEAD_TARGETS_S[fused.mode]
        ok = fused.median_s <= limit
        fastest = f" (fastest call {_fmt_us(fused.min_s)} us)" if fused.min_s else ""
        return (f"{'meets' if ok else 'misses'}: {_fmt_us(fused.median_s)} us "
                f"{'≤' if ok else '>'} {limit * 1e6:.0f} us{fastest}")
    if sdpa is None or not sdpa.median_s:
        return "not measured (no sdpa row)"
    ratio, limit = fused.median_s / sdpa.median_s, MODEL_TARGETS[fused.mode]
    ok = ratio <= limit
    return f"{'meets' if ok else 'misses'}: {ratio:.2f} {'≤' if ok else '>'} {limit:.2f}"


def model_section(rows: List[Row], device: str, ceiling: Optional[dict] = None) -> List[str]:
    """Issue 15's tables: every model call's fused and SDPA times with each provider's
    ratio to plain SDPA and the verdict; the head dims per FLOP against D=64."""
    att = [r for r in rows if r.op == "attention"]
    if not att:
        return []
    lines = ["### The speech model's shapes (issue 15)", ""]
    lines.append(
        "Targets: the fused call (zero keys + per-position theta; no rotary in "
        "cross-attention, as in the model) ÷ plain SDPA (neither) time "
        f"≤ {MODEL_TARGETS['fwd']} forward and ≤ {MODEL_TARGETS['fwd+bwd']} fwd+bwd at every "
        f"model shape; per-call overhead (B1 H1 L1 D16) ≤ {OVERHEAD_TARGETS_S['fwd'] * 1e6:.0f} "
        f"us forward, ≤ {OVERHEAD_TARGETS_S['fwd+bwd'] * 1e6:.0f} us fwd+bwd; head dims 24, "
        f"40, 80, 96 as fast per FLOP as {HEAD_DIM_REFERENCE}. Ratios are of median times "
        "measured side by side in this run (÷ sdpa: lower is faster); the fastest-calls "
        "column compares the least disturbed calls instead. Decode steps run without "
        "gradients in the model; their fwd+bwd rows are for completeness.")
    lines.append("")
    names = list(dict.fromkeys(r.provider for r in att))
    ran = [n for n in names if any(r.provider == n and r.status == "ok" for r in att)]
    fused_names = [f"zeromask[{b}]" for b in fused_backends(device)]
    fused_name = next((n for n in fused_names if n in ran), None)
    others = [n for n in ran if n != BASELINE["attention"] and n != fused_name]
    fname = fused_name or "fused"
    head = (["call", "shape", "mode", fname, "sdpa", f"{fname} ÷ sdpa",
             f"{fname} ÷ sdpa, fastest calls"] + [f"{n} ÷ sdpa" for n in others]
            + ["verdict"])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|---|---|" + "---:|" * (len(head) - 4) + "---|")
    keys = list(dict.fromkeys(cell_key(r) for r in att if r.tag != "head-dim"))
    counts: Dict[str, List[int]] = {m: [0, 0] for m in MODES}
    for key in keys:
        some = next(r for r in att if cell_key(r) == key)
        fused = _fused(att, device, key)
        sd = _row(att, "sdpa", key)
        cells = [some.tag or "", some.shape(), some.mode, _fmt_time(fused.median_s if fused
                                                                    else None),
                 _fmt_time(sd.median_s if sd else None),
                 _fmt_ratio(fused.median_s / sd.median_s if (fused and sd) else None),
                 _fmt_ratio(fused.min_s / sd.min_s if (fused and sd and fused.min_s
                                                       and sd.min_s) else None)]
        for n in others:
            o = _row(att, n, key)
            cells.append(_fmt_ratio(o.median_s / sd.median_s if (o and sd) else None))
        verdict = model_verdict(fused, sd)
        if verdict.startswith(("meets", "misses")):
            counts[some.mode][1] += 1
            counts[some.mode][0] += verdict.startswith("meets")
        cells.append(verdict)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    summary = [f"{m}: {c[0]} of {c[1]}" for m, c in counts.items() if c[1]]
    if summary:
        lines.append("Shapes meeting their target: " + ", ".join(summary) + ".")
        lines.append("")
    lines += head_dim_table(att, device, ceiling)
    return lines


def head_dim_table(att: List[Row], device: str, ceiling: Optional[dict] = None) -> List[str]:
    """Fused and SDPA FLOP rates at the head-dim shape (B16 H4 L128), each ÷ its D=64 rate."""
    sel = [r for r in att if r.tag in ("encoder", "head-dim") and r.length == 128
           and r.lk == 128 and not r.causal and r.batch == 16 and r.heads == 4]
    if not any(r.tag == "head-dim" for r in sel):
        return []
    peak = ceiling["flop_per_s"] if ceiling else None
    lines = [f"Head dims at B16 H4 L128 (encoder self-attention), per FLOP: each FLOP rate "
             f"÷ the same provider's rate at D={HEAD_DIM_REFERENCE} (target for the fused "
             "kernel: ≥ 1.00, as fast per FLOP)"
             + (f"; the compute ceiling is {peak / 1e9:.3g} GFLOP/s" if peak else "") + ".",
             "",
             "| mode | D | fused ms | fused GFLOP/s | fused rate ÷ D=64's | sdpa ms | sdpa "
             "GFLOP/s | sdpa rate ÷ D=64's | fused ÷ sdpa | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for mode in MODES:
        ms = sorted({cell_key(r) for r in sel if r.mode == mode}, key=lambda k: k[8])
        if not ms:
            continue
        ref = next((k for k in ms if k[8] == HEAD_DIM_REFERENCE), None)
        f64 = _fused(sel, device, ref) if ref else None
        s64 = _row(sel, "sdpa", ref) if ref else None
        for key in ms:
            fu, sd = _fused(sel, device, key), _row(sel, "sdpa", key)
            fr = fu.flop_per_s / f64.flop_per_s if (fu and f64) else None
            sr = sd.flop_per_s / s64.flop_per_s if (sd and s64) else None
            if key[8] == HEAD_DIM_REFERENCE:
                verdict = "the reference"
            elif fr is None:
                verdict = "not measured"
            else:
                verdict = f"{'meets' if fr >= 1.0 else 'misses'}: {fr:.2f}"
            lines.append(
                f"| {mode} | {key[8]} | {_fmt_ms(fu.median_s if fu else None)} | "
                f"{_fmt_rate(fu.flop_per_s if fu else None, 1e9)} | {_fmt_ratio(fr)} | "
                f"{_fmt_ms(sd.median_s if sd else None)} | "
                f"{_fmt_rate(sd.flop_per_s if sd else None, 1e9)} | {_fmt_ratio(sr)} | "
                f"{_fmt_ratio(fu.median_s / sd.median_s if (fu and sd) else None)} | {verdict} |")
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------
# against the committed results
# --------------------------------------------------------------------------------------
def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def compare_committed(rows: List[Row], meta: dict, stem: str,
                      results: Optional[Path] = None) -> List[dict]:
    """For every committed run of the same suite (``benchmarks/results/*/<stem>.json``):
    this run's median ÷ the committed median for each row both measured, summarised."""
    results = results_dir() if results is None else Path(results)
    out = []
    for path in sorted(results.glob(f"*/{stem}.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        m = data.get("meta", {})
        if m.get("suite") != meta["suite"]:
            continue
        theirs = {(r.get("provider"),) + cell_key(r): r for r in data.get("rows", [])
                  if r.get("status") == "ok" and r.get("median_s")}
        by: Dict[str, List[float]] = {}
        for r in rows:
            t = theirs.get((r.provider,) + cell_key(r))
            if r.status == "ok" and r.median_s and t:
                by.setdefault(r.provider, []).append(r.median_s / t["median_s"])
        if not by:
            continue
        every = [x for v in by.values() for x in v]
        root = results.parent.parent
        try:
            shown = path.relative_to(root).as_posix()
        except ValueError:
            shown = str(path)
        out.append({"path": shown, "device_name": m.get("device_name"),
                    "cpu": m.get("cpu_description"), "threads": m.get("threads"),
                    "commit": m.get("commit"), "date": m.get("date"), "rows": len(every),
                    "geomean": _geomean(every), "min": min(every), "max": max(every),
                    "by_provider": {p: _geomean(v) for p, v in by.items()}})
    return out


def comparison_lines(comparisons: List[dict], meta: dict) -> List[str]:
    """One sentence per committed run: how far this run's times are from it."""
    lines = []
    for c in comparisons:
        same_cpu = c["cpu"] is not None and c["cpu"] == meta.get("cpu_description")
        where = c["cpu"] or f"{c['device_name']} (family/model not recorded)"
        by = ", ".join(f"{p} {_fmt_ratio(v)}" for p, v in c["by_provider"].items())
        lines.append(
            f"- vs `{c['path']}` ({where}; commit `{(c['commit'] or '?')[:12]}`, {c['date']}): "
            f"{c['rows']} rows in both; this run's median ÷ the committed median, geometric "
            f"mean {_fmt_ratio(c['geomean'])} ({_fmt_ratio(c['min'])} to "
            f"{_fmt_ratio(c['max'])}); by provider: {by}"
            + ("" if same_cpu else ". Another CPU or thread count: the ratios say how "
               "the machines differ as much as how the code does"))
    return lines


def markdown(meta: dict, rows: List[Row], provider_info: Dict[str, Dict[str, str]]) -> str:
    cfg = meta["config"]
    device = cfg["device"]
    big = device == "cuda"
    model = is_model_suite(meta)
    rate_unit, rate_name = (1e12, "TFLOP/s") if big else (1e9, "GFLOP/s")
    bw_unit, bw_name = 1e9, "GB/s"
    out: List[str] = []
    out.append(f"## zeromask benchmarks: suite `{cfg['suite']}` on {meta['device_name']}")
    out.append("")
    v = meta["versions"]
    backends = ", ".join(f"{k} " + ("available" if r is None else f"unavailable ({r})")
                         for k, r in meta["backends"].items())
    out += [
        "| | |", "|---|---|",
        f"| device | {meta['device_name']} |",
    ] + ([f"| cpu | {meta['cpu_description']} |"] if meta.get("cpu_description") else []) + [
        f"| versions | torch {v['torch']}, triton {v['triton']}, python {v['python']}, "
        f"zeromask {v['zeromask']}" + (f", CUDA {v['cuda']}" if v.get("cuda") else "") + " |",
        f"| commit | `{meta['commit']}` |",
        f"| date | {meta['date']} |",
        f"| zeromask backends | {backends} |",
        (f"| shapes | the speech model's attention calls (the table below), "
         f"{', '.join(cfg['dtypes'])}, " if model else
         f"| shapes | B={cfg['batch']} H={cfg['heads']}, L in {cfg['lengths']}, D in "
         f"{cfg['head_dims']}, {', '.join(cfg['dtypes'])}, "
         f"{'causal' if cfg['causal'] else 'non-causal'}, ")
        + f"{int(cfg['zero_frac'] * 100)}% zero "
        f"keys (speech-like silences), zero_scale {cfg['zero_scale']:g}, zeromask/naive "
        f"zero_mode={cfg['zero_mode']!r}; theta per position from a synthetic speech F0 "
        f"contour through F0Rotary('echo')"
        + ("; causal is bottom-right aligned (a decode step's query is the last position), "
           "the queries' rotary positions start at Lk - Lq" if model else "") + " |",
        f"| time | median of >= {meta['min_reps']} calls after a warm-up call "
        f"(compilation excluded); the providers of a shape are timed interleaved, one call "
        f"each per round, so outside load hits them alike; "
        + ("CUDA events" if big else f"wall clock, torch.set_num_threads({meta['threads']})")
        + "; fwd+bwd = forward + autograd.grad to q, k, v (to x for rotary) |",
        f"| {rate_name} | attention: nominal 4·B·H·Lq·Lk·D per forward (halved when causal "
        "with Lq = Lk; a causal Lq < Lk counts the visible pairs); "
        "backward counted as 2.5x forward, so fwd+bwd = 3.5x forward; the same count for "
        "every provider |",
        f"| {bw_name} | rotary: nominal bytes, x read + y written (forward), + dy read + dx "
        "written (fwd+bwd) |",
        f"| peak MiB | {MEMORY_METHOD[device]} |",
        "| min ms | the fastest timed call: on a busy machine, the least disturbed one |",
        "| IQR | spread of the timed calls: interquartile range ÷ median (large = noisy) |",
        "| ÷ base | median time ÷ the baseline's median time for the same shape in this run "
        "(baseline: `sdpa` for attention, `rope-table` for rotary); lower is faster |",
        "| max err | max abs difference of the forward output from the float64 "
        "zeromask.reference with the provider's own semantics; checked where that reference "
        "is small enough (B·H·Lq·Lk ≤ 2^23 on CPU, 2^27 on GPU), else 'not checked' |",
    ]
    load = meta.get("loadavg_1min") or [None, None]
    if device == "cpu" and None not in load:
        busy = max(load) > 0.5 * (meta.get("cpu_cores") or 1)
        out.append(f"| machine load | 1-min load average {load[0]} at the start, {load[1]} at "
                   f"the end, on {meta.get('cpu_cores')} cores"
                   + ("; other processes were running, so expect noisy times. With more "
                      "than one thread, every parallel op can wait for a descheduled "
                      "thread, so providers made of many small ops (a separate PyTorch "
                      "rotary, the reference) suffer most; `--threads 1` avoids that"
                      if busy and meta.get("threads", 1) > 1 else
                      "; other processes were running, so expect noisy times" if busy else "")
                   + " |")
    ceiling = meta.get("compute_ceiling")
    if ceiling:
        out.append(f"| compute ceiling | {ceiling['what']}: "
                   f"{ceiling['flop_per_s'] / rate_unit:.3g} {rate_name}, the fastest of {ceiling['reps']} register-only FMA loops "
                   "(benchmarks/fma_peak.cpp) at the start and the end of the run |")
    elif meta.get("compute_ceiling_unavailable"):
        out.append(f"| compute ceiling | not measured: {meta['compute_ceiling_unavailable']} |")
    if meta.get("note"):
        out.append(f"| note | {meta['note']} |")
    out.append("")
    if model:
        out += model_section(rows, device, meta.get("compute_ceiling"))
    elif "attention" in cfg["ops"]:
        out += section6(rows, device, meta.get("compute_ceiling"))
    if meta.get("committed"):
        out += ["### Against the committed results", "",
                "This run's times against the runs of the same suite committed under "
                "`benchmarks/results/`, row by row (same provider and shape):", ""]
        out += comparison_lines(meta["committed"], meta) + [""]
    out.append("### Providers")
    out.append("")
    for op, info in provider_info.items():
        for name, sem in info.items():
            out.append(f"- {op} `{name}`: {sem}")
    out.append("")
    reasons: Dict[str, int] = {}
    for op in cfg["ops"]:
        op_rows = [r for r in rows if r.op == op]
        groups: Dict[tuple, List[Row]] = {}
        for r in op_rows:
            gkey = (r.mode, r.tag) if model else (r.mode, r.dtype, r.head_dim)
            groups.setdefault(gkey, []).append(r)
        for gkey, grp in groups.items():
            if model:
                mode, tag = gkey
                out.append(f"### {op}, {mode}, {tag or 'other'}, {grp[0].dtype}")
            else:
                mode, dtype, d = gkey
                out.append(f"### {op}, {mode}, D={d}, {dtype}")
            out.append("")
            rate = (rate_name, rate_unit) if op == "attention" else (bw_name, bw_unit)
            first = "shape" if model else "L"
            out.append(f"| {first} | provider | median ms | min ms | IQR | {rate[0]} | peak MiB "
                       "| ÷ base | max err |")
            out.append(("|---|" if model else "|---:|")
                       + "---|---:|---:|---:|---:|---:|---:|---|")
            for r in grp:
                where = r.shape() if model else r.length
                if r.status != "ok":
                    key = f"{r.provider}: {r.reason}"
                    if key not in reasons:
                        reasons[key] = len(reasons) + 1
                    out.append(f"| {where} | {r.provider} | unavailable [{reasons[key]}] "
                               f"| — | — | — | — | — | — |")
                    continue
                ratev = r.flop_per_s if op == "attention" else r.bytes_per_s
                out.append(f"| {where} | {r.provider} | {_fmt_ms(r.median_s)} | "
                           f"{_fmt_ms(r.min_s)} | {_fmt_spread(r)} | "
                           f"{_fmt_rate(ratev, rate[1])} | {_fmt_mib(r.peak_bytes)} | "
                           f"{_fmt_ratio(r.ratio)} | {_fmt_err(r)} |")
            out.append("")
    if reasons:
        out.append("Unavailable:")
        out.append("")
        for text, i in reasons.items():
            out.append(f"- [{i}] {text}")
        out.append("")
    return "\n".join(out)


def write_json(path: Path, meta: dict, info: dict, rows: List[Row]) -> None:
    """The raw numbers: meta and providers indented, one row per line, call times to 4
    significant digits (the rest is noise)."""
    def row(r: Row) -> str:
        d = asdict(r)
        d["times_s"] = [float(f"{t:.4g}") for t in r.times_s]
        return json.dumps(d)
    text = ('{\n"meta": ' + json.dumps(meta, indent=1) + ',\n"providers": '
            + json.dumps(info, indent=1) + ',\n"rows": [\n'
            + ",\n".join(row(r) for r in rows) + "\n]\n}\n")
    path.write_text(text)


def pivot(rows: List[Row], op: str, mode: str, head_dim: int, dtype: str) -> List[str]:
    """A compact table: one line per provider, one column per L, cells "ms (÷ base)"."""
    sel = [r for r in rows if r.op == op and r.mode == mode and r.head_dim == head_dim
           and r.dtype == dtype]
    if not sel:
        return []
    lengths = sorted({r.length for r in sel})
    lines = [f"| {op} {mode}, D={head_dim}, {dtype}: ms (÷ {BASELINE[op]}) | "
             + " | ".join(f"L={n}" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name in dict.fromkeys(r.provider for r in sel):
        cells = []
        for n in lengths:
            r = next((r for r in sel if r.provider == name and r.length == n), None)
            if r is None:
                cells.append("")
            elif r.status != "ok":
                cells.append("unavailable")
            else:
                cells.append(f"{_fmt_ms(r.median_s)} ({_fmt_ratio(r.ratio)})")
        if all(c == "unavailable" for c in cells):
            reason = next(r.reason for r in sel if r.provider == name)
            cells = [f"unavailable: {reason}"] + [""] * (len(cells) - 1)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def readme_block(meta: dict, rows: List[Row], out_dir: Path, readme: Path, stem: str) -> str:
    """The summary a README shows for this run: where and when, the target check (section
    6, or the model suite's tables), the attention times at the section-6 head dim, the
    attention plots, links to the rest."""
    rel = Path(os.path.relpath(Path(out_dir).resolve(), Path(readme).resolve().parent)).as_posix()
    rel = "" if rel == "." else rel + "/"
    v = meta["versions"]
    cfg = meta["config"]
    command = f"python benchmarks/bench.py --suite {cfg['suite']}"
    if meta.get("command"):  # the command that ran, less the options that only annotate
        words, keep, skip = shlex.split(meta["command"]), [], False
        for word in words:
            if skip:
                skip = False
                if not word.startswith("--"):
                    continue
            if word in ("--note", "--update-readme", "--out"):
                skip = True
                continue
            keep.append(word)
        command = " ".join(keep)
    lines = [f"`{command}` on {meta.get('cpu_description') or meta['device_name']}: torch "
             f"{v['torch']}, triton {v['triton']}, commit `{meta['commit']}`, {meta['date']}. "
             f"Full table with FLOP/s, peak memory, IQR and accuracy: "
             f"[{stem}.md]({rel}{stem}.md); raw numbers: [{stem}.json]({rel}{stem}.json).",
             ""]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    if is_model_suite(meta):
        lines += model_section(rows, cfg["device"], meta.get("compute_ceiling"))
        for what in ("ratio", "time"):
            name = f"{stem}_attention_{what}.png"
            if (Path(out_dir) / name).is_file():
                lines += [f"![attention {what}]({rel}{name})", ""]
    elif "attention" in cfg["ops"]:
        lines += section6(rows, cfg["device"], meta.get("compute_ceiling"))
        d = SECTION6_CPU["head_dim"]
        if d not in cfg["head_dims"]:
            d = cfg["head_dims"][0]
        dtype = SHORT_DTYPE[DTYPES[cfg["dtypes"][0]]]
        for mode in cfg["modes"]:
            lines += pivot(rows, "attention", mode, d, dtype) + [""]
        for what in ("time", "memory"):
            name = f"{stem}_attention_{what}.png"
            if (Path(out_dir) / name).is_file():
                lines += [f"![attention {what}]({rel}{name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, key: str, block: str) -> None:
    """Replace the text between ``<!-- benchmarks:KEY -->`` and its closing marker
    (appending both at the end the first time)."""
    start, end = f"<!-- {MARKER}:{key} -->", f"<!-- /{MARKER}:{key} -->"
    readme = Path(readme)
    text = readme.read_text() if readme.is_file() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = f"{head}{start}\n{block}{end}{tail}"
    else:
        text = text.rstrip() + f"\n\n{start}\n{block}{end}\n"
    readme.write_text(text)


def plot(rows: List[Row], op: str, what: str, path: Path, title: str) -> Optional[Path]:
    """``what`` = "time" or "memory": one panel per (mode, D, dtype), one line per provider."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    op_rows = [r for r in rows if r.op == op]
    if not op_rows:
        return None
    modes = [m for m in MODES if any(r.mode == m for r in op_rows)]
    cols = sorted({(r.head_dim, r.dtype) for r in op_rows})
    names = list(dict.fromkeys(r.provider for r in op_rows))
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(modes), len(cols), figsize=(5.6 * len(cols), 4.0 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, (d, dtype) in enumerate(cols):
            ax = axes[i][j]
            missing = []
            for n in names:
                pts = sorted((r.length, r.median_s * 1e3 if what == "time" else
                              (r.peak_bytes or 0) / 2**20)
                             for r in op_rows if r.provider == n and r.mode == mode
                             and r.head_dim == d and r.dtype == dtype and r.status == "ok"
                             and (what == "time" or r.peak_bytes is not None))
                if not pts:
                    missing.append(n)
                    continue
                style = "--" if n == BASELINE[op] else "-"
                ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], style, marker="o",
                        color=colors[n], label=n, linewidth=2 if n.startswith("zeromask") else 1.3)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ls = sorted({r.length for r in op_rows})
            ax.set_xticks(ls)
            ax.set_xticklabels([str(v) for v in ls], fontsize=8)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("sequence length L")
            ax.set_ylabel("median time (ms)" if what == "time" else "peak memory (MiB)")
            ax.set_title(f"{op} {mode}, D={d}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            if missing:
                ax.text(0.98, 0.02, "unavailable:\n" + "\n".join(missing),
                        transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                        color="0.35")
            if ax.lines:  # lines rise to the right: the upper left corner is free
                ax.legend(fontsize=7, loc="upper left")
    import textwrap
    fig.suptitle("\n".join(textwrap.wrap(title, 70 * len(cols))), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_model(rows: List[Row], what: str, path: Path, title: str) -> Optional[Path]:
    """The model suite: one panel per mode, one group of bars per shape, one bar per
    provider; ``what`` = "time" (median ms) or "ratio" (÷ plain SDPA, with the target)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import textwrap

    att = [r for r in rows if r.op == "attention"]
    if not att:
        return None
    modes = [m for m in MODES if any(r.mode == m for r in att)]
    names = [n for n in dict.fromkeys(r.provider for r in att)
             if any(r.provider == n and r.status == "ok" for r in att)
             and not (what == "ratio" and n == BASELINE["attention"])]
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(dict.fromkeys(r.provider for r in att))}
    fig, axes = plt.subplots(len(modes), 1, figsize=(13, 4.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        ax = axes[i][0]
        keys = list(dict.fromkeys(cell_key(r) for r in att if r.mode == mode))
        labels = []
        for key in keys:
            r0 = next(r for r in att if cell_key(r) == key)
            ls = f"L{r0.length}" if r0.length == r0.lk else f"Lq{r0.length} Lk{r0.lk}"
            bh = "" if (r0.batch, r0.heads) == (16, 4) else f"B{r0.batch} H{r0.heads} "
            labels.append(f"{r0.tag}\n{bh}{ls}\nD{r0.head_dim}")
        width = 0.8 / max(len(names), 1)
        for j, n in enumerate(names):
            xs, ys = [], []
            for x, key in enumerate(keys):
                r = _row(att, n, key)
                if r is None:
                    continue
                if what == "time":
                    ys.append(r.median_s * 1e3)
                elif r.ratio:
                    ys.append(r.ratio)
                else:
                    continue
                xs.append(x - 0.4 + width * (j + 0.5))
            ax.bar(xs, ys, width, label=n, color=colors[n])
        if what == "ratio":
            ax.axhline(1.0, color="0.3", linewidth=1, linestyle="--")
            ax.axhline(MODEL_TARGETS[mode], color="tab:red", linewidth=1, linestyle=":",
                       label=f"target ≤ {MODEL_TARGETS[mode]} (fused)")
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 6)  # headroom for the legend above the bars
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("median time (ms)" if what == "time" else "time ÷ plain SDPA")
        ax.set_title(f"attention {mode}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=3)
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
