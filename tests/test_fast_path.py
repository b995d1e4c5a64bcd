"""The CPU fast path (csrc/cpu/fast_path.cpp via ``zeromask.ops``) against the checked path.

The fast path takes an eager CPU call with nothing to differentiate in one C++ function and
declines (returns None for) every call that is not of a plain, valid kind, which then runs
ops.py's checked path. So: every call it takes must give the checked path's output bit for
bit, and every call the checked path rejects must be declined (the error then comes from
ops.py, naming the argument).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zeromask
from zeromask import dispatch, ops, reference

from cases import CASES, case_named
from tolerance import assert_output_close

pytestmark = pytest.mark.skipif(dispatch.available_backends()["cpp"] is not None,
                                reason="needs the cpp backend")

ARGS = ("key_zero", "zero_scale", "zero_mode", "causal", "sm_scale", "seqlens_k", "theta_q",
        "theta_k", "pos_q", "pos_k", "rotary_dim", "interleaved", "radius")
DEFAULTS = dict(key_zero=None, zero_scale=1e-6, zero_mode="prob", causal=False,
                sm_scale=None, seqlens_k=None, theta_q=None, theta_k=None, pos_q=None,
                pos_k=None, rotary_dim=None, interleaved=False, radius=None)


def fast(q, k, v, backend=None, **kw):
    """The fast path alone: the output, or None where it declines the call."""
    kw = dict(DEFAULTS, **kw)
    return dispatch.fast_path("cpu")(q, k, v, *(kw[n] for n in ARGS), backend)


def checked(monkeypatch, q, k, v, **kw):
    """zero_soft_attention without its fast path: ops.py's checks, then the kernel."""
    with monkeypatch.context() as m:
        m.setattr(ops, "_fast_attention", None)
        return zeromask.zero_soft_attention(q, k, v, **kw)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        torch.nan_to_num(a.float(), nan=7.5), torch.nan_to_num(b.float(), nan=7.5)) and \
        torch.equal(a.isnan(), b.isnan())


def inputs(name):
    case, dtype = case_named(name)
    q, k, v = (case.pop(n).to(dtype) for n in "qkv")
    return q, k, v, case, dtype


@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_gives_the_checked_paths_output_bit_for_bit(name, monkeypatch):
    """Every case of the kernel grid, under no_grad: the fast path takes it (except a
    radius, which it leaves to the checked path), its output is the checked path's, and
    both match the float64 reference by the shared tolerance rule."""
    q, k, v, kw, dtype = inputs(name)
    with torch.no_grad():
        got = fast(q, k, v, **kw)
        want = checked(monkeypatch, q, k, v, **kw)
        public = zeromask.zero_soft_attention(q, k, v, **kw)
        if "radius" in kw:
            assert got is None
            return
        assert got is not None, "the fast path declined a plain call"
        assert same(got, want) and same(public, want)
        a64, own = (ops._normalise_call(*(t.to(dt) for t in (q, k, v)), **kw)
                    for dt in (torch.float64, dtype))
        oracle = reference.zero_soft_attention(a64.q, a64.k, a64.v, **a64.keywords())
        own = reference.zero_soft_attention(own.q, own.k, own.v, **own.keywords())
    assert_output_close("out", got, oracle, [own], dtype)


def _grads(run, q, k, v, kw):
    """out and the gradients of every differentiable input (q, k, v, theta_q, theta_k,
    zero_scale) of one call, from fresh leaves."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in
              dict(q=q, k=k, v=v, **kw).items()
              if torch.is_tensor(t) and t.is_floating_point() and n != "radius"}
    args = dict(kw, **{n: t for n, t in leaves.items() if n not in "qkv"})
    out = run(leaves["q"], leaves["k"], leaves["v"], **args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), dout, allow_unused=True)
    return out.detach(), out.grad_fn, dict(zip(leaves, grads))


@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_gradients_are_the_checked_paths_bit_for_bit(name, monkeypatch):
    """With inputs that require grad the fast path runs its C++ autograd Function: output
    and every gradient equal the checked path's (whose gradients test_attention.py holds
    to the float64 reference)."""
    q, k, v, kw, dtype = inputs(name)
    out, fn, grads = _grads(zeromask.zero_soft_attention, q, k, v, kw)
    want_out, want_fn, want = _grads(lambda *a, **k: checked(monkeypatch, *a, **k), q, k, v, kw)
    assert type(fn).__name__ == "CppFunction" or "radius" in kw  # the C++ Function ran
    assert type(want_fn).__name__ != "CppFunction"
    assert same(out, want_out)
    assert set(grads) == set(want)
    for n in grads:
        assert (grads[n] is None) == (want[n] is None), n
        if grads[n] is not None:
            assert same(grads[n], want[n]), n


@pytest.mark.parametrize("name", [n for n in CASES if "radius" not in case_named(n)[0]])
def test_a_fixed_zero_scale_skips_its_gradient_and_changes_no_other(name, monkeypatch):
    """Only q, k, v require grad (zero_scale a fixed tensor or float, as in the speech
    model): the C++ backward skips prob mode's sums for d ln s, and dq, dk, dv are bitwise
    those of the checked path, which computes every gradient."""
    q, k, v, kw, dtype = inputs(name)
    kw = dict(kw, zero_scale=torch.tensor(float(kw.get("zero_scale", 1e-6))))
    got, want = ([t.detach().clone().requires_grad_() for t in (q, k, v)] for _ in range(2))
    out = zeromask.zero_soft_attention(*got, **kw)
    assert type(out.grad_fn).__name__ == "CppFunction"
    ref = checked(monkeypatch, *want, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    for g, w in zip(torch.autograd.grad(out, got, dout), torch.autograd.grad(ref, want, dout)):
        assert same(g, w)


class Subclass(torch.Tensor):
    pass


def test_calls_it_does_not_take_run_the_checked_path(monkeypatch):
    """Valid calls outside the fast path's kinds are declined and still give the checked
    path's result: a radius, a positions tensor, another
    backend (argument or environment), a tensor subclass, a non-contiguous last dim,
    float64, a numpy scalar, a non-bool flag, an int8 seqlens_k, a dispatch mode."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    theta = 100 + 900 * torch.rand(2, 5, generator=g)
    base = dict(key_zero=torch.rand(2, 5, generator=g) < 0.3, theta_q=theta, theta_k=theta)
    assert fast(q, k, v, **base) is not None  # the plain call itself is taken, and with
    assert fast(torch.nn.Parameter(q), k, v, **base) is not None  # a parameter (a plain kind)
    variants = [
        ((q, k, v), dict(radius=torch.full((4,), 0.9))),
        ((q, k, v), dict(pos_q=torch.arange(5.0))),
        ((q, k, v), dict(backend="reference")),
        ((q.as_subclass(Subclass), k, v), {}),
        ((torch.randn(2, 2, 5, 16, generator=g)[..., ::2], k, v), {}),
        ((q.double(), k.double(), v.double()), {}),
        ((q, k, v), dict(zero_scale=np.float64(1e-3))),
        ((q, k, v), dict(causal=1)),
        ((q, k, v), dict(seqlens_k=torch.tensor([3, 5], dtype=torch.int8))),
    ]
    for (qq, kk, vv), over in variants:
        kw = dict(base, **over)
        backend = kw.pop("backend", None)
        assert fast(qq, kk, vv, backend=backend, **kw) is None, sorted(over)
        out = zeromask.zero_soft_attention(qq, kk, vv, backend=backend, **kw)
        want = checked(monkeypatch, qq, kk, vv, backend=backend, **kw)
        assert same(out.detach(), want.detach())
    monkeypatch.setenv("ZEROMASK_BACKEND", "reference")
    assert fast(q, k, v, **base) is None
    monkeypatch.setenv("ZEROMASK_BACKEND", "cpp")
    assert fast(q, k, v, **base) is not None
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with Seen():
        assert fast(q, k, v, **base) is None


def _fuzz_call(rng: np.random.Generator):
    """A random call: each argument valid, of one of its kinds, or (one time in ten) of a
    kind or value the checked path rejects or the fast path does not take."""
    B, Hkv = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    Hq = Hkv * int(rng.integers(1, 3))
    Lq, Lk = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    D = 1 if rng.random() < 0.03 else int(rng.choice([2, 6, 8, 16]))  # 1: no even rotary
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    t = lambda *s: torch.from_numpy(rng.standard_normal(s)).to(dtype)  # noqa: E731
    q, k, v = t(B, Hq, Lq, D), t(B, Hkv, Lk, D), t(B, Hkv, Lk, D)
    if rng.random() < 0.05:
        v = t(B, Hkv, Lk + 1, D)
    if rng.random() < 0.03:
        k = t(B, Hq + 1, Lk, D)

    def pick(valid, invalid=()):
        options = invalid if invalid and rng.random() < 0.1 else valid
        return options[int(rng.integers(len(options)))]()

    def theta(L):
        return pick([lambda: None, lambda: float(rng.uniform(1.5, 1e4)), lambda: 10000,
                     lambda: torch.from_numpy(rng.uniform(1.01, 1e4, (B, L))),
                     lambda: torch.from_numpy(rng.uniform(1.01, 1e4, (L,))).float(),
                     lambda: torch.tensor(500.0)],
                    [lambda: 1.0, lambda: float("nan"), lambda: True,
                     lambda: torch.from_numpy(rng.uniform(0.5, 3.0, (B, L))).float(),
                     lambda: torch.full((B, L), float("inf")),
                     lambda: torch.full((1, L), 1e39, dtype=torch.float64),
                     lambda: torch.full((B, L + 1), 50.0),
                     lambda: torch.ones(B, L, dtype=torch.int64) * 100])
    kw = dict(
        key_zero=pick([lambda: None, lambda: torch.from_numpy(rng.random((B, Lk)) < 0.4),
                       lambda: torch.ones(B, Lk, dtype=torch.bool)],
                      [lambda: torch.zeros(B, Lk + 1, dtype=torch.bool),
                       lambda: torch.zeros(B, Lk)]),
        zero_scale=pick([lambda: 1e-6, lambda: 1.0, lambda: 1, lambda: 2e-38,
                         lambda: torch.tensor(0.01, dtype=torch.float64),
                         lambda: torch.tensor([0.2])],
                        [lambda: 0.0, lambda: 1.5, lambda: 1e-39, lambda: -1e-3,
                         lambda: float("nan"), lambda: False, lambda: torch.tensor(3.0),
                         lambda: torch.tensor([0.1, 0.2]), lambda: "0.1"]),
        zero_mode=pick([lambda: "prob", lambda: "score", lambda: "hard"],
                       [lambda: "PROB", lambda: None]),
        causal=pick([lambda: False, lambda: True], [lambda: 0]),
        sm_scale=pick([lambda: None, lambda: 0.3, lambda: 2],
                      [lambda: 0.0, lambda: -1.0, lambda: float("inf"), lambda: True]),
        seqlens_k=pick([lambda: None, lambda: torch.from_numpy(rng.integers(0, Lk + 1, B)),
                        lambda: torch.from_numpy(rng.integers(0, Lk + 1, B)).int()],
                       [lambda: torch.full((B,), Lk + 1), lambda: torch.full((B,), -1),
                        lambda: torch.full((B,), 2 ** 32 + 1),
                        lambda: torch.ones(B + 1).long(), lambda: torch.ones(B)]),
        theta_q=theta(Lq), theta_k=theta(Lk),
        pos_q=pick([lambda: None, lambda: int(rng.integers(-5, 50))],
                   [lambda: 2 ** 24, lambda: 3.0]),
        pos_k=pick([lambda: None, lambda: int(rng.integers(0, 50))], [lambda: 2 ** 25]),
        rotary_dim=pick([lambda: None, lambda: 2 * int(rng.integers(1, max(2, D // 2 + 1)))],
                        [lambda: D + 2, lambda: 3, lambda: 0]),
        interleaved=pick([lambda: False, lambda: True], [lambda: 1]),
        radius=pick([lambda: None], [lambda: torch.ones(D // 2)]))
    if rng.random() < 0.3:
        kw["theta_k"] = kw["theta_q"]  # one theta object for both sides
    for side in "qk":  # positions without a theta: mostly left out (the checked path rejects)
        if kw[f"theta_{side}"] is None and rng.random() < 0.9:
            kw[f"pos_{side}"] = None
    backend = pick([lambda: None, lambda: "cpp", lambda: "auto"],
                   [lambda: "reference", lambda: "CPP"])
    return (q, k, v), kw, backend


def test_fuzzed_calls_are_taken_exactly_or_declined(monkeypatch):
    """600 random calls, valid and invalid: the fast path never raises, declines every call
    the checked path rejects, and where it takes one gives the checked path's output."""
    rng = np.random.default_rng(2024)
    taken = rejected = 0
    for i in range(600):
        (q, k, v), kw, backend = _fuzz_call(rng)
        got = fast(q, k, v, backend=backend, **kw)
        try:
            want = checked(monkeypatch, q, k, v, backend=backend, **kw)
        except (TypeError, ValueError) as exc:
            rejected += 1
            assert got is None, f"call {i}: the checked path raises {exc!r}, the fast " \
                                f"path answered ({kw}, backend={backend})"
            continue
        if got is not None:
            taken += 1
            assert same(got, want), f"call {i}: {kw}, backend={backend}"
    assert taken > 100 and rejected > 100, (taken, rejected)  # both kinds exercised


def test_poisoned_outputs_and_a_kv_cache_step(monkeypatch):
    """The fast path NaN-poisons its outputs as every kernel launcher does (so an unwritten
    element would fail the comparisons above), and one decoding step (Lq = 1 against a
    cache, causal, int offset positions) is taken and right."""
    import os
    assert os.environ.get("ZEROMASK_POISON") == "1"  # tests/conftest.py
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, n, 24, generator=g) for n in (1, 40, 40))
    theta = 100 + 900 * torch.rand(3, 40, generator=g)
    kw = dict(key_zero=torch.rand(3, 40, generator=g) < 0.2, causal=True,
              theta_q=theta[:, -1:], theta_k=theta, seqlens_k=torch.tensor([40, 33, 12]))
    with torch.no_grad():
        got = fast(q, k, v, **kw)
        assert got is not None and not got.isnan().any()
        assert same(got, checked(monkeypatch, q, k, v, **kw))
