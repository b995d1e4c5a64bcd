"""The one tolerance rule every kernel test uses.

A kernel's error against the float64 reference may be at most ``factor`` times the error of
the reference itself run in the kernel's dtype (PyTorch's own rounding for that dtype):
``factor`` 2 for outputs, 3 for gradients (flash-attention's rule). A floor of a few ulps
of the dtype, relative to the output's magnitude, keeps fp32 comparisons from failing on
summation order alone when the same-dtype error happens to be ~0.
"""
from __future__ import annotations

import torch

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
FLOOR_ULPS = 8.0


def error_bound(oracle: torch.Tensor, same_dtype, dtype: torch.dtype, factor: float) -> float:
    """``factor * |same_dtype - oracle|_max + FLOOR_ULPS * eps(dtype) * max(1, |oracle|_max)``.

    ``same_dtype`` may be a list of same-dtype runs (equivalent evaluation orders); the
    largest of their errors is the yardstick.
    """
    oracle = oracle.double()
    runs = same_dtype if isinstance(same_dtype, (list, tuple)) else [same_dtype]
    err_ref = max((r.double() - oracle).abs().max().item() for r in runs) \
        if oracle.numel() else 0.0
    scale = max(1.0, oracle.abs().max().item()) if oracle.numel() else 1.0
    return factor * err_ref + FLOOR_ULPS * torch.finfo(dtype).eps * scale


def assert_close(name: str, actual: torch.Tensor, oracle: torch.Tensor,
                 same_dtype: torch.Tensor, dtype: torch.dtype, factor: float) -> None:
    """Fail with a readable message unless ``actual`` is within the bound everywhere.

    NaN anywhere in ``actual`` fails (kernels' outputs are NaN-poisoned before launch, so an
    element that was never written shows up here).
    """
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    a = actual.double()
    assert not torch.isnan(a).any(), f"{name}: {int(torch.isnan(a).sum())} NaN elements (unwritten?)"
    bound = error_bound(oracle, same_dtype, dtype, factor)
    err = (a - oracle.double()).abs().max().item() if a.numel() else 0.0
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} ({dtype})"


def assert_output_close(name, actual, oracle, same_dtype, dtype):
    assert_close(name, actual, oracle, same_dtype, dtype, OUTPUT_FACTOR)


def assert_grad_close(name, actual, oracle, same_dtype, dtype):
    assert_close(name, actual, oracle, same_dtype, dtype, GRAD_FACTOR)
