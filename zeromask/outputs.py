"""The allocator of every kernel output (a leaf module: the backend adapters and the Triton
launchers in ``zeromask.kernels`` both import it, and it imports nothing of zeromask)."""
from __future__ import annotations

import os

import torch


def new_output(shape, *, dtype, device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)`` for a kernel output; NaN-filled when
    the environment variable ``ZEROMASK_POISON`` is ``1``.

    Every kernel launcher allocates its outputs here, and the test suite sets
    ``ZEROMASK_POISON=1``, so an element a kernel forgets to write fails the comparison with
    the reference.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("ZEROMASK_POISON") == "1":
        out.fill_(float("nan"))
    return out


__all__ = ["new_output"]
