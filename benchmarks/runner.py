"""The shared runner of the benchmarks: workloads, inputs, timing, memory, the error check
against the float64 reference, the suites, and the facts about the machine.

The ops' providers live in one file per op (``bench_attention.py``, ``bench_rotary.py``),
the tables and plots in ``report.py``, the command in ``bench.py``; the pytest-benchmark
suites (``test_bench_*.py`` through ``harness.py``) use the same pieces. None of this is
installed with the package: run it from a source checkout (``python benchmarks/bench.py``).
"""
from __future__ import annotations

import contextlib
import fnmatch
import importlib
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import zeromask
from zeromask import reference
from zeromask.modules import F0Rotary

HERE = Path(__file__).resolve().parent
MODES = ("fwd", "fwd+bwd")
OPS = ("attention", "rotary")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

#: The attention calls of the reference speech model (zeromask.models.SpeechModel at the
#: demo's config: d_model 96, 4 heads of 24; batch 16), issue 15. ``tag`` names the call.
#: Self-attention has zero keys and per-position theta on both sides; cross-attention zero
#: keys and no rotary (the model has none there); a decode step is one query at the last
#: position (causal, bottom-right aligned) against a KV cache of ``length_k``, of unrotated
#: keys (the kernel rotates every cached key each step) or, ``keys_rotated``, of keys
#: rotated once as they were appended (only the query is rotated: the model's decoder).
MODEL_SHAPES: List[dict] = (
    [dict(tag="overhead", batch=1, heads=1, length=1, head_dim=16)]
    + [dict(tag="encoder", batch=16, heads=4, length=n, head_dim=24) for n in (32, 128, 400)]
    + [dict(tag="decoder", batch=16, heads=4, length=n, head_dim=24, causal=True)
       for n in (20, 60)]
    + [dict(tag="cross", batch=16, heads=4, length=40, length_k=200, head_dim=24,
            rotary=False)]
    + [dict(tag="decode", batch=16, heads=4, length=1, length_k=n, head_dim=24, causal=True)
       for n in (16, 64, 128)]
    + [dict(tag="decode", batch=16, heads=4, length=1, length_k=n, head_dim=24, causal=True,
            keys_rotated=True) for n in (16, 64, 128)]
    # head dims that are not multiples of 16, against 64, at one encoder shape (D=24 is the
    # encoder row above)
    + [dict(tag="head-dim", batch=16, heads=4, length=128, head_dim=d) for d in (40, 64, 80, 96)]
)
MODEL_TAGS = tuple(dict.fromkeys(s["tag"] for s in MODEL_SHAPES))
#: issue 15's targets at the model's shapes (CPU, ratios of one run)
MODEL_TARGETS = {"fwd": 0.9, "fwd+bwd": 1.0}          # fused ÷ plain SDPA time, at most
OVERHEAD_TARGETS_S = {"fwd": 25e-6, "fwd+bwd": 120e-6}  # B1 H1 L1 D16 fused time, at most
HEAD_DIM_REFERENCE = 64                                 # "as fast per FLOP as D = 64"

#: The suites. ``full_lengths`` replace ``lengths`` with ``--full``. A suite with
#: ``shapes`` has those fixed shapes instead of the lengths x head dims grid; ``threads``,
#: ``providers`` and ``time_budget`` are its defaults for the options of those names.
SUITES: Dict[str, dict] = {
    "cpu-quick": dict(device="cpu", batch=1, heads=8, lengths=[256, 512], head_dims=[64],
                      dtypes=["float32"]),
    "cpu": dict(device="cpu", batch=1, heads=8, lengths=[256, 512, 1024, 2048],
                full_lengths=[256, 512, 1024, 2048, 4096], head_dims=[64, 128],
                dtypes=["float32"]),
    "gpu": dict(device="cuda", batch=2, heads=16, lengths=[1024, 2048, 4096, 8192, 16384],
                head_dims=[64, 128], dtypes=["bfloat16"], full_dtypes=["bfloat16", "float16"]),
    # flex+rope is left out by default: torch.compile once per shape costs minutes here,
    # and it has no CPU backward (--providers flex+rope adds it)
    "model": dict(device="cpu", batch=16, heads=4, lengths=[], head_dims=[],
                  dtypes=["float32"], ops=["attention"], shapes=MODEL_SHAPES, threads=1,
                  providers=["zeromask", "sdpa", "sdpa+bias+rope", "naive"], time_budget=1.0),
}

#: docs/design.md section 6, CPU: this shape, fused within 1.25x SDPA, >= 3x naive and flex.
SECTION6_CPU = dict(batch=1, heads=8, length=2048, head_dim=64, dtype=torch.float32)
SECTION6_GPU_FWD, SECTION6_GPU_FWDBWD, SECTION6_GPU_FLEX = 0.9, 0.8, 1.3


class Unavailable(Exception):
    """A provider cannot run this workload here; the message is the reason."""


# --------------------------------------------------------------------------------------
# workloads and inputs
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    op: str                 # "attention" | "rotary"
    mode: str               # "fwd" | "fwd+bwd"
    device: str
    dtype: torch.dtype
    batch: int
    heads: int
    length: int             # queries (Lq); the keys too unless length_k is set
    head_dim: int
    causal: bool = False    # bottom-right aligned: query i sees keys j <= i + Lk - Lq
    zero_frac: float = 0.2
    zero_scale: float = 1e-6
    zero_mode: str = "prob"
    length_k: Optional[int] = None   # keys (Lk); None: Lk = Lq
    rotary: bool = True     # attention: per-position theta on q and k (False: no rotary)
    tag: str = ""           # the model call this shape stands for (model suite)
    keys_rotated: bool = False  # the keys come rotated (a cache of rotated keys): q only

    @property
    def lq(self) -> int:
        return self.length

    @property
    def lk(self) -> int:
        return self.length if self.length_k is None else self.length_k

    def shape(self) -> str:
        """``B16 H4 L128 D24`` or ``B16 H4 Lq1 Lk64 D24``, + ``causal``/``no rotary``/``keys
        rotated``."""
        ls = f"L{self.lq}" if self.lq == self.lk else f"Lq{self.lq} Lk{self.lk}"
        return (f"B{self.batch} H{self.heads} {ls} D{self.head_dim}"
                + (" causal" if self.causal else "")
                + (" no rotary" if self.op == "attention" and not self.rotary else "")
                + (" keys rotated" if self.op == "attention" and self.rotary
                   and self.keys_rotated else ""))

    @property
    def group(self) -> str:
        return (f"{self.op} {self.mode} D={self.head_dim} {SHORT_DTYPE[self.dtype]}"
                + (" causal" if self.causal else ""))

    def __str__(self) -> str:
        ls = f"L{self.lq}" if self.lq == self.lk else f"Lq{self.lq}Lk{self.lk}"
        return (f"{self.op}-{self.mode}-B{self.batch}H{self.heads}{ls}"
                f"D{self.head_dim}-{SHORT_DTYPE[self.dtype]}" + ("-causal" if self.causal else "")
                + ("-norope" if self.op == "attention" and not self.rotary else "")
                + ("-krot" if self.op == "attention" and self.rotary and self.keys_rotated
                   else ""))

    def score_pairs(self) -> float:
        """(query, key) pairs attention computes: Lq x Lk, halved when causal with Lq = Lk
        (the convention of flash-attention's benchmarks), counted exactly for a causal
        Lq != Lk (a decode step's one query sees every key)."""
        lq, lk = self.lq, self.lk
        if not self.causal:
            return float(lq * lk)
        if lq == lk:
            return lq * lk / 2
        return float(sum(min(lk, max(0, i + lk - lq + 1)) for i in range(lq)))

    def flops(self) -> Optional[float]:
        """Nominal FLOPs: 4*B*H*D per (query, key) pair forward (4*B*H*L*L*D, halved when
        causal); fwd+bwd = 3.5x forward (the backward counts 2.5x the forward, as in
        flash-attention's benchmarks)."""
        if self.op != "attention":
            return None
        f = 4.0 * self.batch * self.heads * self.score_pairs() * self.head_dim
        return f if self.mode == "fwd" else 3.5 * f

    def nominal_bytes(self) -> Optional[float]:
        """Rotary traffic: read x + write y forward; + read dy + write dx backward."""
        if self.op != "rotary":
            return None
        n = self.batch * self.heads * self.length * self.head_dim
        size = torch.empty((), dtype=self.dtype).element_size()
        return (2 if self.mode == "fwd" else 4) * n * size


def speech_like_zero(batch: int, length: int, frac: float, device="cpu") -> torch.Tensor:
    """(B, L) bool: ``frac`` of the frames are silence, where speech has it: a leading and a
    trailing silence and one pause between phrases (each utterance a little different)."""
    out = torch.zeros(batch, length, dtype=torch.bool)
    n_zero = int(round(frac * length))
    for b in range(batch):
        lead = int(round(n_zero * (0.40 + 0.05 * (b % 3))))
        tail = int(round(n_zero * 0.35))
        pause = max(n_zero - lead - tail, 0)
        out[b, :lead] = True
        if tail:
            out[b, length - tail:] = True
        start = lead + (length - lead - tail - pause) * (2 + b % 3) // 6
        out[b, start:start + pause] = True
    return out.to(device)


def speech_like_f0(batch: int, length: int, silent: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B, L) F0 contour in Hz, 0 = unvoiced: a speaker's base pitch (100-220 Hz), phrase
    declination, syllable-rate intonation (about 4 per second at a 10 ms hop), jitter, and
    unvoiced frames in the silences plus short unvoiced consonants."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32) / 100.0  # seconds at a 10 ms hop
    f0 = torch.empty(batch, length)
    for b in range(batch):
        base = 100.0 + 120.0 * torch.rand((), generator=g)
        decl = 1.0 - 0.15 * t / max(float(t[-1]), 1e-3)
        phase = 2 * math.pi * torch.rand((), generator=g)
        syll = 1.0 + 0.12 * torch.sin(2 * math.pi * 4.0 * t + phase)
        jitter = 1.0 + 0.01 * torch.randn(length, generator=g)
        f0[b] = base * decl * syll * jitter
    consonant = torch.rand(batch, length, generator=g) < 0.08
    unvoiced = silent.cpu() | consonant
    return torch.where(unvoiced, torch.zeros_like(f0), f0)


@dataclass
class Inputs:
    q: torch.Tensor         # (B, H, Lq, D)
    k: torch.Tensor         # (B, H, Lk, D)
    v: torch.Tensor
    key_zero: torch.Tensor  # (B, Lk) bool
    theta: torch.Tensor     # (B, Lk) float32 (keys; the rotary op's x is q with Lq = Lk)
    grad_out: torch.Tensor  # like q
    theta_q: Optional[torch.Tensor] = None  # (B, Lq); None: theta (Lq = Lk)


def make_inputs(w: Workload, seed: int = 0) -> Inputs:
    """q, k, v from randn; zero keys where speech is silent; theta per position from a
    speech-like F0 contour through ``F0Rotary("echo")``. With Lq != Lk the queries of a
    causal call are the last Lq positions (their theta is the keys' there); those of a
    non-causal one have a contour of their own."""
    g = torch.Generator().manual_seed(seed)
    need_grad = w.mode != "fwd"

    def rnd(length):
        t = torch.randn((w.batch, w.heads, length, w.head_dim), generator=g)
        return t.to(device=w.device, dtype=w.dtype).requires_grad_(need_grad)

    q, k, v = rnd(w.lq), rnd(w.lk), rnd(w.lk)
    key_zero = speech_like_zero(w.batch, w.lk, w.zero_frac, w.device)
    rot = F0Rotary("echo", learnable=False)
    with torch.no_grad():
        f0 = speech_like_f0(w.batch, w.lk, key_zero, seed)
        theta = rot(f0).to(w.device).float().contiguous()
        theta_q = None
        if w.lq != w.lk:
            if w.causal:
                theta_q = theta[:, w.lk - w.lq:].contiguous()
            else:
                silent_q = speech_like_zero(w.batch, w.lq, w.zero_frac)
                f0q = speech_like_f0(w.batch, w.lq, silent_q, seed + 1)
                theta_q = rot(f0q).to(w.device).float().contiguous()
    grad_out = torch.randn((w.batch, w.heads, w.lq, w.head_dim), generator=g)
    grad_out = grad_out.to(device=w.device, dtype=w.dtype)
    return Inputs(q, k, v, key_zero, theta, grad_out, theta_q)


def thetas(w: Workload, x: Inputs) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(theta_q, theta_k) of an attention workload; (None, None) where it has no rotary,
    theta_k None where its keys come rotated."""
    if not w.rotary:
        return None, None
    return (x.theta if x.theta_q is None else x.theta_q), (None if w.keys_rotated else x.theta)


def query_offset(w: Workload) -> Optional[int]:
    """The queries' first rotary position where it is not 0: ``Lk - Lq`` when causal (as
    zeromask.zero_soft_attention places them; zeromask.reference takes it as ``pos_q``)."""
    return (w.lk - w.lq) if (w.causal and w.lq != w.lk) else None


def causal_keep(w: Workload) -> torch.Tensor:
    """(Lq, Lk) bool, True where a key is visible: bottom-right aligned causal."""
    i = torch.arange(w.lq, device=w.device).unsqueeze(1)
    j = torch.arange(w.lk, device=w.device).unsqueeze(0)
    return j <= i + (w.lk - w.lq)


def attention_reference_kwargs(zero_mode: Optional[str], rotary: bool):
    """The zeromask.reference keywords of an attention provider's semantics: zero keys in
    ``zero_mode`` (None: none), the f0 rotary where ``rotary`` and the shape has one."""
    def make(w: Workload, x: Inputs) -> dict:
        kw: dict = dict(causal=w.causal)
        if zero_mode is not None:
            kw.update(key_zero=x.key_zero, zero_scale=w.zero_scale, zero_mode=zero_mode)
        if rotary and w.rotary:
            tq, tk = thetas(w, x)
            kw.update(theta_q=tq, theta_k=tk)
            if query_offset(w) is not None:
                kw.update(pos_q=query_offset(w))
        return kw
    return make


# --------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------
@dataclass
class Provider:
    """One way of computing an op. ``build(w, x)`` returns the forward as a closure (after
    any one-time setup such as masks, tables or compilation) or raises :class:`Unavailable`;
    ``semantics`` says what it computes; ``reference_kwargs`` is the zeromask.reference
    call it must agree with (None: no check); ``ll_matrices`` estimates how many fp32
    B x H x Lq x Lk matrices it keeps alive at once (fwd, fwd+bwd), for the memory cap."""

    name: str
    op: str
    semantics: str
    build: Callable[["Workload", Inputs], Callable[[], torch.Tensor]]
    reference_kwargs: Optional[Callable[["Workload", Inputs], dict]] = None
    ll_matrices: Optional[Tuple[float, float]] = None


def require_backend(backend: str, w: Workload) -> None:
    """Raise Unavailable unless the zeromask backend can be timed for this workload."""
    if backend == "triton" and w.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        raise Unavailable("TRITON_INTERPRET=1: Triton's CPU interpreter is a correctness "
                          "tool, not a kernel to time")
    reason = zeromask.available_backends().get(backend)
    if reason is not None:
        raise Unavailable(reason)


#: the file of each op's providers (each has ``providers(zero_mode) -> List[Provider]``)
OP_MODULES = {"attention": "bench_attention", "rotary": "bench_rotary"}
BASELINE = {"attention": "sdpa", "rotary": "rope-table"}


def providers(op: str, zero_mode: str = "prob") -> List[Provider]:
    """Every provider of ``op``; ``zeromask[<b>]`` for every backend dispatch knows."""
    if op not in OP_MODULES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if str(HERE) not in sys.path:  # the op files sit beside this one
        sys.path.insert(0, str(HERE))
    return importlib.import_module(OP_MODULES[op]).providers(zero_mode)


def select_providers(all_providers: Sequence[Provider], patterns: Optional[Sequence[str]]):
    """Filter by names or globs (``zeromask`` alone means every ``zeromask[*]``); the
    baseline is always kept so ratios can be computed."""
    if not patterns:
        return list(all_providers)
    pats = []
    for p in patterns:
        pats += [s.strip() for s in p.split(",") if s.strip()]
    pats = ["zeromask[*]" if p == "zeromask" else p for p in pats]
    keep = []
    for p in all_providers:
        if p.name == BASELINE[p.op] or any(fnmatch.fnmatchcase(p.name, pat.replace("[", "[[]"))
                                           or p.name == pat for pat in pats):
            keep.append(p)
    return keep


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(w: Workload, x: Inputs, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """What one timed call does: the forward, or forward + backward to q, k, v."""
    if w.mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
        return run
    wrt = (x.q,) if w.op == "rotary" else (x.q, x.k, x.v)

    def run():
        out = forward()
        torch.autograd.grad(out, wrt, x.grad_out)
    return run


def time_once(fn: Callable[[], None], device: str) -> float:
    """Seconds one call takes: CUDA events on a GPU, the wall clock on a CPU."""
    if device == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(steps: Dict[str, Callable[[], None]], device: str, min_reps: int,
                     max_reps: int, budget_s: float) -> Dict[str, List[float]]:
    """Time every provider of one workload in rounds, one call each per round, so that load
    from elsewhere on the machine hits them alike and their ratios stay fair. A provider
    stops after ``max_reps`` calls, or once it has ``min_reps`` and the round-robin has used
    ``budget_s`` per provider."""
    times: Dict[str, List[float]] = {n: [] for n in steps}
    deadline = time.perf_counter() + budget_s * max(len(steps), 1)
    active = list(steps)
    while active:
        for n in active:
            times[n].append(time_once(steps[n], device))
        now = time.perf_counter()
        active = [n for n in active if len(times[n]) < max_reps
                  and (len(times[n]) < min_reps or now < deadline)]
    return times


def cpu_extension_flags() -> List[str]:
    """The compiler flags setup.py gives the CPU extension (csrc/cpu), so the FMA probe
    uses the vectors the kernels use (tests/test_packaging.py checks setup.py has them)."""
    arch = [] if os.environ.get("ZEROMASK_PORTABLE", "0") == "1" else ["-march=native"]
    return ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=c++20"] + arch + ["-fopenmp"]


_FMA_PROBE: dict = {}


def fma_probe():
    """``benchmarks/fma_peak.cpp`` built with torch.utils.cpp_extension.load (once per
    machine and flag set: torch caches it under its extensions folder, never in this
    tree); raises what the build raised."""
    if "module" not in _FMA_PROBE:
        from torch.utils import cpp_extension
        print("compute ceiling: loading benchmarks/fma_peak.cpp (compiled on the first run, "
              "then cached) ...", file=sys.stderr, flush=True)
        _FMA_PROBE["module"] = cpp_extension.load(
            name="zeromask_bench_fma_peak", sources=[str(HERE / "fma_peak.cpp")],
            extra_cflags=cpu_extension_flags(), extra_ldflags=["-fopenmp"], verbose=False)
    return _FMA_PROBE["module"]


def compute_ceiling(device: str, reps: int = 3, why_not: Optional[list] = None) -> Optional[dict]:
    """The device's fp32 compute peak measured in this process, or None where there is no
    way to measure it here (the reason is appended to ``why_not``).

    CPU: ``fma_peak`` of :func:`fma_probe`, a register-only loop of independent FMA chains
    in the widest vectors the CPU kernels are built for, on every torch thread: the fastest
    of ``reps`` calls. Exact attention is matrix products (4·B·H·L²·D FLOPs forward, 3.5x
    that forward and backward) plus a softmax, so no kernel built the same way runs faster
    than this, and a target that needs more cannot be met on this machine. (``torch.mm`` is
    no ceiling: on this AMD CPU its fp32 GEMM runs at under half of this peak.)
    """
    if device != "cpu":
        if why_not is not None:
            why_not.append(f"no compute ceiling is measured on {device}")
        return None
    try:
        probe = fma_probe()
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: no row
        reason = f"benchmarks/fma_peak.cpp did not build: {_first_line(exc)}"
        print(f"compute ceiling: not measured ({reason})", file=sys.stderr, flush=True)
        if why_not is not None:
            why_not.append(reason)
        return None
    iters = 20_000_000
    best = max(probe.fma_peak(iters) for _ in range(reps))
    threads = torch.get_num_threads()
    return {"what": f"fp32 FMA peak ({probe.vector_bits()}-bit vectors, {threads} "
                    f"thread{'s' if threads > 1 else ''})",
            "reps": reps, "threads": threads, "flop_per_s": best}


@contextlib.contextmanager
def _quiet_fd2():
    """Silence C-level stderr (the profiler's kineto banner) without touching Python's."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


MEMORY_METHOD = {
    "cpu": "peak bytes held by torch's CPU allocator during one call, minus what it held "
           "before (allocation events of torch.profiler(profile_memory=True)); inputs "
           "excluded; memory a kernel takes outside torch's allocator is not seen",
    "cuda": "torch.cuda.max_memory_allocated() during one call minus memory_allocated() "
            "before it; inputs excluded",
}


def peak_memory(fn: Callable[[], None], device: str) -> Optional[int]:
    """Peak extra bytes one call allocates (see :data:`MEMORY_METHOD`)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile
    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


def memory_budget(device: str, cap_gb: Optional[float]) -> int:
    if cap_gb is not None:
        return int(cap_gb * 2**30)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(0.8 * free)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(0.5 * int(info["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        return 8 * 2**30


@dataclass
class Row:
    provider: str
    op: str
    mode: str
    device: str
    dtype: str
    batch: int
    heads: int
    length: int                      # queries (Lq)
    head_dim: int
    causal: bool
    status: str = "ok"               # "ok" | "unavailable"
    reason: Optional[str] = None
    median_s: Optional[float] = None
    min_s: Optional[float] = None           # the fastest call: robust to outside load
    times_s: List[float] = field(default_factory=list)
    first_call_s: Optional[float] = None   # warm-up (includes compilation), not timed
    flops: Optional[float] = None
    flop_per_s: Optional[float] = None
    bytes: Optional[float] = None
    bytes_per_s: Optional[float] = None
    peak_bytes: Optional[int] = None
    ratio: Optional[float] = None           # median / baseline's median, same workload
    max_abs_err: Optional[float] = None     # forward vs the float64 reference
    err_tol: Optional[float] = None
    mismatch: bool = False
    length_k: Optional[int] = None          # keys (Lk); None: = length
    rotary: bool = True
    tag: str = ""
    keys_rotated: bool = False

    @property
    def lk(self) -> int:
        return self.length if self.length_k is None else self.length_k

    def shape(self) -> str:
        return Workload(self.op, self.mode, self.device, torch.float32, self.batch,
                        self.heads, self.length, self.head_dim, self.causal,
                        length_k=self.length_k, rotary=self.rotary,
                        keys_rotated=self.keys_rotated).shape()


def cell_key(r) -> tuple:
    """What identifies a shape across rows, runs and JSON files (a Row or its dict)."""
    get = r.get if isinstance(r, dict) else lambda k, d=None: getattr(r, k, d)
    lk = get("length_k")
    return (get("op"), get("mode"), get("device"), get("dtype"), get("batch"), get("heads"),
            get("length"), get("length") if lk is None else lk, get("head_dim"),
            bool(get("causal")), bool(get("rotary", True)), bool(get("keys_rotated", False)))


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else ""
    name = "" if isinstance(exc, Unavailable) else f"{type(exc).__name__}: "
    return (name + text)[:300]


def check_output(provider: Provider, w: Workload, x: Inputs, out: torch.Tensor,
                 ref_cache: dict) -> Tuple[Optional[float], Optional[float]]:
    """Max |forward - float64 reference| and the tolerance; None where too big to check."""
    if provider.reference_kwargs is None:
        return None, None
    limit = 2 ** 27 if w.device == "cuda" else 2 ** 23  # float64 Lq x Lk elements
    if w.op == "attention" and w.batch * w.heads * w.lq * w.lk > limit:
        return None, None
    kw = provider.reference_kwargs(w, x)
    key = tuple(sorted((k, id(v) if torch.is_tensor(v) else v) for k, v in kw.items()))
    if ref_cache.get("workload") != str(w):
        ref_cache.clear()
        ref_cache["workload"] = str(w)
    if key not in ref_cache:
        with torch.no_grad():
            if w.op == "attention":
                ref = reference.zero_soft_attention(x.q.double(), x.k.double(), x.v.double(),
                                                    **kw)
            else:
                ref = reference.f0_rotary(x.q.double(), x.theta.double())
        ref_cache[key] = ref
    ref = ref_cache[key]
    err = float((out.detach().double() - ref).abs().max())
    eps = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[w.dtype]
    # rotary angles pos * w are float32 in every provider: their error grows with L
    eps += 4 * max(w.lq, w.lk) * 2.0 ** -24
    tol = eps * max(1.0, float(ref.abs().max()))
    return err, tol


def prepare(provider: Provider, w: Workload, x: Inputs, mem_budget: int):
    """Build ``provider`` for ``w`` and warm it up (compiling where it compiles).

    Returns ``(step, forward_output, first_call_seconds)``, ``step`` being one timed call
    (see :func:`step_fn`); raises :class:`Unavailable` with the reason when the provider
    cannot run this workload here (a backend that is absent or refuses the call, an op
    the device lacks, an L x L reference over the memory cap, or any failure).
    """
    if provider.ll_matrices is not None:
        n = provider.ll_matrices[0 if w.mode == "fwd" else 1]
        need = n * w.batch * w.heads * w.lq * w.lk * 4
        if need > mem_budget:
            raise Unavailable(f"skipped: materialises L x L, needs ~{need / 2**30:.1f} GiB, "
                              f"more than the {mem_budget / 2**30:.1f} GiB cap (--mem-cap-gb)")
    try:
        forward = provider.build(w, x)
        step = step_fn(w, x, forward)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = forward()
        if w.mode != "fwd":
            step()
        _sync(w.device)
        return step, out, time.perf_counter() - t0
    except Unavailable:
        raise
    except (NotImplementedError, zeromask.BackendError) as exc:
        raise Unavailable(_first_line(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any failure is reported in its row, not fatal
        if "out of memory" in str(exc).lower() and w.device == "cuda":
            torch.cuda.empty_cache()
        raise Unavailable("failed: " + _first_line(exc)) from exc


def run_workload(provs: Sequence[Provider], w: Workload, x: Inputs, *, mem_budget: int,
                 min_reps: int, max_reps: int, budget_s: float,
                 ref_cache: Optional[dict] = None, measure_memory: bool = True,
                 progress: Optional[Callable[[str], None]] = None) -> List[Row]:
    """One row per provider for workload ``w``: build and warm up each (compilation is not
    timed), check its forward against the reference, time them all interleaved, then
    measure each one's peak memory."""
    rows: Dict[str, Row] = {}
    steps: Dict[str, Callable[[], None]] = {}
    where = f"{w.op} {w.mode} {w.tag + ' ' if w.tag else ''}" + (
        w.shape() if w.tag else f"L={w.length} D={w.head_dim}")
    for p in provs:
        if progress:
            progress(f"{where}: warm up {p.name}")
        row = rows[p.name] = Row(p.name, w.op, w.mode, w.device, SHORT_DTYPE[w.dtype],
                                 w.batch, w.heads, w.length, w.head_dim, w.causal,
                                 flops=w.flops(), bytes=w.nominal_bytes(),
                                 length_k=w.length_k, rotary=w.rotary, tag=w.tag,
                                 keys_rotated=w.keys_rotated)
        try:
            steps[p.name], out, row.first_call_s = prepare(p, w, x, mem_budget)
            if ref_cache is not None:
                row.max_abs_err, row.err_tol = check_output(p, w, x, out, ref_cache)
                row.mismatch = row.max_abs_err is not None and not (
                    row.max_abs_err <= row.err_tol)
            del out
        except Unavailable as exc:
            row.status, row.reason = "unavailable", str(exc)
    if progress:
        progress(f"{where}: timing")
    try:
        times = time_interleaved(steps, w.device, min_reps, max_reps, budget_s)
    except Exception:  # noqa: BLE001 - one fails only under repetition (e.g. out of memory)
        times = {}
        for n, step in steps.items():
            try:
                times[n] = time_interleaved({n: step}, w.device, min_reps, max_reps, budget_s)[n]
            except Exception as exc:  # noqa: BLE001
                rows[n].status, rows[n].reason = "unavailable", "failed: " + _first_line(exc)
                if w.device == "cuda":
                    torch.cuda.empty_cache()
    for n, t in times.items():
        rows[n].times_s = t
        rows[n].median_s = statistics.median(t)
        rows[n].min_s = min(t)
    if measure_memory:
        for n, step in steps.items():
            if rows[n].status != "ok":
                continue
            if progress:
                progress(f"{where}: memory {n}")
            try:
                rows[n].peak_bytes = peak_memory(step, w.device)
            except Exception as exc:  # noqa: BLE001 - the timing stands; memory reads "—"
                rows[n].peak_bytes = None
                rows[n].reason = "peak memory not measured: " + _first_line(exc)
    for row in rows.values():
        if row.status != "ok":
            row.times_s, row.median_s, row.min_s, row.peak_bytes = [], None, None, None
            row.max_abs_err = row.err_tol = None
            row.mismatch = False
        elif row.median_s:
            if row.flops:
                row.flop_per_s = row.flops / row.median_s
            if row.bytes:
                row.bytes_per_s = row.bytes / row.median_s
    return [rows[p.name] for p in provs]


def add_ratios(rows: List[Row]) -> None:
    base = {}
    for r in rows:
        if r.provider == BASELINE[r.op] and r.median_s:
            base[cell_key(r)] = r.median_s
    for r in rows:
        b = base.get(cell_key(r))
        r.ratio = (r.median_s / b) if (b and r.median_s) else None


# --------------------------------------------------------------------------------------
# suites
# --------------------------------------------------------------------------------------
@dataclass
class Config:
    suite: str
    device: str
    batch: int
    heads: int
    lengths: List[int]
    head_dims: List[int]
    dtypes: List[str]
    modes: List[str]
    ops: List[str]
    causal: bool = False
    zero_frac: float = 0.2
    zero_scale: float = 1e-6
    zero_mode: str = "prob"
    shapes: Optional[List[dict]] = None    # fixed shapes (model suite) instead of the grid
    threads: Optional[int] = None          # the suite's default torch thread count
    providers: Optional[List[str]] = None  # the suite's default --providers
    time_budget: Optional[float] = None    # the suite's default --time-budget

    def workloads(self, op: Optional[str] = None) -> List[Workload]:
        out = []
        for o in self.ops:
            if op is not None and o != op:
                continue
            if self.shapes is not None:
                for s in self.shapes:
                    for mode in self.modes:
                        for dt in self.dtypes:
                            out.append(Workload(
                                o, mode, self.device, DTYPES[dt], s["batch"], s["heads"],
                                s["length"], s["head_dim"], s.get("causal", False),
                                self.zero_frac, self.zero_scale, self.zero_mode,
                                length_k=s.get("length_k"), rotary=s.get("rotary", True),
                                tag=s.get("tag", ""),
                                keys_rotated=s.get("keys_rotated", False)))
                continue
            for mode in self.modes:
                for dt in self.dtypes:
                    for d in self.head_dims:
                        for length in self.lengths:
                            out.append(Workload(o, mode, self.device, DTYPES[dt], self.batch,
                                                self.heads, length, d, self.causal,
                                                self.zero_frac, self.zero_scale,
                                                self.zero_mode))
        return out


def default_suite() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


#: options that change the lengths x head dims grid, which a suite of fixed shapes lacks
GRID_OPTIONS = ("lengths", "head_dims", "batch", "heads", "causal")


def make_config(suite: str, *, full: bool = False, shapes: Optional[Sequence[str]] = None,
                **overrides) -> Config:
    """The suite's Config with the given overrides (None = the suite's own); ``shapes``
    keeps only the fixed shapes of those tags (model suite)."""
    if suite not in SUITES:
        raise SystemExit(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    s = SUITES[suite]
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = Config(suite=suite, device=s["device"], batch=s["batch"], heads=s["heads"],
                 lengths=list(s["full_lengths"] if full and "full_lengths" in s else s["lengths"]),
                 head_dims=list(s["head_dims"]),
                 dtypes=list(s["full_dtypes"] if full and "full_dtypes" in s else s["dtypes"]),
                 modes=list(MODES), ops=list(s.get("ops", OPS)),
                 shapes=[dict(x) for x in s["shapes"]] if "shapes" in s else None,
                 threads=s.get("threads"), providers=s.get("providers"),
                 time_budget=s.get("time_budget"))
    if cfg.shapes is not None:
        grid = [k for k in GRID_OPTIONS if k in given]
        if grid:
            raise SystemExit(f"suite {suite!r} has fixed shapes; "
                             + ", ".join("--" + k.replace("_", "-") for k in grid)
                             + " do not apply (--shapes TAG ... picks among "
                             + ", ".join(sorted({x.get('tag', '') for x in cfg.shapes})) + ")")
        if "ops" in given and set(given["ops"]) - set(cfg.ops):
            raise SystemExit(f"suite {suite!r} times {', '.join(cfg.ops)} only")
        if shapes:
            tags = [t.strip() for x in shapes for t in x.split(",") if t.strip()]
            known = {x.get("tag", "") for x in cfg.shapes}
            bad = [t for t in tags if t not in known]
            if bad:
                raise SystemExit(f"unknown shape tag(s) {bad}; suite {suite!r} has "
                                 + ", ".join(sorted(known)))
            cfg.shapes = [x for x in cfg.shapes if x.get("tag", "") in tags]
    elif shapes:
        raise SystemExit(f"--shapes picks among a fixed-shape suite's shapes (model); "
                         f"suite {suite!r} is a grid: use --lengths/--head-dims")
    return replace(cfg, **given)


def suite_from_env() -> Config:
    """For the pytest-benchmark suites: ``ZEROMASK_BENCH_SUITE`` (default: gpu if CUDA is
    available, else cpu), ``ZEROMASK_BENCH_FULL=1``, ``ZEROMASK_BENCH_LENGTHS=256,512``,
    ``ZEROMASK_BENCH_HEAD_DIMS=64``, ``ZEROMASK_BENCH_SHAPES=encoder,decode`` (model)."""
    def ints(name):
        v = os.environ.get(name)
        return [int(s) for s in v.split(",")] if v else None
    shapes = os.environ.get("ZEROMASK_BENCH_SHAPES")
    return make_config(os.environ.get("ZEROMASK_BENCH_SUITE", default_suite()),
                       full=os.environ.get("ZEROMASK_BENCH_FULL") == "1",
                       shapes=[shapes] if shapes else None,
                       lengths=ints("ZEROMASK_BENCH_LENGTHS"),
                       head_dims=ints("ZEROMASK_BENCH_HEAD_DIMS"))


# --------------------------------------------------------------------------------------
# environment facts
# --------------------------------------------------------------------------------------
def repo_root() -> Optional[Path]:
    """The checkout these benchmarks sit in (their parent folder)."""
    here = HERE.parent
    return here if (here / "benchmarks").is_dir() else None


def results_dir() -> Path:
    """Where published (committed) runs live: ``benchmarks/results/``."""
    return HERE / "results"


def git_commit(where: Optional[Path]) -> str:
    cwd = str(where) if where else None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=10)
        suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        return sha.stdout.strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpuinfo_fields() -> Dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty elsewhere)."""
    out: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                if ":" in line:
                    k, v = line.split(":", 1)
                    out.setdefault(k.strip().lower(), v.strip())
    except OSError:
        pass
    return out


def amd_core(family: int, model: int) -> Optional[str]:
    """The AMD core generation CPUID family/model name (AMD's published ranges); None
    where unknown. A virtual machine may report another CPU's family and model."""
    if family == 0x17:
        return "Zen 2" if model >= 0x30 else "Zen / Zen+"
    if family == 0x19:
        zen4 = 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF
        return "Zen 4" if zen4 else "Zen 3"
    if family == 0x1A:
        return "Zen 5"
    return None


def cpu_info() -> dict:
    """The CPU this process runs on: model name, vendor, CPUID family/model/stepping, the
    AMD core generation those name, and the vector ISA flags that matter to the kernels."""
    f = _cpuinfo_fields()
    name = f.get("model name") or platform.processor() or platform.machine() or "cpu"
    info: dict = {"model_name": name, "vendor": f.get("vendor_id")}
    for key in ("cpu family", "model", "stepping"):
        try:
            info[key.replace("cpu ", "")] = int(f[key], 0) if f.get(key) else None
        except ValueError:
            info[key.replace("cpu ", "")] = None
    flags = set(f.get("flags", "").split())
    info["isa"] = [x for x in ("avx512f", "avx2", "fma", "avx", "neon", "asimd") if x in flags]
    info["core"] = (amd_core(info["family"], info["model"] or 0)
                    if info.get("vendor") == "AuthenticAMD" and info.get("family") else None)
    return info


def describe_cpu(info: dict, threads: int) -> str:
    """``AMD EPYC (AuthenticAMD family 23 model 1 stepping 2: Zen / Zen+ by CPUID; avx2
    fma, no AVX-512), 1 thread``."""
    parts = []
    if info.get("vendor"):
        parts.append(info["vendor"])
    for key in ("family", "model", "stepping"):
        if info.get(key) is not None:
            parts.append(f"{key} {info[key]}")
    text = " ".join(parts)
    if info.get("core"):
        text += f": {info['core']} by CPUID"
    isa = info.get("isa") or []
    if isa:
        text += ("; " if text else "") + " ".join(isa) + (
            "" if "avx512f" in isa or not {"avx", "avx2"} & set(isa) else ", no AVX-512")
    return (f"{info['model_name']}" + (f" ({text})" if text else "")
            + f", {threads} thread{'s' if threads != 1 else ''}")


def cpu_name() -> str:
    return cpu_info()["model_name"]


def write_report(out_dir, name: str, lines: List[str], summary: dict, script: str,
                 argv: Optional[Sequence[str]]) -> str:
    """Close a speech-model benchmark's markdown ``lines`` with the command that reproduces
    it (``python benchmarks/<script>`` + ``argv``, default ``sys.argv[1:]``), write
    ``OUT/<name>.md`` and ``OUT/<name>.json`` (``summary``), print and return the text."""
    import json
    import shlex
    import sys
    from pathlib import Path
    args = list(argv if argv is not None else sys.argv[1:])
    lines = list(lines) + ["Command: `" + " ".join(
        shlex.quote(a) for a in ["python", f"benchmarks/{script}"] + args) + "`"]
    text = "\n".join(lines) + "\n"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(text)
    return text


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"{cpu_name()}, {n} thread{'s' if n != 1 else ''}"


def device_slug(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu {cpu_name()} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device


def versions() -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        triton_v = f"not available ({type(exc).__name__})"
    return {"torch": torch.__version__, "triton": triton_v, "python": platform.python_version(),
            "zeromask": zeromask.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def usable_cores() -> int:
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1)
