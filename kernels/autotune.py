"""Autotune configurations for the attention kernels (Ampere and Hopper), pruned by head dim
and shared memory; one small fixed configuration under the interpreter.

Block names are the same in every kernel: ``BLOCK_M`` query rows, ``BLOCK_N`` key rows.
"""
from __future__ import annotations

import functools

import triton

from .common import interpreting

#: the one configuration used by the CPU interpreter (tests): small tiles, fast in numpy
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16)

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Ampere (sm80/86/89) favours 64-128 x 64 tiles
# with 2-3 stages; Hopper (sm90) takes the larger 128 x 128 tiles with 8 warps.
_FWD = [
    (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
    (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 4, 2), (32, 32, 4, 2),
    (32, 16, 2, 2), (16, 16, 2, 1),
]
_BWD = [
    (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (32, 128, 4, 2), (64, 32, 4, 2),
    (32, 64, 4, 2), (32, 32, 4, 1), (16, 32, 2, 1), (16, 16, 2, 1),
]


def _configs(table):
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
            for m, n, w, s in table]


FWD_CONFIGS = _configs(_FWD)
BWD_CONFIGS = _configs(_BWD)


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # pragma: no cover - no driver (interpreter) or an unusual one
        return 96 * 1024


def _elt_size(nargs) -> int:
    q = nargs.get("Q")
    return q.element_size() if q is not None and hasattr(q, "element_size") else 2


def _device_index(nargs) -> int:
    q = nargs.get("Q")
    try:
        return q.device.index or 0
    except AttributeError:
        return 0


def _prune(configs, nargs, backward: bool, **kwargs):
    """Drop configs whose tiles exceed shared memory or registers for this head dim."""
    D = int(nargs.get("BLOCK_D", kwargs.get("BLOCK_D", 64)))
    elt = _elt_size(nargs)
    limit = _smem_limit(_device_index(nargs))
    kept = []
    for c in configs:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        stages = max(1, c.num_stages)
        if backward:
            # q, do tiles per stage plus the resident k, v tiles; fp32 dk, dv accumulators
            smem = elt * D * (stages * 2 * m + 2 * n) + 4 * m * n
            regs = 4 * D * (2 * n + m)  # accumulators + one q-side tile, bytes per CTA
        else:
            smem = elt * D * (m + stages * 2 * n)
            regs = 4 * D * m
        if smem > limit:
            continue
        # register pressure: accumulators over ~64 KiB per CTA spill badly
        if regs > 64 * 1024 * (c.num_warps // 4 or 1):
            continue
        if D > 128 and m * n > 64 * 64:
            continue
        kept.append(c)
    if not kept:  # the smallest config always fits in practice; never return nothing
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return kept


def prune_fwd(configs, nargs, **kwargs):
    return _prune(configs, nargs, False, **kwargs)


def prune_bwd(configs, nargs, **kwargs):
    return _prune(configs, nargs, True, **kwargs)


def tuned(kernel, backward: bool):
    """The autotuned wrapper of ``kernel`` (compiled runs); keyed on rounded lengths."""
    return triton.autotune(
        configs=BWD_CONFIGS if backward else FWD_CONFIGS,
        key=["TUNE_LQ", "TUNE_LK", "BLOCK_D", "R", "CAUSAL", "ROT_Q", "ROT_K"],
        prune_configs_by={"early_config_prune": prune_bwd if backward else prune_fwd},
    )(kernel)


def use_autotune() -> bool:
    return not interpreting()
