"""torch.compile over the custom ops (issue 12, items 9-10).

* every custom op passes ``torch.library.opcheck`` on non-contiguous inputs (schema, fake
  tensors, autograd registration, AOT dispatch), on every kernel backend present;
* a compiled training step (forward and backward) of ``ZeroSoftAttention`` and of the
  functional, whose q/k/v are transposed views, matches eager: aot_eager and inductor;
* ``fullgraph=True`` works when the process's very first zeromask call is compiled.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import zeromask
from zeromask import dispatch, ops

KERNEL_BACKENDS = [name for name, why in dispatch.available_backends().items()
                   if why is None and name in ("cpp",)]
needs_kernel = pytest.mark.skipif(not KERNEL_BACKENDS, reason="the cpp backend is not built")


@pytest.fixture(autouse=True)
def _fresh_inductor():
    """No FX graph cache: a cached graph keeps the strides of the fake kernels it was
    compiled with, so a changed fake would go untested."""
    import torch._inductor.config as inductor_config
    with inductor_config.patch(force_disable_caches=True):
        torch._dynamo.reset()
        yield
    torch._dynamo.reset()


def _views(B=2, H=4, L=9, D=16, seed=0):
    """q, k, v as (B, H, L, D) transposed views of (B, L, H, D) tensors, as a module makes."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(3)]


def _attention_args(backend):
    q, k, v = _views()
    B, _, L, _ = q.shape
    g = torch.Generator().manual_seed(1)
    key_zero = torch.rand(B, L, generator=g) < 0.3
    theta = 200 + 1000 * torch.rand(B, L, generator=g)
    a = ops._normalise_attention(q, k, v, key_zero, torch.tensor(0.05), "prob", True, None,
                                 None, theta, theta, None, None, None, False, None)
    a = a._replace(**{name: getattr(a, name).detach().requires_grad_(True)
                      for name in ("q", "k", "v", "theta_q", "theta_k", "zero_scale")})
    return (*a, backend)


@needs_kernel
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_attention_on_strided_inputs(backend):
    args = _attention_args(backend)
    assert not args[0].is_contiguous()
    torch.library.opcheck(ops._attention_fwd, args)
    out, lse = ops._attention_fwd(*args)
    do = torch.randn_like(out)
    bwd = (do, out.detach(), lse.detach(),
           *[a.detach() if torch.is_tensor(a) else a for a in args])
    torch.library.opcheck(ops._attention_bwd, bwd)


@needs_kernel
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_rotary_on_strided_inputs(backend):
    x = _views()[0].detach().requires_grad_(True)
    B, _, L, _ = x.shape
    theta = (200 + 1000 * torch.rand(B, L)).requires_grad_(True)
    pos = torch.arange(L, dtype=torch.float32).expand(B, L).contiguous()
    args = (x, theta, pos, None, x.shape[-1], False, backend)
    torch.library.opcheck(ops._rotary_fwd, args)
    dy = torch.randn(x.shape)
    torch.library.opcheck(ops._rotary_bwd, (dy, x.detach(), theta.detach(), pos, None,
                                            x.shape[-1], False, backend))


def _step(fn, params, *inputs):
    out = fn(*inputs)
    loss = (out.float() ** 2).mean()
    grads = torch.autograd.grad(loss, params)
    return out.detach(), [g.detach() for g in grads]


@needs_kernel
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_module_training_step_matches_eager(compiler):
    torch.manual_seed(0)
    attn = zeromask.ZeroSoftAttention(32, 4, batch_first=True, backend="cpp",
                                      learnable_zero_scale=True,
                                      rotary=zeromask.F0Rotary(rotary_dim=8))
    x = torch.randn(2, 11, 32, requires_grad=True)
    zero = torch.rand(2, 11) < 0.3
    f0 = 100 + 100 * torch.rand(2, 11)

    def fn(x):
        return attn(x, x, x, key_padding_mask=zero, f0=f0)[0]

    params = [x] + list(attn.parameters())
    want_out, want = _step(fn, params, x)
    torch._dynamo.reset()
    got_out, got = _step(torch.compile(fn, backend=compiler), params, x)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_functional_on_transposed_views_matches_eager(compiler):
    q, k, v = (t.detach().requires_grad_(True) for t in _views())
    theta = (300 + 500 * torch.rand(2, 9)).requires_grad_(True)
    key_zero = torch.rand(2, 9) < 0.3

    def fn(q, k, v, theta):
        return zeromask.zero_soft_attention(q, k, v, key_zero=key_zero, causal=True,
                                            theta_q=theta, theta_k=theta, backend="cpp")

    params = [q, k, v, theta]
    want_out, want = _step(fn, params, q, k, v, theta)
    torch._dynamo.reset()
    got_out, got = _step(torch.compile(fn, backend=compiler, fullgraph=True), params,
                         q, k, v, theta)
    torch.testing.assert_close(got_out, want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_fullgraph_compile_as_the_first_call_of_a_process():
    """The backend choice logs once; a first call under fullgraph must not trip on it."""
    code = (
        "import logging, torch, zeromask\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "f = torch.compile(lambda q: zeromask.zero_soft_attention(q, q, q, theta_q=500.0, "
        "theta_k=500.0), fullgraph=True, backend='aot_eager')\n"
        "out = f(q)\n"
        "ref = zeromask.zero_soft_attention(q, q, q, theta_q=500.0, theta_k=500.0, "
        "backend='reference')\n"
        "torch.testing.assert_close(out, ref)\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
