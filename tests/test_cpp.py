"""What is specific to the C++ CPU extension (zeromask._C_cpu, backend "cpp").

The feature grid every backend shares (zero modes, causal, seqlens_k, GQA, cross-attention,
lengths, head dims, rotary variants, dtypes, the saved lse) is tests/test_attention.py. Here:
many query/key blocks, the backward's split of a GQA group over threads, all-hard-masked
rows through the kernel contract, strided inputs, the auto choice, the standalone rotary op.
"""
import math

import pytest
import torch

import zeromask
from zeromask import dispatch
from zeromask.backends import cpp as cpp_backend

from cases import attention_case, check_attention, normalised_args
from tolerance import assert_grad_close, assert_output_close

_reason = cpp_backend.available()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"cpp backend unavailable: {_reason}")


# --------------------------------------------------------------------------------------
# attention: what is specific to this kernel (the shared grid is tests/test_attention.py)
# --------------------------------------------------------------------------------------
def test_multi_block_long():
    """Several query and key blocks (64 x 128), causal, seqlens and GQA together."""
    case = attention_case(B=1, Hq=2, Hkv=1, Lq=200, Lk=300, D=32, causal=True, seqlens=True,
                          radius=True, seed=7)
    check_attention(case, torch.float32, "cpp")


@pytest.mark.parametrize("kw", [dict(B=1, Hq=4, Hkv=1, causal=True, radius=True),
                                dict(B=2, Hq=6, Hkv=1, zero_mode="score", seqlens=True),
                                dict(B=1, Hq=3, Hkv=1, Lq=70, Lk=140)])
def test_backward_group_split(kw):
    """Few (batch, kv head) pairs for the threads: the backward slices the GQA group."""
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        check_attention(attention_case(**kw), torch.float32, "cpp")
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------
# the kernel contract directly: lse, empty rows, strides
# --------------------------------------------------------------------------------------
def _fwd(case):
    """(out, lse) of the cpp kernel for a case, through the kernel contract directly."""
    return cpp_backend.attention_forward(normalised_args(case))


def test_all_hard_masked_rows():
    """seqlens_k = 0 for one batch and causal Lq > Lk: out 0, lse -inf, finite gradients."""
    case = attention_case(B=2, Lq=20, Lk=9, causal=True, seed=11)
    case["seqlens_k"] = torch.tensor([0, 9])
    out, lse = _fwd(case)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.all(out[1, :, :11] == 0) and torch.all(torch.isneginf(lse[1, :, :11]))
    assert torch.isfinite(lse[1, :, 11:]).all()
    check_attention(case, torch.float32, "cpp")  # gradients vs reference, NaN fails
    # every key hard-masked everywhere: all gradients exactly zero, none NaN
    case["seqlens_k"] = torch.tensor([0, 0])
    args = {k: (v.detach().float().requires_grad_(k in ("q", "k", "v", "theta_q", "theta_k",
                                                          "zero_scale"))
                if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in case.items()}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    out = zeromask.zero_soft_attention(q, k, v, backend="cpp", **args)
    assert torch.all(out == 0)
    out.sum().backward()
    for t in (q, k, v, args["theta_q"], args["theta_k"], args["zero_scale"]):
        assert t.grad is not None and torch.all(t.grad == 0), "expected zero gradient"


def test_strided_inputs():
    """q/k/v as transposed views of (B, L, H, D) buffers: same result as contiguous."""
    g = torch.Generator().manual_seed(5)
    B, H, L, D = 2, 4, 37, 32
    q, k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    kw = dict(key_zero=torch.rand(B, L, generator=g) < 0.3, zero_scale=0.1, causal=True,
              theta_q=2000.0, theta_k=2000.0)
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    o1 = zeromask.zero_soft_attention(qs, ks, vs, backend="cpp", **kw)
    o2 = zeromask.zero_soft_attention(qc, kc, vc, backend="cpp", **kw)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    d = torch.randn(o1.shape, generator=g)
    g1 = torch.autograd.grad(o1, (qs, ks, vs), d)
    g2 = torch.autograd.grad(o2, (qc, kc, vc), d)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_constant_theta_is_standard_rope():
    """Constant theta through the fused kernel == SDPA on HF-style rotated q/k."""
    g = torch.Generator().manual_seed(2)
    B, H, L, D = 1, 2, 50, 32
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    want = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
    got = zeromask.zero_soft_attention(q, k, v, causal=True, theta_q=10000.0, theta_k=10000.0,
                                       backend="cpp")
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------
# dispatch and refusals
# --------------------------------------------------------------------------------------
def test_cpp_is_auto_choice_on_cpu():
    q = torch.randn(1, 1, 4, 8)
    args = normalised_args(dict(q=q, k=q, v=q))
    assert dispatch.select("attention", "cpu", None, args).name == "cpp"


def test_rejects_float64_with_reason():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(dispatch.BackendError, match="float64"):
        zeromask.zero_soft_attention(q, q, q, backend="cpp")
    assert "float64" in cpp_backend.supports("attention", normalised_args(dict(q=q, k=q, v=q),
                                                                          torch.float64))


# --------------------------------------------------------------------------------------
# the standalone rotary op
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved,rotary_dim,radius", [(False, None, False),
                                                           (True, None, True),
                                                           (False, 24, True),
                                                           (True, 16, False)])
def test_rotary_op(dtype, interleaved, rotary_dim, radius):
    g = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 3, 41, 40
    x = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    from cases import f0_theta
    theta = f0_theta(B, L, g)
    pos = torch.arange(L, dtype=torch.float64).expand(B, L) + 3
    R = D if rotary_dim is None else rotary_dim
    rad = (0.5 + torch.rand(R // 2, generator=g, dtype=torch.float64)) if radius else None
    dy = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)

    def run(xdt, backend):
        xx = x.to(xdt).requires_grad_()
        th = theta.clone().requires_grad_()
        rr = rad.clone().requires_grad_() if rad is not None else None
        y = zeromask.f0_rotary(xx, th, positions=pos, rotary_dim=rotary_dim,
                               interleaved=interleaved, radius=rr, backend=backend)
        leaves = [xx, th] + ([rr] if rr is not None else [])
        grads = torch.autograd.grad(y, leaves, dy.to(xdt))
        return y.detach(), grads

    y0, g0 = run(torch.float64, "reference")
    y1, g1 = run(dtype, "reference")
    y2, g2 = run(dtype, "cpp")
    assert y2.dtype == dtype
    assert_output_close("y", y2, y0, y1, dtype)
    for name, a, o, s in zip(("dx", "dtheta", "dradius"), g2, g0, g1):
        assert_grad_close(name, a, o, s, dtype)


def test_rotary_constant_theta_matches_rope():
    x = torch.randn(1, 2, 30, 16)
    y = zeromask.f0_rotary(x, 10000.0, backend="cpp")
    inv = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ang = torch.arange(30, dtype=torch.float64)[:, None] * inv[None]
    c, s = ang.cos().float(), ang.sin().float()
    x1, x2 = x[..., :8], x[..., 8:]
    want = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(y.abs().max()))
