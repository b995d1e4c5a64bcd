"""zero_soft_attention on every kernel backend against the float64 reference: one grid.

Backend x case x dtype, each case's output and every gradient checked by
``cases.check_attention`` with the shared tolerance rule (``tests/tolerance.py``), outputs
NaN-poisoned (``ZEROMASK_POISON=1``). Backends: ``cpp`` where built, ``triton`` (compiled on
a GPU, else its CPU interpreter), ``cuda`` on a GPU. A backend that declines a case (its
``supports()``) is skipped with its reason, so a coverage gap shows in the report instead of
hiding in a per-backend table. Backend-specific checks (builds, thread splits, interpreter
quirks) stay in ``test_cpp.py``, ``test_triton.py`` and ``test_cuda_compile.py``.
"""
from __future__ import annotations

import pytest
import torch

from zeromask import dispatch, reference

from cases import (CASES, attention_case, case_named, check_attention, kernel_backends,
                   normalised_args)
from tolerance import assert_output_close

F32 = torch.float32


BACKENDS = kernel_backends()
IDS = [b for b, _ in BACKENDS]


def _skip_unless_supported(backend, case, dtype, device):
    why = dispatch.load(backend).supports("attention", normalised_args(case, dtype, device))
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_reference(backend, device, name):
    case, dtype = case_named(name)
    _skip_unless_supported(backend, case, dtype, device)
    check_attention(case, dtype, backend, device=device)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("drop", ["theta_q", "theta_k"])
@pytest.mark.parametrize("zero_mode", ["prob", "score", "hard"])
def test_rotary_on_one_side(backend, device, drop, zero_mode):
    """Cross-attention with the rotary (and its radius) on queries only or keys only."""
    case = attention_case(radius=True, zero_mode=zero_mode, causal=True, Lq=9, Lk=23)
    case.pop(drop)
    _skip_unless_supported(backend, case, F32, device)
    check_attention(case, F32, backend, device=device)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_explicit_positions_scale_and_float_theta(backend, device):
    g = torch.Generator().manual_seed(8)
    case = attention_case(Lq=9, Lk=17, rotary_dim=16, causal=True)
    case["pos_q"] = torch.randint(0, 400, (2, 9), generator=g).double()
    case["pos_k"] = torch.randint(0, 400, (2, 17), generator=g).double()
    case["theta_k"] = 8000.0
    case["sm_scale"] = 0.3
    check_attention(case, F32, backend, device=device)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("kw", [dict(), dict(causal=True, Lq=40, Lk=17),
                                dict(zero_mode="score", seqlens=True),
                                dict(zero_mode="hard", causal=True, zero_frac=0.5)],
                         ids=["prob", "cross_causal", "score_seqlens", "hard_causal"])
def test_saved_logsumexp_matches_reference(backend, device, kw):
    """The forward's saved row logsumexp (natural log): the reference's, -inf exactly on
    the empty rows (batch 1 with seqlens_k 0 in the seqlens case)."""
    case = attention_case(**kw)
    if "seqlens_k" in case:
        case["seqlens_k"] = torch.tensor([case["seqlens_k"][0].item(), 0])
    _skip_unless_supported(backend, case, F32, device)
    _, lse = dispatch.load(backend).attention_forward(normalised_args(case, F32, device))

    def ref_lse(dtype):
        a = normalised_args(case, dtype)
        return reference.zero_soft_attention_lse(a.q, a.k, **a.keywords()).double()
    want, same = ref_lse(torch.float64), ref_lse(F32)
    lse = lse.cpu().double()
    assert lse.shape == want.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want))
    live = torch.isfinite(want)
    assert live.any()
    assert_output_close("lse", lse[live], want[live], [same[live]], F32)
