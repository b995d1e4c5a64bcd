"""Warm-loop time per call of the fused attention against SDPA at the speech model's
smallest shapes: what a call costs when it runs back to back with itself (caches warm),
as in a decoding loop, rather than interleaved with other providers as bench.py's
``model`` suite times it (which starts every call with cold caches).

    python benchmarks/call_overhead.py [--threads 1]

Per shape and mode: the best of 5 loops of N calls (microseconds per call). The fused call
has 20% zero keys and per-position theta on both sides (the ``decode, keys rotated`` row: on
the query only, its KV cache holding keys rotated once as they were appended, as the speech
model's decoder keeps them), SDPA neither; fwd is under
``torch.no_grad()``, fwd+bwd is forward + ``autograd.grad`` of the sum to q, k, v. Also the
time of a trivial ``(x * 2).sum()`` backward: autograd's own fixed cost on this CPU, which
every fwd+bwd row pays.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import zeromask
from runner import cpu_name  # /proc/cpuinfo's model name, as every benchmark prints it

#: (name, B, H, Lq, Lk, D, causal)
SHAPES = [("overhead", 1, 1, 1, 1, 16, False), ("encoder", 16, 4, 32, 32, 24, False),
          ("decoder", 16, 4, 20, 20, 24, True), ("decode", 16, 4, 1, 64, 24, True),
          ("decode, keys rotated", 16, 4, 1, 64, 24, True)]


def per_call_us(fn, n: int) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"zeromask {zeromask.__version__}")
    print("| call | shape | mode | fused us | SDPA us | fused ÷ SDPA |")
    print("|---|---|---|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for name, B, H, Lq, Lk, D, causal in SHAPES:
        q = torch.randn(B, H, Lq, D, generator=g)
        k, v = (torch.randn(B, H, Lk, D, generator=g) for _ in range(2))
        theta = 100 + 900 * torch.rand(B, Lk, generator=g)
        kw = dict(key_zero=torch.rand(B, Lk, generator=g) < 0.2, theta_q=theta[:, -Lq:],
                  theta_k=None if "keys rotated" in name else theta, causal=causal)
        sdpa_causal = causal and Lq == Lk
        n = max(5, int(2000 / (B * H * Lq * Lk / 256 + 1)))
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def fused_fwd():
            with torch.no_grad():
                zeromask.zero_soft_attention(q, k, v, **kw)

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=sdpa_causal)

        def fused_fb():
            torch.autograd.grad(zeromask.zero_soft_attention(qg, kg, vg, **kw).sum(),
                                (qg, kg, vg))

        def sdpa_fb():
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=sdpa_causal)
            torch.autograd.grad(out.sum(), (qg, kg, vg))
        shape = f"B{B} H{H} Lq{Lq} Lk{Lk} D{D}" + (" causal" if causal else "")
        for mode, fused, sdpa, reps in (("fwd", fused_fwd, sdpa_fwd, n),
                                        ("fwd+bwd", fused_fb, sdpa_fb, max(3, n // 3))):
            a, b = per_call_us(fused, reps), per_call_us(sdpa, reps)
            print(f"| {name} | {shape} | {mode} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    x = torch.randn(4, requires_grad=True)
    print(f"trivial (x * 2).sum() backward: "
          f"{per_call_us(lambda: (x * 2).sum().backward(), 2000):.0f} us")


if __name__ == "__main__":
    main()
