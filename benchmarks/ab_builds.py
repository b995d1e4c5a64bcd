"""Two builds of the CPU kernels side by side in one process: this checkout's
``zeromask._C_cpu`` against another build's ``_C_cpu*.so`` (say, a git worktree of the
commit before a change), each call of one alternated with the other's.

    python benchmarks/ab_builds.py --base ../before/zeromask/_C_cpu.cpython-311-x86_64-linux-gnu.so

On a shared or throttled machine, timings taken minutes apart (two runs of bench.py) can
differ by more than a kernel change does; here both builds run in the same seconds, on the
same inputs, through the same fast-path entry (``attention_forward_fast``: the whole eager
call, its checks and its C++ autograd Function included). Per shape and mode: the best of
``--rounds`` rounds of N back-to-back calls per build (N sized to ~20 ms), in microseconds
per call, and new ÷ base. The shapes are the model suite's (runner.MODEL_SHAPES) but its
rotated-key decode rows; the fused call has 20% zero keys and per-position theta on both
sides (no rotary on cross-attention, as in the speech model). 1 thread unless --threads.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

import zeromask._C_cpu as this_build
from runner import MODEL_SHAPES, cpu_name

#: (tag, B, H, Lq, Lk, D, causal, rotary) of the model suite's calls
SHAPES = [(s["tag"], s["batch"], s["heads"], s["length"], s.get("length_k", s["length"]),
           s["head_dim"], s.get("causal", False), s.get("rotary", True))
          for s in MODEL_SHAPES if not s.get("keys_rotated")]


def load_build(path: Path):
    """The extension module at ``path`` under a name of its own (its init symbol is
    ``PyInit__C_cpu`` whatever the package, so it loads beside this checkout's)."""
    if not path.is_file():
        raise SystemExit(f"--base: no such file: {path}")
    spec = importlib.util.spec_from_file_location("zeromask_base._C_cpu", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "attention_forward_fast"):
        raise SystemExit(f"--base: {path} has no attention_forward_fast (a build before the "
                         "CPU fast path cannot be compared here)")
    return module


def calls(build, shape, grad: bool, gen: torch.Generator):
    _, B, H, Lq, Lk, D, causal, rotary = shape
    def rand(*s, requires_grad=False):
        return torch.randn(*s, generator=gen).requires_grad_(requires_grad)
    q, k, v = rand(B, H, Lq, D, requires_grad=True), rand(B, H, Lk, D, requires_grad=True), \
        rand(B, H, Lk, D, requires_grad=True)
    key_zero = torch.rand(B, Lk, generator=gen) < 0.2
    theta_k = torch.rand(B, Lk, generator=gen) * 1e4 + 100 if rotary else None
    theta_q = (theta_k if Lq == Lk else theta_k[:, -Lq:].contiguous()) if rotary else None
    grad_out = rand(B, H, Lq, D)

    def call():
        out = build.attention_forward_fast(q, k, v, key_zero, 1e-6, "prob", causal, None,
                                           None, theta_q, theta_k, None, None, None, False,
                                           None, "cpp")
        if out is None:
            raise SystemExit("the fast path declined the benchmark's call")
        if grad:
            out.backward(grad_out)
    return call


def best_us(fn_a, fn_b, rounds: int):
    for _ in range(5):
        fn_a(); fn_b()
    t0 = time.perf_counter()
    fn_b()
    n = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-7)))
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / n)
    return best[0] * 1e6, best[1] * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the other build's _C_cpu*.so")
    p.add_argument("--rounds", type=int, default=11, help="alternations per shape (11)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", nargs="+", metavar="TAG", help="only these calls (tags above)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = load_build(args.base)
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}; base {args.base}")
    print("| call | shape | mode | base us | this build us | this ÷ base |")
    print("|---|---|---|---:|---:|---:|")
    for shape in SHAPES:
        tag, B, H, Lq, Lk, D, causal = shape[:7]
        if args.shapes and tag not in args.shapes:
            continue
        desc = f"B{B} H{H} Lq{Lq} Lk{Lk} D{D}" + (" causal" if causal else "")
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            with torch.set_grad_enabled(grad):
                fa = calls(base, shape, grad, torch.Generator().manual_seed(0))
                fb = calls(this_build, shape, grad, torch.Generator().manual_seed(0))
                a, b = best_us(fa, fb, args.rounds)
            print(f"| {tag} | {desc} | {mode} | {a:.1f} | {b:.1f} | {b / a:.3f} |", flush=True)


if __name__ == "__main__":
    main()
