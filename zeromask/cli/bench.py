"""``zeromask-bench``: zeromask against SDPA and the other ways users do this today.

Runs a suite of shapes for the attention op and the rotary op, forward and forward+backward,
over every *provider* (one way of computing the op), prints a markdown table and writes,
under ``runs/bench/<device-slug>/`` (git-ignored; ``--out benchmarks/results/<device-slug>``
publishes a run into the repository, a deliberate step)::

    <suite>.md                      the table (device, versions, date, commit in its header)
    <suite>.json                    every raw number
    <suite>_attention_time.png      median time vs L, one line per provider
    <suite>_attention_memory.png    peak memory vs L, one line per provider
    <suite>_rotary_time.png / <suite>_rotary_memory.png

Attention providers (DESIGN.md section 6):

* ``zeromask[<backend>]`` for every backend :func:`zeromask.available_backends` lists
  (a backend that cannot run here is a row marked unavailable, with the reason);
* ``sdpa``: plain ``F.scaled_dot_product_attention`` (no rotary, no zero scaling: the speed
  of light for the shape; forced to the flash backend on CUDA in fp16/bf16);
* ``sdpa+bias+rope``: a separate PyTorch rotary, then SDPA with the additive mask ln(s) on
  zero keys (== ``zero_mode="prob"``);
* ``flex+rope``: a separate PyTorch rotary, then ``torch.compile(flex_attention)`` with a
  score_mod multiplying zero keys' logits by s (== ``zero_mode="score"``, the Echo code);
* ``naive``: :mod:`zeromask.reference` (materialises L x L; skipped by a memory estimate
  where it does not fit).

Rotary providers: ``zeromask[<backend>]``, ``rope-table`` (standard RoPE applied from a
cos/sin table built outside the timed region: the speed of light) and ``naive``.

The same module is imported by the pytest-benchmark suites in ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fnmatch
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import zeromask
from zeromask import reference
from zeromask.modules import F0Rotary

MODES = ("fwd", "fwd+bwd")
OPS = ("attention", "rotary")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

#: The suites. ``full_lengths`` replace ``lengths`` with ``--full``.
SUITES: Dict[str, dict] = {
    "cpu-quick": dict(device="cpu", batch=1, heads=8, lengths=[256, 512], head_dims=[64],
                      dtypes=["float32"]),
    "cpu": dict(device="cpu", batch=1, heads=8, lengths=[256, 512, 1024, 2048],
                full_lengths=[256, 512, 1024, 2048, 4096], head_dims=[64, 128],
                dtypes=["float32"]),
    "gpu": dict(device="cuda", batch=2, heads=16, lengths=[1024, 2048, 4096, 8192, 16384],
                head_dims=[64, 128], dtypes=["bfloat16"], full_dtypes=["bfloat16", "float16"]),
}

#: DESIGN.md section 6, CPU: this shape, fused within 1.25x SDPA, >= 3x naive and flex.
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
    length: int
    head_dim: int
    causal: bool = False
    zero_frac: float = 0.2
    zero_scale: float = 1e-6
    zero_mode: str = "prob"

    @property
    def group(self) -> str:
        return (f"{self.op} {self.mode} D={self.head_dim} {_SHORT_DTYPE[self.dtype]}"
                + (" causal" if self.causal else ""))

    def __str__(self) -> str:
        return (f"{self.op}-{self.mode}-B{self.batch}H{self.heads}L{self.length}"
                f"D{self.head_dim}-{_SHORT_DTYPE[self.dtype]}" + ("-causal" if self.causal else ""))

    def flops(self) -> Optional[float]:
        """Nominal FLOPs: 4*B*H*L*L*D forward (halved when causal); fwd+bwd = 3.5x forward
        (the backward counts 2.5x the forward, as in flash-attention's benchmarks)."""
        if self.op != "attention":
            return None
        f = 4.0 * self.batch * self.heads * self.length * self.length * self.head_dim
        if self.causal:
            f /= 2
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
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_zero: torch.Tensor
    theta: torch.Tensor     # (B, L) float32, from F0Rotary("echo") of a speech-like contour
    grad_out: torch.Tensor


def make_inputs(w: Workload, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    shape = (w.batch, w.heads, w.length, w.head_dim)
    need_grad = w.mode != "fwd"

    def rnd():
        t = torch.randn(shape, generator=g).to(device=w.device, dtype=w.dtype)
        return t.requires_grad_(need_grad)

    q, k, v = rnd(), rnd(), rnd()
    key_zero = speech_like_zero(w.batch, w.length, w.zero_frac, w.device)
    with torch.no_grad():
        f0 = speech_like_f0(w.batch, w.length, key_zero, seed)
        theta = F0Rotary("echo", learnable=False)(f0).to(w.device).float().contiguous()
    grad_out = torch.randn(shape, generator=g).to(device=w.device, dtype=w.dtype)
    return Inputs(q, k, v, key_zero, theta, grad_out)


# --------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------
@dataclass
class Provider:
    """One way of computing an op. ``build(w, x)`` returns the forward as a closure (after
    any one-time setup such as masks, tables or compilation) or raises :class:`Unavailable`;
    ``semantics`` says what it computes; ``reference_kwargs`` is the zeromask.reference
    call it must agree with (None: no check); ``ll_matrices`` estimates how many fp32
    B x H x L x L matrices it keeps alive at once (fwd, fwd+bwd), for the memory cap."""

    name: str
    op: str
    semantics: str
    build: Callable[["Workload", Inputs], Callable[[], torch.Tensor]]
    reference_kwargs: Optional[Callable[["Workload", Inputs], dict]] = None
    ll_matrices: Optional[Tuple[float, float]] = None


def _attn_ref_kwargs(zero_mode: Optional[str], rotary: bool):
    def make(w: Workload, x: Inputs) -> dict:
        kw: dict = dict(causal=w.causal)
        if zero_mode is not None:
            kw.update(key_zero=x.key_zero, zero_scale=w.zero_scale, zero_mode=zero_mode)
        if rotary:
            kw.update(theta_q=x.theta, theta_k=x.theta)
        return kw
    return make


def _require_backend(backend: str, w: Workload) -> None:
    """Raise Unavailable unless the zeromask backend can be timed for this workload."""
    if backend == "triton" and w.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        raise Unavailable("TRITON_INTERPRET=1: Triton's CPU interpreter is a correctness "
                          "tool, not a kernel to time")
    reason = zeromask.available_backends().get(backend)
    if reason is not None:
        raise Unavailable(reason)


def _zeromask_attention(backend: str) -> Provider:
    def build(w: Workload, x: Inputs):
        _require_backend(backend, w)

        def fn():
            return zeromask.zero_soft_attention(
                x.q, x.k, x.v, key_zero=x.key_zero, zero_scale=w.zero_scale,
                zero_mode=w.zero_mode, causal=w.causal, theta_q=x.theta, theta_k=x.theta,
                backend=backend)
        return fn

    materialises = (4.0, 6.0) if backend == "reference" else None
    how = ("dispatched to zeromask.reference, which materialises L x L" if backend == "reference"
           else "fused kernel: rotary applied inside the attention kernel, no L x L buffer")
    return Provider(f"zeromask[{backend}]", "attention",
                    f"zeromask.zero_soft_attention(backend={backend!r}): zero-soft attention "
                    f"(--zero-mode, default prob) + f0 rotary on q and k in one call; {how}",
                    build,
                    lambda w, x: _attn_ref_kwargs(w.zero_mode, True)(w, x), materialises)


def _sdpa_context(w: Workload):
    if w.device == "cuda" and w.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def _sdpa_plain(w: Workload, x: Inputs):
    def fn():
        with _sdpa_context(w):
            return F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=w.causal)
    return fn


def _sdpa_bias_rope(w: Workload, x: Inputs):
    if w.zero_mode != "prob":
        raise Unavailable("an additive SDPA mask can only express zero_mode='prob' "
                          "(logit + ln s), not 'score'")
    bias = reference.sdpa_equivalent_mask(x.key_zero, w.zero_scale, w.dtype)  # (B,1,1,L)
    if w.causal:  # SDPA takes attn_mask or is_causal, not both: fold the causal mask in
        keep = torch.ones(w.length, w.length, dtype=torch.bool, device=w.device).tril()
        causal = torch.zeros(w.length, w.length, dtype=w.dtype, device=w.device)
        bias = bias + causal.masked_fill(~keep, float("-inf"))
    theta = x.theta

    def fn():
        q = reference.f0_rotary(x.q, theta)
        k = reference.f0_rotary(x.k, theta)
        return F.scaled_dot_product_attention(q, k, x.v, attn_mask=bias)
    return fn


_FLEX_COMPILED = None


def _flex_compiled():
    """One ``torch.compile(flex_attention)``; recompiles per shape (excluded from timing)."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def _flex_rope(w: Workload, x: Inputs):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention: {exc}")
    flex = _flex_compiled()
    kz, s = x.key_zero, w.zero_scale

    def score_mod(score, b, h, q_idx, kv_idx):  # Echo's "score" zero mode
        return torch.where(kz[b, kv_idx], score * s, score)

    block_mask = None
    if w.causal:
        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        block_mask = create_block_mask(causal, None, None, w.length, w.length, device=w.device)
    theta = x.theta

    def fn():
        q = reference.f0_rotary(x.q, theta)
        k = reference.f0_rotary(x.k, theta)
        return flex(q, k, x.v, score_mod=score_mod, block_mask=block_mask)
    return fn


def _naive_attention(w: Workload, x: Inputs):
    def fn():
        return reference.zero_soft_attention(
            x.q, x.k, x.v, key_zero=x.key_zero, zero_scale=w.zero_scale,
            zero_mode=w.zero_mode, causal=w.causal, theta_q=x.theta, theta_k=x.theta)
    return fn


def _zeromask_rotary(backend: str) -> Provider:
    def build(w: Workload, x: Inputs):
        _require_backend(backend, w)
        return lambda: zeromask.f0_rotary(x.q, x.theta, backend=backend)
    how = ("dispatched to zeromask.reference (PyTorch)" if backend == "reference"
           else "the backend's rotary kernel")
    return Provider(f"zeromask[{backend}]", "rotary",
                    f"zeromask.f0_rotary(backend={backend!r}); {how}", build, lambda w, x: {})


def _rope_table(w: Workload, x: Inputs):
    """Standard (GPT-NeoX/LLaMA) RoPE from a precomputed per-position cos/sin table."""
    with torch.no_grad():
        phi = reference.rotary_angles(x.theta, torch.arange(w.length, device=w.device,
                                      dtype=torch.float32).expand_as(x.theta), w.head_dim)
        phi = torch.cat((phi, phi), dim=-1).unsqueeze(1)  # (B, 1, L, D)
        cos, sin = phi.cos().to(w.dtype), phi.sin().to(w.dtype)
    half = w.head_dim // 2

    def fn():
        xx = x.q
        rot = torch.cat((-xx[..., half:], xx[..., :half]), dim=-1)
        return xx * cos + rot * sin
    return fn


def _naive_rotary(w: Workload, x: Inputs):
    return lambda: reference.f0_rotary(x.q, x.theta)


def providers(op: str, zero_mode: str = "prob") -> List[Provider]:
    """Every provider of ``op``; ``zeromask[<b>]`` for every backend dispatch knows."""
    backends = list(zeromask.available_backends())
    if op == "attention":
        mode_name = f"zero_mode={zero_mode!r}"
        return [_zeromask_attention(b) for b in backends] + [
            Provider("sdpa", op, "plain F.scaled_dot_product_attention: no rotary, no zero "
                     "keys (speed of light; flash backend forced on CUDA fp16/bf16)",
                     _sdpa_plain, _attn_ref_kwargs(None, False)),
            Provider("sdpa+bias+rope", op, "PyTorch f0 rotary on q and k, then SDPA with "
                     "additive mask ln(s) on zero keys (== zero_mode='prob')",
                     _sdpa_bias_rope, _attn_ref_kwargs("prob", True)),
            Provider("flex+rope", op, "PyTorch f0 rotary on q and k, then "
                     "torch.compile(flex_attention) with score_mod s*score on zero keys "
                     "(== zero_mode='score', the Echo code); compile time excluded",
                     _flex_rope, _attn_ref_kwargs("score", True)),
            Provider("naive", op, f"zeromask.reference ({mode_name} + f0 rotary, "
                     "materialises the L x L matrices)", _naive_attention,
                     lambda w, x: _attn_ref_kwargs(w.zero_mode, True)(w, x), (4.0, 6.0)),
        ]
    if op == "rotary":
        return [_zeromask_rotary(b) for b in backends] + [
            Provider("rope-table", op, "standard RoPE from a cos/sin table built outside "
                     "the timed region (speed of light; same angles)", _rope_table,
                     lambda w, x: {}),
            Provider("naive", op, "zeromask.reference.f0_rotary (angles and cos/sin each "
                     "call, in PyTorch)", _naive_rotary, lambda w, x: {}),
        ]
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


BASELINE = {"attention": "sdpa", "rotary": "rope-table"}


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


def compute_ceiling(device: str, reps: int = 3) -> Optional[dict]:
    """The device's fp32 compute peak measured in this process, or None where there is no
    way to measure it here.

    CPU: ``zeromask._C_cpu.fma_peak``, a register-only loop of independent FMA chains in the
    widest vectors the extension was built for, on every torch thread: the fastest of
    ``reps`` calls. Exact attention is matrix products (4·B·H·L²·D FLOPs forward, 3.5x that
    forward and backward) plus a softmax, so no kernel built the same way runs faster than
    this, and a target that needs more cannot be met on this machine. (``torch.mm`` is no
    ceiling: on this AMD CPU its fp32 GEMM runs at under half of this peak.)
    """
    if device != "cpu":
        return None
    try:
        from zeromask import _C_cpu  # type: ignore[attr-defined]
    except ImportError:
        return None
    iters = 20_000_000
    best = max(_C_cpu.fma_peak(iters) for _ in range(reps))
    threads = torch.get_num_threads()
    return {"what": f"fp32 FMA peak ({_C_cpu.vector_bits()}-bit vectors, {threads} "
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
    length: int
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


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else ""
    name = "" if isinstance(exc, Unavailable) else f"{type(exc).__name__}: "
    return (name + text)[:300]


def _check(provider: Provider, w: Workload, x: Inputs, out: torch.Tensor,
           ref_cache: dict) -> Tuple[Optional[float], Optional[float]]:
    """Max |forward - float64 reference| and the tolerance; None where too big to check."""
    if provider.reference_kwargs is None:
        return None, None
    limit = 2 ** 27 if w.device == "cuda" else 2 ** 23  # float64 L x L elements
    if w.op == "attention" and w.batch * w.heads * w.length ** 2 > limit:
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
    eps += 4 * w.length * 2.0 ** -24
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
        need = n * w.batch * w.heads * w.length ** 2 * 4
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
    for p in provs:
        if progress:
            progress(f"{w.op} {w.mode} L={w.length} D={w.head_dim}: warm up {p.name}")
        row = rows[p.name] = Row(p.name, w.op, w.mode, w.device, _SHORT_DTYPE[w.dtype],
                                 w.batch, w.heads, w.length, w.head_dim, w.causal,
                                 flops=w.flops(), bytes=w.nominal_bytes())
        try:
            steps[p.name], out, row.first_call_s = prepare(p, w, x, mem_budget)
            if ref_cache is not None:
                row.max_abs_err, row.err_tol = _check(p, w, x, out, ref_cache)
                row.mismatch = row.max_abs_err is not None and not (
                    row.max_abs_err <= row.err_tol)
            del out
        except Unavailable as exc:
            row.status, row.reason = "unavailable", str(exc)
    if progress:
        progress(f"{w.op} {w.mode} L={w.length} D={w.head_dim}: timing")
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
                progress(f"{w.op} {w.mode} L={w.length} D={w.head_dim}: memory {n}")
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
            base[_cell(r)] = r.median_s
    for r in rows:
        b = base.get(_cell(r))
        r.ratio = (r.median_s / b) if (b and r.median_s) else None


def _cell(r: Row) -> tuple:
    return (r.op, r.mode, r.device, r.dtype, r.batch, r.heads, r.length, r.head_dim, r.causal)


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

    def workloads(self, op: Optional[str] = None) -> List[Workload]:
        out = []
        for o in self.ops:
            if op is not None and o != op:
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


def make_config(suite: str, *, full: bool = False, **overrides) -> Config:
    if suite not in SUITES:
        raise SystemExit(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    s = SUITES[suite]
    cfg = Config(suite=suite, device=s["device"], batch=s["batch"], heads=s["heads"],
                 lengths=list(s["full_lengths"] if full and "full_lengths" in s else s["lengths"]),
                 head_dims=list(s["head_dims"]),
                 dtypes=list(s["full_dtypes"] if full and "full_dtypes" in s else s["dtypes"]),
                 modes=list(MODES), ops=list(OPS))
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def suite_from_env() -> Config:
    """For the pytest-benchmark suites: ``ZEROMASK_BENCH_SUITE`` (default: gpu if CUDA is
    available, else cpu), ``ZEROMASK_BENCH_FULL=1``, ``ZEROMASK_BENCH_LENGTHS=256,512``,
    ``ZEROMASK_BENCH_HEAD_DIMS=64``."""
    def ints(name):
        v = os.environ.get(name)
        return [int(s) for s in v.split(",")] if v else None
    return make_config(os.environ.get("ZEROMASK_BENCH_SUITE", default_suite()),
                       full=os.environ.get("ZEROMASK_BENCH_FULL") == "1",
                       lengths=ints("ZEROMASK_BENCH_LENGTHS"),
                       head_dims=ints("ZEROMASK_BENCH_HEAD_DIMS"))


# --------------------------------------------------------------------------------------
# environment facts
# --------------------------------------------------------------------------------------
def repo_root() -> Optional[Path]:
    here = Path(__file__).resolve().parents[2]
    return here if (here / "benchmarks").is_dir() else None


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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


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


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


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
    """The DESIGN.md section-6 lines for this run; ``ceiling`` (:func:`compute_ceiling`)
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
        lines.append(f"### DESIGN.md section 6, CPU check ({shape})")
        lines.append("")
        if not present:
            lines.append(f"This run has no {shape} row (the `cpu` suite has it).")
            lines.append("")
            return lines
        cells = [(s6["length"], s6["head_dim"], "fp32")]
        targets = ("fused ÷ sdpa time ≤ 1.25; naive ÷ fused ≥ 3; flex+rope ÷ fused ≥ 3")
    else:
        cells = sorted({(r.length, r.head_dim, r.dtype) for r in att})
        lines.append("### DESIGN.md section 6, GPU check")
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


def markdown(meta: dict, rows: List[Row], provider_info: Dict[str, Dict[str, str]]) -> str:
    cfg = meta["config"]
    device = cfg["device"]
    big = device == "cuda"
    rate_unit, rate_name = (1e12, "TFLOP/s") if big else (1e9, "GFLOP/s")
    bw_unit, bw_name = 1e9, "GB/s"
    out: List[str] = []
    out.append(f"## zeromask-bench: suite `{cfg['suite']}` on {meta['device_name']}")
    out.append("")
    v = meta["versions"]
    backends = ", ".join(f"{k} " + ("available" if r is None else f"unavailable ({r})")
                         for k, r in meta["backends"].items())
    out += [
        "| | |", "|---|---|",
        f"| device | {meta['device_name']} |",
        f"| versions | torch {v['torch']}, triton {v['triton']}, python {v['python']}, "
        f"zeromask {v['zeromask']}" + (f", CUDA {v['cuda']}" if v.get("cuda") else "") + " |",
        f"| commit | `{meta['commit']}` |",
        f"| date | {meta['date']} |",
        f"| zeromask backends | {backends} |",
        f"| shapes | B={cfg['batch']} H={cfg['heads']}, L in {cfg['lengths']}, D in "
        f"{cfg['head_dims']}, {', '.join(cfg['dtypes'])}, "
        f"{'causal' if cfg['causal'] else 'non-causal'}, {int(cfg['zero_frac'] * 100)}% zero "
        f"keys (speech-like silences), zero_scale {cfg['zero_scale']:g}, zeromask/naive "
        f"zero_mode={cfg['zero_mode']!r}; theta per position from a synthetic speech F0 "
        f"contour through F0Rotary('echo') |",
        f"| time | median of >= {meta['min_reps']} calls after a warm-up call "
        f"(compilation excluded); the providers of a shape are timed interleaved, one call "
        f"each per round, so outside load hits them alike; "
        + ("CUDA events" if big else f"wall clock, torch.set_num_threads({meta['threads']})")
        + "; fwd+bwd = forward + autograd.grad to q, k, v (to x for rotary) |",
        f"| {rate_name} | attention: nominal 4·B·H·L²·D per forward (halved when causal); "
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
        "is small enough (B·H·L² ≤ 2^23 on CPU, 2^27 on GPU), else 'not checked' |",
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
        out.append(f"| compute ceiling | {ceiling['what']}: {ceiling['flop_per_s'] / rate_unit:.3g} "
                   f"{rate_name}, the fastest of {ceiling['reps']} register-only FMA loops "
                   "(zeromask._C_cpu.fma_peak) at the start and the end of the run |")
    if meta.get("note"):
        out.append(f"| note | {meta['note']} |")
    out.append("")
    if "attention" in cfg["ops"]:
        out += section6(rows, device, meta.get("compute_ceiling"))
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
            groups.setdefault((r.mode, r.dtype, r.head_dim), []).append(r)
        for (mode, dtype, d), grp in groups.items():
            out.append(f"### {op}, {mode}, D={d}, {dtype}")
            out.append("")
            rate = (rate_name, rate_unit) if op == "attention" else (bw_name, bw_unit)
            out.append(f"| L | provider | median ms | min ms | IQR | {rate[0]} | peak MiB "
                       "| ÷ base | max err |")
            out.append("|---:|---|---:|---:|---:|---:|---:|---:|---|")
            for r in grp:
                if r.status != "ok":
                    key = f"{r.provider}: {r.reason}"
                    if key not in reasons:
                        reasons[key] = len(reasons) + 1
                    out.append(f"| {r.length} | {r.provider} | unavailable [{reasons[key]}] "
                               f"| — | — | — | — | — | — |")
                    continue
                ratev = r.flop_per_s if op == "attention" else r.bytes_per_s
                out.append(f"| {r.length} | {r.provider} | {_fmt_ms(r.median_s)} | "
                           f"{_fmt_ms(r.min_s)} | {_fmt_spread(r)} | {_fmt_rate(ratev, rate[1])} | {_fmt_mib(r.peak_bytes)} | "
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
    """The summary a README shows for this run: where and when, the section-6 check, the
    attention times at the section-6 head dim, the attention plots, links to the rest."""
    rel = Path(os.path.relpath(Path(out_dir).resolve(), Path(readme).resolve().parent)).as_posix()
    rel = "" if rel == "." else rel + "/"
    v = meta["versions"]
    cfg = meta["config"]
    command = f"zeromask-bench --suite {cfg['suite']}"
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
    lines = [f"`{command}` on {meta['device_name']}: torch "
             f"{v['torch']}, triton {v['triton']}, commit `{meta['commit']}`, {meta['date']}. "
             f"Full table with FLOP/s, peak memory, IQR and accuracy: "
             f"[{stem}.md]({rel}{stem}.md); raw numbers: [{stem}.json]({rel}{stem}.json).",
             ""]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    if "attention" in cfg["ops"]:
        lines += section6(rows, cfg["device"], meta.get("compute_ceiling"))
        d = SECTION6_CPU["head_dim"]
        if d not in cfg["head_dims"]:
            d = cfg["head_dims"][0]
        dtype = _SHORT_DTYPE[DTYPES[cfg["dtypes"][0]]]
        for mode in cfg["modes"]:
            lines += pivot(rows, "attention", mode, d, dtype) + [""]
        for what in ("time", "memory"):
            name = f"{stem}_attention_{what}.png"
            if (Path(out_dir) / name).is_file():
                lines += [f"![attention {what}]({rel}{name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, key: str, block: str) -> None:
    """Replace the text between ``<!-- zeromask-bench:KEY -->`` and its closing marker
    (appending both at the end the first time)."""
    start, end = f"<!-- zeromask-bench:{key} -->", f"<!-- /zeromask-bench:{key} -->"
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


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zeromask-bench",
        description="Benchmark zeromask's attention and rotary against SDPA, SDPA+bias+rope, "
                    "FlexAttention+rope and the naive reference; print a markdown table and "
                    "write it with PNG plots and raw JSON under runs/bench/<device>/.")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="shape set (default: gpu when CUDA is available, else cpu); cpu: "
                        "L 256..2048, D 64/128, fp32; cpu-quick: L 256/512, D 64; gpu: "
                        "L 1k..16k, D 64/128, bf16")
    p.add_argument("--full", action="store_true",
                   help="the long version: cpu adds L=4096; gpu adds fp16")
    p.add_argument("--lengths", type=int, nargs="+", help="override the sequence lengths")
    p.add_argument("--head-dims", type=int, nargs="+", help="override the head dims")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="override the dtypes")
    p.add_argument("--batch", type=int, help="override the batch size")
    p.add_argument("--heads", type=int, help="override the number of heads")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: both")
    p.add_argument("--ops", nargs="+", choices=OPS, help="default: both")
    p.add_argument("--providers", nargs="+",
                   help="names or globs, e.g. 'zeromask' (every zeromask[*]) sdpa naive; the "
                        "baseline (sdpa / rope-table) is always kept")
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--zero-mode", choices=("prob", "score"), default=None,
                   help="zero_mode of zeromask[*] and naive (default prob)")
    p.add_argument("--zero-frac", type=float, default=None, help="fraction of zero keys (0.2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: every core this process may use)")
    p.add_argument("--min-reps", type=int, default=3, help="timed calls at least (3)")
    p.add_argument("--max-reps", type=int, default=1000, help="timed calls at most (1000)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of interleaved timing per provider of a shape, beyond "
                        "--min-reps calls (cpu 0.4, gpu 0.5)")
    p.add_argument("--mem-cap-gb", type=float, default=None,
                   help="skip providers that materialise L x L above this estimate (default: "
                        "half the available RAM on CPU, 80%% of free GPU memory)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check of each forward against the float64 reference")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: runs/bench/<device-slug>/ of the "
                        "repository, or of the current directory: never a tracked file; "
                        "publish with --out benchmarks/results/<device-slug>)")
    p.add_argument("--note", default=None, help="a line added to the report header")
    p.add_argument("--update-readme", type=Path, nargs="?", default=None, metavar="README",
                   const=Path("benchmarks") / "README.md",
                   help="also write this run's summary (section-6 check, attention times, "
                        "plots) into README (default: benchmarks/README.md) between "
                        "'zeromask-bench:<device>/<suite>' comment markers")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the compute-ceiling measurement (the CPU's fp32 FMA peak, at "
                        "the start and the end of the run) that section 6 compares with")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--list", action="store_true",
                   help="list the providers and whether each can run here, then exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    suite = args.suite or default_suite()
    cfg = make_config(suite, full=args.full, lengths=args.lengths, head_dims=args.head_dims,
                      dtypes=args.dtypes, batch=args.batch, heads=args.heads, modes=args.modes,
                      ops=args.ops, causal=args.causal or None, zero_mode=args.zero_mode,
                      zero_frac=args.zero_frac)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print(f"suite {suite!r} needs a CUDA device and torch {torch.__version__} sees none; "
              "use --suite cpu", file=sys.stderr)
        return 2
    if cfg.device == "cpu":
        threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1)
        torch.set_num_threads(threads)
    elif args.threads:
        torch.set_num_threads(args.threads)
    budget_s = args.time_budget if args.time_budget is not None else (
        0.5 if cfg.device == "cuda" else 0.4)

    provs = {op: select_providers(providers(op, cfg.zero_mode), args.providers)
             for op in cfg.ops}
    if args.list:
        print("zeromask backends:", json.dumps(zeromask.available_backends()))
        for op, ps in provs.items():
            for p in ps:
                print(f"{op:9s} {p.name:22s} {p.semantics}")
        return 0

    out_dir = args.out
    if out_dir is None:
        # a user's run writes where nothing is tracked (runs/ is git-ignored); publishing
        # into benchmarks/results/ is a deliberate --out
        root = repo_root() or Path.cwd()
        out_dir = root / "runs" / "bench" / device_slug(cfg.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    mem_budget = memory_budget(cfg.device, args.mem_cap_gb)
    workloads = cfg.workloads()
    n_cells = sum(len(provs[w.op]) for w in workloads)
    rows: List[Row] = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=n_cells, unit="cell", disable=args.no_progress, dynamic_ncols=True)
    except ImportError:  # the [bench] extra brings tqdm; run without a bar otherwise
        bar = None
    ref_cache: dict = {}
    started = time.perf_counter()
    load_start = _loadavg()
    ceilings = [] if args.no_ceiling else [compute_ceiling(cfg.device)]
    for w in workloads:
        got = run_workload(provs[w.op], w, make_inputs(w), mem_budget=mem_budget,
                           min_reps=args.min_reps, max_reps=args.max_reps, budget_s=budget_s,
                           ref_cache=None if args.no_check else ref_cache,
                           measure_memory=not args.no_memory,
                           progress=bar.set_description if bar is not None else None)
        rows += got
        if bar is not None:
            bar.update(len(got))
    if bar is not None:
        bar.close()
    if ceilings and ceilings[0]:  # again at the end: the better of two, as load comes and goes
        ceilings.append(compute_ceiling(cfg.device))
    add_ratios(rows)

    meta = {
        "suite": suite, "device": cfg.device, "device_name": device_name(cfg.device),
        "device_slug": device_slug(cfg.device), "versions": versions(),
        "commit": git_commit(repo_root() or Path.cwd()),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "threads": torch.get_num_threads(), "min_reps": args.min_reps,
        "max_reps": args.max_reps, "time_budget_s": budget_s,
        "memory_method": MEMORY_METHOD[cfg.device], "mem_cap_bytes": mem_budget,
        "backends": zeromask.available_backends(),
        "flops": "4*B*H*L*L*D forward (/2 causal); fwd+bwd = 3.5x forward (bwd = 2.5x)",
        "compute_ceiling": max((c for c in ceilings if c), key=lambda c: c["flop_per_s"],
                               default=None),
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_1min": [load_start, _loadavg()],
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "config": {**asdict(cfg)}, "note": args.note,
        "command": shlex.join(["zeromask-bench", *(sys.argv[1:] if argv is None else argv)]),
    }
    info = {op: {p.name: p.semantics for p in ps} for op, ps in provs.items()}
    table = markdown(meta, rows, info)
    stem = suite + ("-full" if args.full else "")
    md_path = out_dir / f"{stem}.md"
    json_path = out_dir / f"{stem}.json"
    written = [md_path, json_path]
    pngs = []
    if not args.no_plots:
        for op in cfg.ops:
            for what in ("time", "memory"):
                title = (f"zeromask-bench {stem}: {op} {what} on {meta['device_name']} "
                         f"(torch {meta['versions']['torch']}, {meta['commit'][:12]}, "
                         f"{meta['date']})")
                got = plot(rows, op, what, out_dir / f"{stem}_{op}_{what}.png", title)
                if got:
                    pngs.append(got)
    plots_md = "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs)
    md_path.write_text(table + plots_md)
    write_json(json_path, meta, info, rows)
    written += pngs
    if args.update_readme is not None:
        readme = args.update_readme
        update_readme(readme, f"{meta['device_slug']}/{stem}",
                      readme_block(meta, rows, out_dir, readme, stem))
        written.append(readme)
    print(table)
    print(f"\n{len(rows)} cells in {meta['wall_s']} s; wrote:")
    for path in written:
        print(f"  {path}")
    mismatches = [r for r in rows if r.mismatch]
    if mismatches:
        print("\nMISMATCH against the reference: " + ", ".join(
            f"{r.provider} {r.op} {r.mode} L={r.length} D={r.head_dim} "
            f"(err {r.max_abs_err:.2e} > {r.err_tol:.2e})" for r in mismatches), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
