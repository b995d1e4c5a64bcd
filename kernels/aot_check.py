"""Compile the Triton kernels for NVIDIA targets without a GPU (through ptxas).

The CPU interpreter checks the kernels' arithmetic but not what only the compiler checks:
loop-carried types, dot shapes, register/shared-memory fit. This module builds each kernel
for sm80 (Ampere) and sm90 (Hopper) with Triton's own toolchain, no driver needed::

    python -m zeromask.kernels.aot_check            # every variant below, ~2 minutes
    python -m zeromask.kernels.aot_check --quick    # one per kernel (the test suite's)

It must run with TRITON_INTERPRET unset (the interpreter replaces ``triton.jit``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_POINTERS = {
    # name -> dtype, "*" meaning the inputs' dtype
    "Q": "*", "K": "*", "V": "*", "O": "*", "DO": "*", "DQ": "*", "DK": "*", "DV": "*",
    "X": "*", "DY": "*", "Y": "*",
    "LSE": "fp32", "ZS": "fp32", "TQ": "fp32", "TK": "fp32", "PQ": "fp32", "PK": "fp32",
    "RAD": "fp32", "DELTA": "fp32", "DTK_PART": "fp32", "DRADK_PART": "fp32",
    "DZS_PART": "fp32", "DTQ_PART": "fp32", "DRADQ_PART": "fp32", "THETA": "fp32",
    "POS": "fp32", "DTHETA": "fp32", "DRAD_PART": "fp32", "KZ": "u8", "SEQK": "i32",
}
_FLOATS = {"sm_scale"}


def _source(fn, dtype: str, constexprs: dict):
    from triton.compiler import ASTSource
    # every constexpr must be given: one left out would compile as an i32 argument
    missing = [fn.arg_names[i] for i in fn.constexprs if fn.arg_names[i] not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: constexprs not given: {missing}")
    sig, consts = {}, {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
            consts[name] = constexprs[name]
        elif name in _POINTERS:
            sig[name] = "*" + (dtype if _POINTERS[name] == "*" else _POINTERS[name])
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return ASTSource(fn, sig, consts)


def _attention_constexprs(dtype, D, R, flags, block_m, block_n):
    from zeromask.kernels.common import pow2
    return dict(D=D, R=R, HALF_P=pow2(R // 2), REST_P=pow2(D - R), BLOCK_D=pow2(D),
                BLOCK_M=block_m, BLOCK_N=block_n, DOT_F32=False,
                PREC="ieee" if dtype == "fp32" else "tf32", EXACT_EXP=dtype == "fp32", **flags)


_ALL_ON = dict(HAS_KZ=True, ZERO_PROB=True, ZERO_HARD=False, CAUSAL=True, HAS_SEQ=True,
               ROT_Q=True, ROT_K=True, HAS_RAD=True, INTERLEAVED=False, HAS_REST=False)
_HARD = dict(_ALL_ON, ZERO_HARD=True)
_MIXED = dict(HAS_KZ=True, ZERO_PROB=False, ZERO_HARD=False, CAUSAL=False, HAS_SEQ=False,
              ROT_Q=False, ROT_K=True, HAS_RAD=False, INTERLEAVED=True, HAS_REST=True)
_PLAIN = dict(HAS_KZ=False, ZERO_PROB=True, ZERO_HARD=False, CAUSAL=False, HAS_SEQ=False,
              ROT_Q=False, ROT_K=False, HAS_RAD=False, INTERLEAVED=False, HAS_REST=False)


def variants(quick: bool):
    """(arch, kernel name, dtype, constexprs, num_warps, num_stages) to compile."""
    from zeromask.kernels import attention as A
    from zeromask.kernels import rotary as Ro
    from zeromask.kernels.common import pow2
    attn = [("fp16", 64, 64, _ALL_ON), ("bf16", 128, 128, _ALL_ON), ("fp32", 40, 24, _MIXED),
            ("bf16", 256, 256, _PLAIN), ("fp16", 128, 64, _MIXED), ("fp16", 64, 64, _HARD)]
    archs = (80,) if quick else (80, 90)
    if quick:
        attn = [("fp16", 40, 24, _ALL_ON)]
    out = []
    for arch in archs:
        for dtype, D, R, flags in attn:
            small = D > 128
            for fn, bm, bn, w, st in ((A._attn_fwd_kernel, 128, 64, 8, 3),
                                      (A._attn_bwd_dkdv_kernel, 64, 64, 4, 2),
                                      (A._attn_bwd_dq_kernel, 64, 64, 4, 2)):
                if small:
                    bm, bn = 64, 32
                out.append((arch, fn, dtype, _attention_constexprs(dtype, D, R, flags, bm, bn),
                            w, st))
        for dtype in (("fp16",) if quick else ("fp16", "bf16", "fp32")):
            for inter, bwd, R, D in ((False, False, 64, 64), (True, True, 24, 40)):
                c = dict(R=R, D=D, HALF_P=pow2(R // 2, 1), REST_P=pow2(D - R, 1), BLOCK_L=64,
                         INTERLEAVED=inter, HAS_RAD=True, HAS_REST=D > R, BACKWARD=bwd)
                out.append((arch, Ro._rotary_kernel, dtype, c, 4, 2))
        out.append((arch, A._attn_bwd_delta_kernel, "fp16",
                    dict(D=64, BLOCK_D=64, BLOCK_M=64), 4, 2))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one variant per kernel, sm80")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    fails = 0
    for arch, fn, dtype, consts, warps, stages in variants(args.quick):
        t = time.time()
        label = f"sm{arch} {fn.__name__} {dtype} " + " ".join(
            f"{k}={v}" for k, v in consts.items() if k in ("D", "R", "BLOCK_M", "BLOCK_N"))
        try:
            k = triton.compile(_source(fn, dtype, consts), target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=warps, num_stages=stages))
            print(f"ok   {label}  shared={k.metadata.shared}B  {time.time() - t:.1f}s",
                  flush=True)
        except Exception as exc:  # report every failure, then fail
            fails += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{fails} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
