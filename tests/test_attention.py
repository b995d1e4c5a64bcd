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

import os

import pytest
import torch

from zeromask import dispatch, reference

from cases import attention_case, check_attention, normalised_args
from tolerance import assert_output_close

GPU = torch.cuda.is_available()
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _backends():
    out = []
    for name in ("cpp", "triton", "cuda"):
        why = dispatch.available_backends().get(name)
        if why is not None:
            continue
        if name == "triton" and not GPU and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        device = "cpu" if name == "cpp" else "cuda" if GPU else "cpu"
        if name == "cuda" and not GPU:
            continue
        out.append((name, device))
    return out


BACKENDS = _backends()
IDS = [b for b, _ in BACKENDS]

#: name -> (attention_case kwargs, dtype). Shapes are small: the Triton interpreter runs them
CASES = {
    "prob": (dict(), F32),
    "prob-fp16": (dict(), F16),
    "prob-bf16": (dict(), BF16),
    "score": (dict(zero_mode="score"), F32),
    "score-causal-fp16": (dict(zero_mode="score", causal=True), F16),
    "causal": (dict(causal=True), F32),
    "causal-radius-fp16": (dict(causal=True, radius=True), F16),
    "causal-gqa4-bf16": (dict(causal=True, Hq=4, Hkv=1), BF16),
    "mha": (dict(Hq=3, Hkv=3), F32),
    "mqa": (dict(Hq=4, Hkv=1), F32),
    "seqlens": (dict(seqlens=True), F32),
    "seqlens-causal": (dict(seqlens=True, causal=True), F32),
    "seqlens-causal-score-fp16": (dict(seqlens=True, causal=True, zero_mode="score"), F16),
    "cross-lq5-lk131": (dict(Lq=5, Lk=131), F32),
    "cross-lq5-lk131-bf16": (dict(Lq=5, Lk=131), BF16),
    "cross-lq131-lk17": (dict(Lq=131, Lk=17), F32),
    "cross-lq17-lk5-score": (dict(Lq=17, Lk=5, zero_mode="score"), F32),
    "cross-causal-lq40-lk17": (dict(Lq=40, Lk=17, causal=True), F32),  # 23 empty rows
    "cross-causal-lq17-lk131": (dict(Lq=17, Lk=131, causal=True), F32),
    "lq1": (dict(Lq=1, Lk=17), F32),
    "lq1-causal-fp16": (dict(Lq=1, Lk=17, causal=True), F16),
    # a single key: softmax is exactly 1 and the exact dS is 0 (fp16: fp32's rounding of
    # dP - delta there is beyond a floor built for nonzero gradients)
    "lk1-fp16": (dict(Lq=17, Lk=1), F16),
    "l1-fp16": (dict(Lq=1, Lk=1, B=1, Hq=2, Hkv=1), F16),
    "l131": (dict(Lq=131, Lk=131, B=1, Hq=2, Hkv=1, D=16, seed=131), F32),
    "l131-causal": (dict(Lq=131, Lk=131, B=1, Hq=1, Hkv=1, D=16, causal=True, seed=131), F32),
    "l131-seqlens-k": (dict(Lq=17, Lk=131, Hq=2, Hkv=1, D=16, seqlens=True), F32),
    "d16-fp16": (dict(D=16), F16),
    "d40": (dict(D=40, Lq=33, Lk=70, seed=40), F32),
    "d40-bf16": (dict(D=40, B=1), BF16),
    "d64": (dict(D=64, Lq=33, Lk=70, seed=64), F32),
    "d128": (dict(D=128, B=1, Hq=2, Hkv=1), F32),
    "d128-causal-bf16": (dict(D=128, B=1, Hq=1, Hkv=1, causal=True), BF16),
    "d128-rot64-interleaved-fp16": (dict(D=128, B=1, Hq=2, Hkv=1, rotary_dim=64,
                                         interleaved=True, radius=True), F16),
    "d256": (dict(D=256, B=1, Hq=1, Hkv=1), F32),
    "no-rotary": (dict(rotary=False), F32),
    "radius": (dict(radius=True), F32),
    "rot16-of-d40": (dict(D=40, rotary_dim=16), F32),
    "interleaved-radius": (dict(interleaved=True, radius=True), F32),
    "interleaved-radius-bf16": (dict(interleaved=True, radius=True), BF16),
    "interleaved-rot32-of-d64-score": (dict(D=64, rotary_dim=32, interleaved=True,
                                            zero_mode="score"), F32),
    "all-zero-tokens": (dict(zero_frac=1.1), F32),
    "no-zero-tokens": (dict(zero_frac=0.0), F32),
    "tiny-zero-scale": (dict(zero_scale=1e-6), F32),
    "scale-one-score": (dict(zero_scale=1.0, zero_mode="score"), F32),
    "hard": (dict(zero_mode="hard"), F32),
    # zero keys first in some rows' view: the rows that see only zero tokens are empty
    "hard-causal-seqlens-fp16": (dict(zero_mode="hard", causal=True, seqlens=True,
                                      zero_frac=0.5), F16),
    "hard-cross-causal": (dict(zero_mode="hard", Lq=40, Lk=17, causal=True, zero_frac=0.4),
                          F32),
    "hard-all-zero-tokens": (dict(zero_mode="hard", zero_frac=1.1), F32),
}


def _case(name):
    kwargs, dtype = CASES[name]
    case = attention_case(**kwargs)
    if kwargs.get("zero_frac") == 0.0:
        # no key_zero at all (the kernels' no-zero-token path): zero_scale then has no
        # gradient, so it is left at its default float
        case.pop("key_zero")
        case.pop("zero_scale")
    return case, dtype


def _skip_unless_supported(backend, case, dtype, device):
    why = dispatch.load(backend).supports("attention", normalised_args(case, dtype, device))
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_reference(backend, device, name):
    case, dtype = _case(name)
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
