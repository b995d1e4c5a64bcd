"""Public functionals, input validation, the dispatch and the custom-op autograd glue."""
import dataclasses
import logging

import pytest
import torch

import zeromask
from zeromask import dispatch, ops, reference
from zeromask.backends import reference as reference_backend

from cases import attention_case, check_attention


def qkv(B=2, Hq=4, Hkv=2, Lq=6, Lk=7, D=8, dtype=torch.float32):
    return (torch.randn(B, Hq, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype),
            torch.randn(B, Hkv, Lk, D, dtype=dtype))


@pytest.fixture
def glue_backend(monkeypatch):
    """The reference kernels registered as a *kernel* backend named "glue", so calls go
    through the torch.library custom ops and their autograd formula (the path every
    compiled backend takes) with no compiled code needed."""
    fake = dataclasses.replace(reference_backend.BACKEND, name="glue")
    monkeypatch.setitem(dispatch._loaded, "glue", fake)
    monkeypatch.setattr(dispatch, "NAMES", dispatch.NAMES + ("glue",))
    monkeypatch.setattr(dispatch, "BACKENDS", dispatch.BACKENDS + ("glue",))
    return "glue"


@pytest.fixture(params=["eager", "custom_op"])
def glue_path(request, monkeypatch):
    """Both ways a kernel call runs: eagerly (``ops._EagerAttention``/``_EagerRotary``,
    no dispatcher) and through the torch.library custom ops (what torch.compile traces)."""
    if request.param == "custom_op":
        monkeypatch.setattr(ops, "_eager", lambda t: False)
    return request.param


# ---------------------------------------------------------------- the custom-op glue
@pytest.mark.parametrize("kw", [
    dict(),
    dict(causal=True, Lq=5, Lk=9, zero_mode="score"),
    dict(seqlens=True, radius=True, interleaved=True, rotary_dim=16, D=24),
    dict(rotary=False, Hkv=1),
])
def test_custom_op_path_matches_reference(glue_backend, glue_path, kw):
    check_attention(attention_case(**kw), torch.float32, glue_backend)


def _attention_and_grads(backend):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g).requires_grad_() for _ in range(3))
    theta = (100 + 900 * torch.rand(2, 9, generator=g)).requires_grad_()
    zs = torch.tensor(0.01, requires_grad=True)
    key_zero = torch.rand(2, 9, generator=g) < 0.3
    out = zeromask.zero_soft_attention(q, k, v, key_zero=key_zero, zero_scale=zs,
                                       theta_q=theta, theta_k=theta, causal=True,
                                       backend=backend)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), (q, k, v, theta, zs))
    return (out.detach(),) + grads


def test_eager_and_custom_op_paths_are_bitwise_equal(glue_backend, monkeypatch):
    eager = _attention_and_grads(glue_backend)
    monkeypatch.setattr(ops, "_eager", lambda t: False)
    custom = _attention_and_grads(glue_backend)
    for a, b in zip(eager, custom):
        assert torch.equal(a, b)


def test_calls_with_nothing_to_differentiate_skip_autograd(glue_backend, monkeypatch):
    """Under no_grad, or with no input that requires grad, an eager call runs the kernel
    alone (no autograd Function, no graph): the same output as the recorded call."""
    q, k, v = qkv()
    theta = 100 + 900 * torch.rand(2, 7)
    kw = dict(key_zero=torch.rand(2, 7) < 0.3, theta_q=theta[:, :6], theta_k=theta,
              backend=glue_backend)
    recorded = zeromask.zero_soft_attention(q.requires_grad_(), k, v, **kw)
    assert recorded.grad_fn is not None
    q = q.detach()
    x = torch.randn(1, 2, 5, 8)
    rot_recorded = zeromask.f0_rotary(x.clone().requires_grad_(), 500.0, backend=glue_backend)

    def refuse(*args):
        raise AssertionError("the autograd Function ran with nothing to differentiate")

    monkeypatch.setattr(ops._EagerAttention, "apply", refuse)
    monkeypatch.setattr(ops._EagerRotary, "apply", refuse)
    plain = zeromask.zero_soft_attention(q, k, v, **kw)
    with torch.no_grad():
        quiet = zeromask.zero_soft_attention(q.requires_grad_(), k, v, **kw)
    for out in (plain, quiet):
        assert out.grad_fn is None and torch.equal(out, recorded.detach())
    assert torch.equal(zeromask.f0_rotary(x, 500.0, backend=glue_backend),
                       rot_recorded.detach())


@pytest.mark.skipif(dispatch.available_backends()["cpp"] is not None,
                    reason="needs the cpp backend")
def test_eager_calls_skip_the_custom_op_and_traced_calls_take_it(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    def refuse(*args):
        raise AssertionError("an eager call went through the custom op")

    with monkeypatch.context() as m:
        m.setattr(ops, "_attention_fwd", refuse)
        m.setattr(ops, "_rotary_fwd", refuse)
        _attention_and_grads("cpp")
        zeromask.f0_rotary(torch.randn(1, 2, 5, 8), 500.0, backend="cpp")
    # under a dispatch mode (as under make_fx or FakeTensorMode) the custom ops are taken
    with Recorder() as rec:
        _attention_and_grads("cpp")
        zeromask.f0_rotary(torch.randn(1, 2, 5, 8), 500.0, backend="cpp")
    assert {"zeromask.attention_fwd.default", "zeromask.attention_bwd.default",
            "zeromask.rotary_fwd.default"} <= rec.ops


def test_cached_constant_inputs_survive_inference_mode(glue_backend):
    """A float theta/zero_scale and the default positions are cached tensors; one made under
    inference mode must not be reused where autograd saves it for a backward."""
    q, k, v = qkv()
    kw = dict(key_zero=torch.rand(2, 7) < 0.3, zero_scale=0.02, theta_q=321.0,
              theta_k=321.0, backend=glue_backend)
    with torch.inference_mode():
        first = zeromask.zero_soft_attention(q, k, v, **kw)
    qg = q.clone().requires_grad_()
    out = zeromask.zero_soft_attention(qg, k, v, **kw)
    out.sum().backward()
    assert torch.equal(out.detach(), first) and torch.isfinite(qg.grad).all()
    again = zeromask.zero_soft_attention(q, k, v, **dict(kw, theta_q=654.0, theta_k=654.0))
    assert not torch.equal(again, first)  # a different float is a different constant


def test_constant_cache_keeps_only_small_tensors():
    ops._CONSTANTS.clear()
    small = ops._positions("pos_q", None, 2, 7, torch.device("cpu"), torch.float32)
    assert ops._positions("pos_q", None, 2, 7, torch.device("cpu"), torch.float32) is small
    n = ops._CONSTANT_MAX_NUMEL + 1
    big = ops._positions("pos_q", None, 1, n, torch.device("cpu"), torch.float32)
    assert big.shape == (1, n) and len(ops._CONSTANTS) == 1
    for length in range(1, 100):  # many shapes: the cache stays bounded
        ops._positions("pos_q", None, 1, length, torch.device("cpu"), torch.float32)
    assert len(ops._CONSTANTS) <= 64


def test_custom_op_rotary_matches_reference(glue_backend, glue_path):
    x = torch.randn(2, 3, 9, 16, dtype=torch.float64)
    theta = (torch.rand(2, 9, dtype=torch.float64) * 1000 + 50)
    radius = torch.rand(8, dtype=torch.float64) + 0.5
    outs = []
    for backend in ("reference", glue_backend):
        xs = x.float().requires_grad_()
        ts = theta.float().requires_grad_()
        rs = radius.float().requires_grad_()
        y = zeromask.f0_rotary(xs, ts, positions=3, radius=rs, backend=backend)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xs.grad, ts.grad, rs.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_fake_implementations_match_real_shapes():
    case = attention_case()
    a = ops._normalise_attention(case["q"].float(), case["k"].float(), case["v"].float(),
                                 case["key_zero"], 0.1, "prob", False, None, None,
                                 case["theta_q"], case["theta_k"], None, None, None, False, None)
    args = (*a, "reference")
    torch.library.opcheck(ops._attention_fwd, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_traces_the_public_call(glue_backend):
    q, k, v = qkv()
    key_zero = torch.rand(2, 7) < 0.3

    def f(q, k, v):
        return zeromask.zero_soft_attention(q, k, v, key_zero=key_zero, theta_q=500.0,
                                            theta_k=500.0, backend=glue_backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


# ---------------------------------------------------------------- dispatch
def test_explicit_unavailable_backend_names_why(monkeypatch):
    monkeypatch.setitem(dispatch._loaded, "cuda", "cuda backend could not be imported: test")
    q, k, v = qkv()
    with pytest.raises(dispatch.BackendError, match="cuda.*could not be imported"):
        zeromask.zero_soft_attention(q, k, v, backend="cuda")


def test_backend_that_cannot_serve_the_device_says_so(glue_backend, monkeypatch):
    monkeypatch.setitem(dispatch._loaded, "glue", dataclasses.replace(
        dispatch._loaded["glue"], device_types=("cuda",)))
    q, k, v = qkv()
    with pytest.raises(dispatch.BackendError, match="does not run on cpu"):
        zeromask.zero_soft_attention(q, k, v, backend="glue")


def test_env_var_selects_and_bad_names_are_rejected(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("ZEROMASK_BACKEND", "reference")
    out = zeromask.zero_soft_attention(q, k, v)
    torch.testing.assert_close(out, reference.zero_soft_attention(q, k, v))
    monkeypatch.setenv("ZEROMASK_BACKEND", "fastest")
    with pytest.raises(ValueError, match="ZEROMASK_BACKEND='fastest'"):
        zeromask.zero_soft_attention(q, k, v)
    with pytest.raises(ValueError, match="backend='nope'"):
        zeromask.zero_soft_attention(q, k, v, backend="nope")


def test_auto_choice_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(ops, "_fast_attention", ops._UNSET)  # as in a fresh process
    q, k, v = qkv()
    with caplog.at_level(logging.INFO, logger="zeromask"):
        zeromask.zero_soft_attention(q, k, v)
        zeromask.zero_soft_attention(q, k, v)
    lines = [r for r in caplog.records if "attention on cpu uses" in r.getMessage()]
    assert len(lines) == 1


def test_available_backends_lists_every_backend_with_reasons():
    status = zeromask.available_backends()
    assert set(status) == {"reference", "triton", "cuda", "cpp"}
    assert status["reference"] is None
    for name, why in status.items():
        assert why is None or (isinstance(why, str) and why)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v: dict(q=q[0]), ValueError, "q must have 4 dims"),
    (lambda q, k, v: dict(q=q.int()), TypeError, "q must be float16"),
    (lambda q, k, v: dict(k=k.double()), TypeError, "share a dtype"),
    (lambda q, k, v: dict(v=v[..., :4]), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: dict(k=k[:, :1].expand(2, 3, 7, 8), v=v[:, :1].expand(2, 3, 7, 8)),
     ValueError, "multiple of k/v heads"),
    (lambda q, k, v: dict(key_zero=torch.zeros(2, 6, dtype=torch.bool)), ValueError,
     r"key_zero must have shape \(B, Lk\)"),
    (lambda q, k, v: dict(key_zero=torch.zeros(2, 7)), TypeError, "key_zero must be a bool"),
    (lambda q, k, v: dict(zero_scale=0.0), ValueError, r"zero_scale must be in \(0, 1\]"),
    (lambda q, k, v: dict(zero_scale=1.5), ValueError, r"zero_scale must be in \(0, 1\]"),
    (lambda q, k, v: dict(zero_scale=torch.tensor(2.0)), ValueError, "zero_scale"),
    (lambda q, k, v: dict(zero_mode="soft"), ValueError, "zero_mode"),
    (lambda q, k, v: dict(theta_q=100.0, rotary_dim=5), ValueError, "rotary_dim must be even"),
    (lambda q, k, v: dict(theta_q=100.0, rotary_dim=16), ValueError, "rotary_dim"),
    (lambda q, k, v: dict(theta_q=torch.full((2, 6), float("nan"))), ValueError,
     "theta_q contains NaN"),
    (lambda q, k, v: dict(theta_k=torch.full((2, 7), float("inf"))), ValueError,
     "theta_k contains NaN or inf"),
    (lambda q, k, v: dict(theta_q=torch.full((2, 5), 100.0)), ValueError, "theta_q must be"),
    (lambda q, k, v: dict(theta_q=0.5), ValueError, "theta_q must be a finite float in \\(1, "),
    (lambda q, k, v: dict(theta_q=100.0, radius=torch.ones(3)), ValueError, "radius"),
    (lambda q, k, v: dict(radius=torch.ones(4)), ValueError, "no theta"),
    (lambda q, k, v: dict(seqlens_k=torch.tensor([3, 9])), ValueError, "seqlens_k values"),
    (lambda q, k, v: dict(seqlens_k=torch.tensor([3.0, 2.0])), TypeError, "seqlens_k"),
    (lambda q, k, v: dict(sm_scale=-1.0), ValueError, "sm_scale"),
    (lambda q, k, v: dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
])
def test_bad_input_raises_naming_the_argument(make, exc, match):
    q, k, v = qkv(Hkv=2)
    args = dict(q=q, k=k, v=v)
    over = make(q, k, v)
    kwargs = {n: over.pop(n) for n in list(over) if n not in ("q", "k", "v")}
    args.update(over)
    with pytest.raises(exc, match=match):
        zeromask.zero_soft_attention(args["q"], args["k"], args["v"], **kwargs)


def test_rotary_validation():
    x = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="x must have 4 dims"):
        zeromask.f0_rotary(x[0], 100.0)
    with pytest.raises(ValueError, match="theta contains NaN"):
        zeromask.f0_rotary(x, torch.tensor([[100.0, float("nan"), 3.0, 4.0, 5.0]]))
    with pytest.raises(ValueError, match="positions must be"):
        zeromask.f0_rotary(x, 100.0, positions=torch.arange(4))
    with pytest.raises(ValueError, match="theta is required"):
        zeromask.f0_rotary(x, None)


def test_strided_inputs_are_accepted():
    q, k, v = qkv(Hq=2, Hkv=2)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    nc = torch.randn(2, 2, 6, 16)[..., ::2]  # last dim not contiguous
    out = zeromask.zero_soft_attention(qt, k, v)
    torch.testing.assert_close(out, reference.zero_soft_attention(q, k, v))
    out = zeromask.zero_soft_attention(nc, k, v)
    torch.testing.assert_close(out, reference.zero_soft_attention(nc.contiguous(), k, v))


def test_causal_queries_default_to_bottom_right_positions():
    """Decoding: the last Lq queries of a self-attention are at positions Lk-Lq ... Lk-1."""
    x = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    full = zeromask.zero_soft_attention(x, x, x, causal=True, theta_q=300.0, theta_k=300.0)
    last = zeromask.zero_soft_attention(x[:, :, -3:], x, x, causal=True, theta_q=300.0,
                                        theta_k=300.0)
    torch.testing.assert_close(last, full[:, :, -3:])


def test_weights_sum_to_one_and_match_output():
    q, k, v = qkv(dtype=torch.float64)
    kz = torch.rand(2, 7) < 0.3
    p = ops.zero_soft_attention_weights(q, k, key_zero=kz, zero_scale=0.1, theta_q=200.0,
                                        theta_k=200.0, causal=True)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 6, dtype=torch.float64))
    out = zeromask.zero_soft_attention(q, k, v, key_zero=kz, zero_scale=0.1, theta_q=200.0,
                                       theta_k=200.0, causal=True)
    torch.testing.assert_close(p @ v.repeat_interleave(2, 1), out)


def test_mixed_devices_are_refused_naming_the_tensor():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        zeromask.zero_soft_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="key_zero is on meta"):
        zeromask.zero_soft_attention(q, k, v, key_zero=torch.zeros(2, 7, dtype=torch.bool,
                                                                   device="meta"))
    with pytest.raises(ValueError, match="theta_q is on meta"):
        zeromask.zero_soft_attention(q, k, v, theta_q=torch.full((2, 6), 100.0, device="meta"))
