"""Shared harness of the pytest-benchmark suites (see README.md in this folder).

The suites reuse the providers, shapes and inputs of the benchmark command
(``bench.py``: :mod:`runner` and the op files ``bench_attention.py``, ``bench_rotary.py``);
the shape set comes from environment variables: ``ZEROMASK_BENCH_SUITE`` (cpu-quick | cpu |
gpu | model; default gpu with CUDA, else cpu), ``ZEROMASK_BENCH_FULL=1``,
``ZEROMASK_BENCH_LENGTHS=256,512``, ``ZEROMASK_BENCH_HEAD_DIMS=64``,
``ZEROMASK_BENCH_SHAPES=encoder,decode`` (model suite).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runner as zb  # noqa: E402

CONFIG = zb.suite_from_env()
if not torch.cuda.is_available():
    torch.set_num_threads(CONFIG.threads or zb.usable_cores())
_MEM_BUDGET = zb.memory_budget(CONFIG.device, None)
_inputs = {}


def cases(op):
    """(workload, provider) pairs of the suite for ``op``, providers varying fastest."""
    out = []
    for w in CONFIG.workloads(op):
        for p in zb.select_providers(zb.providers(op, CONFIG.zero_mode), CONFIG.providers):
            out.append(pytest.param(w, p, id=f"{w}-{p.name}"))
    return out


def run_benchmark(benchmark, w, provider):
    """Warm up (compile) outside the timing, then time one call per round; a provider that
    cannot run here is skipped with its reason (``pytest -rs`` lists them)."""
    if _inputs.get("w") != w:
        _inputs.clear()
        _inputs.update(w=w, x=zb.make_inputs(w))
    x = _inputs["x"]
    try:
        step, out, first = zb.prepare(provider, w, x, _MEM_BUDGET)
    except zb.Unavailable as exc:
        pytest.skip(f"{provider.name} unavailable: {exc}")
    del out
    benchmark.group = (f"{w.op} {w.mode} {w.tag} {w.shape()}" if w.tag
                       else f"{w.group} L={w.length}")
    benchmark.extra_info.update(provider=provider.name, op=w.op, mode=w.mode,
                                length=w.length, length_k=w.lk, head_dim=w.head_dim,
                                first_call_s=first)
    device = w.device

    def timed():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    rounds = max(3, min(30, int(0.5 / max(first, 1e-4))))
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
        return
    median = benchmark.stats.stats.median
    if w.flops():
        benchmark.extra_info["flop_per_s"] = w.flops() / median
    if w.nominal_bytes():
        benchmark.extra_info["bytes_per_s"] = w.nominal_bytes() / median
