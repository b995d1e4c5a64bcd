"""Faults found by outside testing (issue 12): the right value of each kind, every backend.

* NaN and inf are never hidden: where the float64 reference's output (or a gradient) is
  NaN, every backend's is NaN, and everywhere else it is close to the reference.
* Slots at or past ``seqlens_k`` are never read: NaN there changes nothing, bit for bit,
  and their gradients are exactly 0.
* ``zero_scale`` below float32's smallest normal is refused on every backend (it would
  underflow in the kernels); at that smallest value a row of zero tokens is still an
  ordinary row.

Backends: the reference, ``cpp`` where built, Triton (its interpreter without a GPU).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import zeromask
from zeromask import dispatch
from zeromask.ops import MIN_ZERO_SCALE

from cases import attention_case, normalised_args
from tolerance import assert_output_close

GPU = torch.cuda.is_available()


def _backends():
    out = []
    for name, reason in dispatch.available_backends().items():
        if name == "cuda" and not GPU:
            continue
        if name == "triton" and not GPU and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "no GPU and TRITON_INTERPRET is not 1"
        out.append(pytest.param(name, marks=pytest.mark.skipif(
            reason is not None, reason=f"{name}: {reason}")))
    return out


BACKENDS = _backends()
DIFF = ("q", "k", "v", "theta_q", "theta_k", "zero_scale")


def _device(backend: str) -> str:
    return "cuda" if GPU and backend != "cpp" else "cpu"


def _call(case: dict, backend: str, dtype=torch.float32):
    """Output and gradients of every float input (sum of out * a fixed random dout)."""
    dev = _device(backend)
    args = {}
    for key, value in case.items():
        if torch.is_tensor(value):
            value = value.to(dev)
            if value.is_floating_point():
                value = value.to(dtype if key in ("q", "k", "v") else
                                 (torch.float64 if dtype == torch.float64 else torch.float32))
                value = value.detach().requires_grad_(key in DIFF)
        args[key] = value
    out = zeromask.zero_soft_attention(backend=backend, **args)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dev, out.dtype)
    leaves = {n: args[n] for n in DIFF if torch.is_tensor(args.get(n))}
    grads = torch.autograd.grad(out, list(leaves.values()), dout, allow_unused=True)
    return out.detach().cpu(), {n: (gr.cpu() if gr is not None else None)
                                for n, gr in zip(leaves, grads)}


def _plain_case(**kw) -> dict:
    kw.setdefault("zero_scale", 0.05)
    case = attention_case(**kw)
    case["rotary_dim"] = case.get("rotary_dim")
    return {k: v for k, v in case.items() if v is not None}


# --------------------------------------------------------------------------------------
# NaN / inf propagate exactly as in the reference
# --------------------------------------------------------------------------------------
def _poison_nan_key(c):
    c["k"][0, 0, 3, 5] = float("nan")


def _poison_nan_query(c):
    c["q"][1, 2, 4, 0] = float("nan")


def _poison_nan_value(c):
    c["v"][0, 1, 3, 2] = float("nan")  # key 3: causally masked for rows 0-2


def _poison_inf_key(c):
    c["k"][1, 1, 2, 7] = float("inf")


def _poison_overflow(c):
    # logits beyond float32, one sign per row so that the overflow is +inf or -inf whatever
    # the summation order (and no rotary to mix the signs): head 3's rows 0-3 overflow to
    # +inf on every key (softmax inf - inf: NaN); rows 4-8 to -inf on every key (not an
    # empty row: NaN too, where a kernel could pass it off as a row with no keys)
    for key in ("theta_q", "theta_k", "rotary_dim", "interleaved", "radius"):
        c.pop(key, None)
    c["k"][0, 1] = c["k"][0, 1].abs() * 1e20
    c["q"][0, 3, :4] = c["q"][0, 3, :4].abs() * 1e20
    c["q"][0, 3, 4:] = -c["q"][0, 3, 4:].abs() * 1e20


POISONS = {"nan_key": _poison_nan_key, "nan_query": _poison_nan_query,
           "nan_value": _poison_nan_value, "inf_key": _poison_inf_key,
           "overflow": _poison_overflow}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("kw", [dict(), dict(causal=True, zero_mode="score"),
                                dict(rotary=False, zero_frac=0.0),
                                dict(causal=True, zero_mode="hard", zero_frac=0.3)],
                         ids=["prob", "causal_score", "plain", "causal_hard"])
def test_nan_and_inf_are_never_hidden(backend, poison, kw):
    case = _plain_case(B=2, Hq=4, Hkv=2, Lq=9, Lk=9, D=16, **kw)
    POISONS[poison](case)
    # NaN and inf are float32 facts (1e40 overflows only there): the pattern to match is
    # the reference's in float32; the finite values are checked against float64
    ref_out, ref_g = _call(case, "reference", torch.float32)
    assert torch.isnan(ref_out).any(), "the poison must reach the reference's output"
    out, grads = _call(case, backend)
    nan = torch.isnan(out)
    want = torch.isnan(ref_out)
    # exactly the reference's NaN for NaN in q or k: none hidden, none made up. A NaN
    # value reaches the rows that attend its key; in a causal tile a kernel's P V may also
    # multiply it by the exact 0 of a row that cannot see it (the reference does not)
    exact = poison in ("nan_key", "nan_query") or (poison == "nan_value" and
                                                   not case.get("causal"))
    if exact:
        assert torch.equal(nan, want), (
            f"{backend}: NaN in {int(nan.sum())} output elements, the reference has "
            f"{int(want.sum())}")
    else:
        # inf inputs: inf - inf appears in more or fewer places depending on the algebra
        # (the rotary's form, FMA), so a backend may give NaN in more places, never fewer
        assert not (want & ~nan).any(), (
            f"{backend}: {int((want & ~nan).sum())} output elements are NaN in the "
            "reference but not here (hidden)")
    oracle, _ = _call(case, "reference", torch.float64)
    if poison == "overflow":
        oracle = ref_out.double()  # out of float32's range: float32 is the spec here
    assert_output_close("out (finite part)", out[~nan], oracle[~nan], ref_out[~nan],
                        torch.float32)
    # gradients: NaN in a gradient exactly when the reference's has NaN (which elements
    # depends on the order of 0 x NaN products, so this is judged per tensor)
    for name, g in ref_g.items():
        if g is None:
            continue
        assert grads[name] is not None, f"{backend}: no gradient for {name}"
        got, ref_nan = bool(torch.isnan(grads[name]).any()), bool(torch.isnan(g).any())
        if exact:
            assert got == ref_nan, f"{backend}: d{name} has NaN: {got}, the reference: {ref_nan}"
        else:
            assert got or not ref_nan, f"{backend}: d{name} hides the reference's NaN"


# --------------------------------------------------------------------------------------
# seqlens_k: slots past a row's length are never read
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(Hq=4, Hkv=1, zero_mode="score"),
                                dict(Lq=1, Lk=70), dict(Lq=5, Lk=150, zero_frac=1.0),
                                dict(causal=True, zero_mode="hard", zero_frac=0.4)],
                         ids=["self", "causal", "mqa_score", "decode_step", "cross_all_zero",
                              "causal_hard"])
def test_slots_past_seqlens_k_are_never_read(backend, kw):
    B = 3
    case = _plain_case(B=B, **dict(dict(Hq=4, Hkv=2, Lq=11, Lk=11, D=16), **kw))
    Lk = case["k"].shape[2]
    case["seqlens_k"] = torch.tensor([2, Lk, max(1, Lk // 3)], dtype=torch.int64)
    clean_out, clean_g = _call(case, backend)
    dirty = dict(case)
    for name in ("k", "v"):
        t = case[name].clone()
        for b, n in enumerate(case["seqlens_k"].tolist()):
            t[b, :, n:] = float("nan")
        dirty[name] = t
    dirty["theta_k"] = case["theta_k"].clone()
    for b, n in enumerate(case["seqlens_k"].tolist()):
        dirty["theta_k"][b, n:] = 1e4  # any valid theta: those slots must not matter
    out, grads = _call(dirty, backend)
    assert torch.equal(out, clean_out), f"{backend}: output changed with NaN past seqlens_k"
    for name in ("q", "theta_q", "zero_scale"):
        if clean_g[name] is None:  # hard mode: no gradient reaches zero_scale
            assert grads[name] is None and kw.get("zero_mode") == "hard", name
            continue
        assert torch.equal(grads[name], clean_g[name]), f"{backend}: d{name} changed"
    for name, dim in (("k", 2), ("v", 2), ("theta_k", 1)):
        g = grads[name]
        for b, n in enumerate(case["seqlens_k"].tolist()):
            past = g[b, :, n:] if dim == 2 else g[b, n:]
            assert torch.equal(past, torch.zeros_like(past)), (
                f"{backend}: d{name} past seqlens_k of row {b} is not exactly 0")
            within = g[b, :, :n] if dim == 2 else g[b, :n]
            ref_within = clean_g[name][b, :, :n] if dim == 2 else clean_g[name][b, :n]
            assert torch.equal(within, ref_within), f"{backend}: d{name} changed within length"


def test_reference_never_reads_past_seqlens_k():
    """The spec itself: the float64 reference is unchanged by NaN past the lengths."""
    case = _plain_case(B=2, Hq=2, Hkv=2, Lq=6, Lk=6, D=8)
    case["seqlens_k"] = torch.tensor([3, 6])
    clean, _ = _call(case, "reference", torch.float64)
    case["k"] = case["k"].clone()
    case["k"][0, :, 3:] = float("nan")
    dirty, grads = _call(case, "reference", torch.float64)
    assert torch.equal(clean, dirty)
    assert torch.equal(grads["k"][0, :, 3:], torch.zeros_like(grads["k"][0, :, 3:]))


# --------------------------------------------------------------------------------------
# zero_scale: one representable range on every backend
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-46, 1e-40, MIN_ZERO_SCALE / 2])
def test_zero_scale_that_underflows_is_refused(backend, scale):
    case = _plain_case(B=1, Hq=2, Hkv=2, Lq=4, Lk=4, D=8)
    case["zero_scale"] = scale
    with pytest.raises(ValueError, match="smallest normal"):
        _call(case, backend)
    case["zero_scale"] = torch.tensor(scale, dtype=torch.float64)
    with pytest.raises(ValueError, match="smallest normal|\\(0, 1\\]"):
        _call(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_mode", ["prob", "score"])
def test_all_zero_keys_at_the_smallest_scale_are_an_ordinary_row(backend, zero_mode):
    """docs/design.md 3.3: keys that are all zero tokens share one factor, so the row is plain
    attention (prob mode) or attention on scaled logits (score mode), never empty."""
    case = _plain_case(B=2, Hq=2, Hkv=2, Lq=5, Lk=7, D=16, rotary=False, zero_frac=1.0,
                       zero_mode=zero_mode)
    case["zero_scale"] = MIN_ZERO_SCALE
    out, _ = _call(case, backend)
    plain = {k: v for k, v in case.items() if k not in ("key_zero", "zero_scale")}
    if zero_mode == "score":
        plain["sm_scale"] = MIN_ZERO_SCALE * case["q"].shape[-1] ** -0.5
    oracle, _ = _call(plain, "reference", torch.float64)
    same, _ = _call(plain, "reference", torch.float32)
    # prob mode adds ln(s) = -87.3 to every logit: float32 keeps ~6 fewer bits of them
    tol = 0 if zero_mode == "score" else 2e-5
    err = (out.double() - oracle).abs().max().item()
    assert not torch.isnan(out).any() and not (out == 0).all(dim=-1).any()
    assert err <= max(tol, 2 * (same.double() - oracle).abs().max().item() + 1e-6), err


def test_learnable_zero_scale_stays_a_normal_float():
    attn = zeromask.ZeroSoftAttention(16, 2, learnable_zero_scale=True, batch_first=True)
    with torch.no_grad():
        attn.zero_scale_log.fill_(-500.0)
    s = attn.zero_scale
    assert s.item() >= MIN_ZERO_SCALE
    x = torch.randn(2, 5, 16)
    y = attn(x, x, x, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))[0]
    assert torch.isfinite(y).all() and (y.abs().sum(-1) > 0).all()


def test_module_refuses_a_scale_below_float32():
    with pytest.raises(ValueError, match="smallest normal"):
        zeromask.ZeroSoftAttention(16, 2, zero_scale=1e-40)
    s = zeromask.ZeroSoftAttention(16, 2, zero_scale=MIN_ZERO_SCALE).zero_scale.item()
    assert MIN_ZERO_SCALE <= s and math.isclose(s, MIN_ZERO_SCALE, rel_tol=0.02)


# --------------------------------------------------------------------------------------
# valid input accepted, invalid input refused naming the argument (items 6-7)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1, 3, 7, 257])
def test_odd_head_dims_without_rotary(backend, D):
    case = _plain_case(B=2, Hq=2, Hkv=1, Lq=5, Lk=6, D=D, rotary=False)
    why = dispatch.load(backend).supports("attention", normalised_args(case))
    if why is not None:
        pytest.skip(why)
    out, grads = _call(case, backend)
    oracle, ograds = _call(case, "reference", torch.float64)
    same, _ = _call(case, "reference", torch.float32)
    assert_output_close("out", out, oracle, same, torch.float32)
    for name in ("q", "k", "v"):
        assert (grads[name].double() - ograds[name]).abs().max() < 1e-4


def test_module_with_odd_head_dim_and_bad_sizes():
    attn = zeromask.ZeroSoftAttention(21, 3, batch_first=True)  # head dim 7
    x = torch.randn(2, 4, 21)
    ref = torch.nn.MultiheadAttention(21, 3, batch_first=True)
    ref.load_state_dict({k: v for k, v in attn.state_dict().items() if k in ref.state_dict()})
    torch.testing.assert_close(attn(x, x, x)[0], ref(x, x, x, need_weights=False)[0],
                               rtol=1e-5, atol=1e-5)
    for kw, name in ((dict(embed_dim=64, num_heads=0), "num_heads"),
                     (dict(embed_dim=0, num_heads=1), "embed_dim"),
                     (dict(embed_dim=64, num_heads=4, num_kv_heads=0), "num_kv_heads")):
        with pytest.raises(ValueError, match=name):
            zeromask.ZeroSoftAttention(**kw)


@pytest.mark.parametrize("make, exc, match", [
    (lambda q: zeromask.zero_soft_attention(q[..., :0], q[..., :0], q[..., :0]),
     ValueError, "head dim >= 1"),
    (lambda q: zeromask.zero_soft_attention(q, q, q, theta_q=1e300, theta_k=1e300),
     ValueError, "theta_q must be a finite float in"),
    (lambda q: zeromask.zero_soft_attention(q, q, q, theta_q=torch.full((2, 5), 1e300,
                                                                        dtype=torch.float64)),
     ValueError, "theta_q must be below"),
    (lambda q: zeromask.zero_soft_attention(q, q, q, pos_q=torch.arange(5)),
     ValueError, "pos_q was given but theta_q is None"),
    (lambda q: zeromask.zero_soft_attention(q, q, q, theta_k=500.0, pos_k=torch.arange(5) > 2),
     TypeError, "pos_k must be an int offset or an integer/float tensor"),
    (lambda q: zeromask.zero_soft_attention(q, q, q, theta_q=500.0, theta_k=500.0,
                                            radius=torch.ones(4, dtype=torch.int64)),
     TypeError, "radius must be a floating tensor"),
    (lambda q: zeromask.zero_soft_attention(q, q, q, rotary_dim=4),
     ValueError, "rotary_dim was given but no theta"),
    (lambda q: zeromask.f0_rotary(q, 1e300), ValueError, "theta must be a finite float in"),
    (lambda q: zeromask.f0_rotary(q, 500.0, positions=torch.full((5,), 1e18)),
     ValueError, "positions must be within"),
    (lambda q: zeromask.f0_rotary(q, 500.0, positions=2 ** 24 - 3), ValueError, "exceed"),
])
def test_bad_input_is_refused_naming_the_argument(make, exc, match):
    q = torch.randn(2, 2, 5, 8)
    with pytest.raises(exc, match=match):
        make(q)


def test_f0_rotary_module_edge_lengths():
    rot = zeromask.F0Rotary()
    assert rot(torch.full((2, 9), 120.0), length=0).shape == (2, 0)
    assert rot(None, length=0, batch=3).shape == (3, 0)
    with pytest.raises(ValueError, match="empty contour"):
        rot(torch.zeros(2, 0), length=5)
    with pytest.raises(ValueError, match="length must be an int >= 0"):
        rot(None, length=-1)


# --------------------------------------------------------------------------------------
# GPU readiness: value checks never synchronise with a device unless asked (item 17)
# --------------------------------------------------------------------------------------
def test_value_checks_run_on_cpu_tensors_and_on_device_tensors_only_on_request():
    from zeromask import ops
    cpu, meta = torch.empty(2), torch.empty(2, device="meta")  # meta: any non-CPU device
    assert ops._check_values(cpu) and not ops._check_values(meta)
    try:
        zeromask.set_value_checks(True)
        assert ops._check_values(meta)
    finally:
        zeromask.set_value_checks(False)
    assert not ops._check_values(meta)
    with pytest.raises(ValueError, match="theta_q must be > 1"):  # CPU: still checked
        q = torch.randn(1, 1, 3, 8)
        zeromask.zero_soft_attention(q, q, q, theta_q=torch.full((1, 3), 0.5), theta_k=500.0)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_module_forward_on_cuda_never_synchronises():
    attn = zeromask.ZeroSoftAttention(64, 4, batch_first=True, learnable_zero_scale=True,
                                      rotary=zeromask.F0Rotary()).cuda()
    x = torch.randn(2, 50, 64, device="cuda")
    zero = torch.rand(2, 50, device="cuda") < 0.2
    f0 = 100 + 100 * torch.rand(2, 50, device="cuda")
    attn(x, x, x, key_padding_mask=zero, f0=f0)  # warm-up: backend choice, compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attn(x, x, x, key_padding_mask=zero, f0=f0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------
# determinism: results independent of the thread count (item 8)
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(dispatch.available_backends().get("cpp") is not None,
                    reason="the cpp backend is not built")
@pytest.mark.parametrize("kw", [dict(Hq=8, Hkv=1), dict(B=1, Hq=4, Hkv=2, causal=True)],
                         ids=["mqa", "gqa_causal"])
def test_cpp_is_bitwise_independent_of_threads_when_deterministic(kw):
    case = _plain_case(**dict(dict(B=1, Lq=70, Lk=70, D=32), **kw))
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    runs = []
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_call(case, "cpp"))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    (out0, g0), rest = runs[0], runs[1:]
    for out, g in rest:
        assert torch.equal(out, out0)
        for name in g0:
            assert torch.equal(g[name], g0[name]), name


# --------------------------------------------------------------------------------------
# rotary angles: one precision rule (docs/design.md 3.1), the reference the most accurate
# --------------------------------------------------------------------------------------
ANGLE_POSITIONS = [0, 1, 7, 1000, 65_535, 65_536, 1_000_003, 4_194_301, 2 ** 24 - 1]


def _exact_rotation(x, theta, pos):
    """float64 rotation of float64 x with angles from float64 theta and positions (each
    input already rounded to float32 as the backends receive it): the value to match."""
    R = x.shape[-1]
    i = torch.arange(R // 2, dtype=torch.float64)
    phi = pos.double()[:, None] * theta.double()[:, None] ** (-2.0 * i / R)
    c, s = torch.cos(phi), torch.sin(phi)
    xa, xb = x[..., : R // 2], x[..., R // 2:]
    return torch.cat((xa * c - xb * s, xa * s + xb * c), -1), phi


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_angles_meet_one_precision_rule_up_to_2_pow_24(backend):
    """Every backend: |error of each rotated pair| <= |x| (2**-22 |phi| + 2**-21), i.e. the
    angle carries at most float32's rounding of ``w`` and of ``pos * w`` (the kernels that
    form it in float32), then cos/sin to float32. The reference forms it in float64, so its
    error is float32's output rounding alone, at every position (issue 12 item 4: the
    backends differed by 7e-4 at position 65k, and the spec was no better than a kernel)."""
    g = torch.Generator().manual_seed(3)
    L, D = len(ANGLE_POSITIONS), 16
    x = torch.randn(1, 2, L, D, generator=g)
    theta = (800 + 9200 * torch.rand(L, generator=g)).float()
    pos = torch.tensor(ANGLE_POSITIONS, dtype=torch.float32)
    want, phi = _exact_rotation(x.double(), theta, pos)
    dev = _device(backend)
    got = zeromask.f0_rotary(x.to(dev), theta.to(dev), positions=pos.to(dev),
                             backend=backend).cpu().double()
    err = (got - want).abs()
    norm = torch.cat([x[..., : D // 2].double().hypot(x[..., D // 2:].double())] * 2, -1)
    bound = norm * (2.0 ** -22 * torch.cat([phi, phi], -1).abs() + 2.0 ** -21)
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{backend}: error {worst:.2f}x the bound"
    if backend == "reference":  # float64 angles: only the float32 output rounding is left
        assert (err <= norm * 2.0 ** -22).all(), err.max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_rotary_at_large_positions_is_close_to_the_exact_angles(backend):
    """Inside attention too: scores of rotated q and k at positions near 2**20 and 2**24
    follow the float64 angles within the rule's bound (a relative angle error of 2**-22
    moves a score by at most |q| |k| 2**-22 (|phi_q| + |phi_k|))."""
    g = torch.Generator().manual_seed(4)
    L, D = 4, 8
    q, k, v = (torch.randn(1, 1, L, D, generator=g) for _ in range(3))
    theta = torch.full((L,), 10000.0)
    dev = _device(backend)
    for start in (2 ** 20, 2 ** 24 - L):
        pos = torch.arange(start, start + L, dtype=torch.float32)
        out = zeromask.zero_soft_attention(q.to(dev), k.to(dev), v.to(dev),
                                           theta_q=theta.to(dev), theta_k=theta.to(dev),
                                           pos_q=pos.to(dev), pos_k=pos.to(dev),
                                           backend=backend).cpu().double()
        qr, phi = _exact_rotation(q.double(), theta, pos)
        kr, _ = _exact_rotation(k.double(), theta, pos)
        s = (qr @ kr.transpose(-1, -2)) * D ** -0.5
        want = torch.softmax(s, -1) @ v.double()
        ds = (q.norm(dim=-1).double()[..., :, None] * k.norm(dim=-1).double()[..., None, :]
              * D ** -0.5 * 2.0 ** -22 * 2 * phi.abs().max())
        # a softmax moves by at most the largest score change, times |v|
        tol = ds.max().item() * 2 * v.abs().max().item() + 1e-5
        assert (out - want).abs().max().item() <= tol, (backend, start)
