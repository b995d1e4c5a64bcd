"""The Triton backend against the reference (docs/design.md 3.1, 3.3, 4).

Without a GPU these run the kernels in Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1`` before Triton is imported, and ``ZEROMASK_POISON=1`` so an output
element a kernel forgets to write is NaN and fails). Shapes are small so the file runs in a
few minutes on two cores. bf16 runs in the interpreter too, with the kernels' matmuls
upcast to fp32 there (the interpreter's bf16 ``tl.dot`` is broken; the operands are
already bf16-rounded so the arithmetic is the compiled kernel's). GPU-only tests at the end
run the kernels compiled in fp16/bf16.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import zeromask  # noqa: E402
from zeromask import dispatch, reference  # noqa: E402
from zeromask.backends import RotaryArgs  # noqa: E402
from zeromask.backends import triton as triton_backend  # noqa: E402

from cases import attention_case, check_attention, f0_theta, normalised_args  # noqa: E402
from tolerance import assert_grad_close, assert_output_close  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (compiled Triton)")

if not GPU and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


# --------------------------------------------------------------------------------------
# rotary
# --------------------------------------------------------------------------------------
def _rotary_run(x, theta, positions, rotary_dim, interleaved, radius, backend, dtype, dy):
    x = x.to(dtype).detach().requires_grad_(True)
    th = theta.detach().float().requires_grad_(True) if dtype != torch.float64 else \
        theta.detach().requires_grad_(True)
    rad = None
    if radius is not None:
        rad = (radius.float() if dtype != torch.float64 else radius).detach().requires_grad_(True)
    y = zeromask.f0_rotary(x, th, positions=positions, rotary_dim=rotary_dim,
                           interleaved=interleaved, radius=rad, backend=backend)
    leaves = [x, th] + ([rad] if rad is not None else [])
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return y.detach(), grads


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim,radius", [(None, False), (24, True)])
def test_rotary_matches_reference(dtype, interleaved, rotary_dim, radius):
    g = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 3, 17, 40
    # a (B, L, H, D) buffer viewed as (B, H, L, D): strides that are not contiguous
    x = torch.randn(B, L, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    theta = f0_theta(B, L, g)
    R = D if rotary_dim is None else rotary_dim
    rad = 0.5 + torch.rand(R // 2, generator=g, dtype=torch.float64) if radius else None
    dy = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    args = (theta, 5, rotary_dim, interleaved, rad)
    oracle_y, oracle_g = _rotary_run(x, *args, "reference", torch.float64, dy)
    same_y, same_g = _rotary_run(x, *args, "reference", dtype, dy)
    y, grads = _rotary_run(x.to(DEVICE), theta.to(DEVICE), 5, rotary_dim, interleaved,
                           None if rad is None else rad.to(DEVICE), "triton", dtype,
                           dy.to(DEVICE))
    assert y.dtype == dtype and y.is_contiguous()
    assert_output_close("y", y.cpu(), oracle_y, same_y, dtype)
    for name, a, o, s in zip(("dx", "dtheta", "dradius"), grads, oracle_g, same_g):
        assert_grad_close(name, a.cpu(), o, s, dtype)


@pytest.mark.parametrize("L", [1, 131])
def test_rotary_positions_tensor_and_lengths(L):
    """Explicit (B, L) positions (not arange), a float theta, odd lengths, D=16."""
    g = torch.Generator().manual_seed(5)
    B, H, D = 2, 2, 16
    x = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 4 * L, (B, L), generator=g).double()
    dy = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)

    def run(backend, dtype, device):
        xx = x.to(device=device, dtype=dtype).requires_grad_(True)
        y = zeromask.f0_rotary(xx, 2500.0, positions=pos.to(device), interleaved=True,
                               backend=backend)
        (dx,) = torch.autograd.grad(y, xx, dy.to(device=device, dtype=dtype))
        return y.detach().cpu(), dx.cpu()

    oy, odx = run("reference", torch.float64, "cpu")
    sy, sdx = run("reference", F32, "cpu")
    with reference.float32_angles():  # the kernel's own angle precision: a yardstick too
        fy, fdx = run("reference", F32, "cpu")
    y, dx = run("triton", F32, DEVICE)
    assert_output_close("y", y, oy, [sy, fy], F32)
    assert_grad_close("dx", dx, odx, [sdx, fdx], F32)


def test_rotary_constant_theta_is_standard_rope():
    """Constant theta, NeoX pairing: the LLaMA / flash-attn rotate_half formula."""
    g = torch.Generator().manual_seed(4)
    B, H, L, D = 1, 2, 17, 16
    x = torch.randn(B, H, L, D, generator=g)
    y = zeromask.f0_rotary(x.to(DEVICE), 10000.0, backend="triton").cpu()
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(L, dtype=torch.float64), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    expect = x.double() * emb.cos() + torch.cat((-x2, x1), dim=-1).double() * emb.sin()
    torch.testing.assert_close(y.double(), expect, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------
# attention: what is specific to these kernels (the shared grid is tests/test_attention.py)
# --------------------------------------------------------------------------------------
def test_attention_empty_rows_zero_output_finite_grads():
    """Rows with every key hard-masked: output 0, lse -inf, no NaN anywhere."""
    # batch 1 has seqlens_k 0 (every row empty); causal with Lq > Lk empties first rows
    case = attention_case(B=2, Hq=2, Hkv=1, Lq=9, Lk=5, causal=True, seqlens=True, radius=True)
    case["seqlens_k"] = torch.tensor([4, 0])
    check_attention(case, F32, "triton", device=DEVICE)
    a = {k: (v.float().to(DEVICE) if torch.is_tensor(v) and v.is_floating_point() else
             (v.to(DEVICE) if torch.is_tensor(v) else v)) for k, v in case.items()}
    q = a.pop("q").requires_grad_(True)
    k = a.pop("k").requires_grad_(True)
    v = a.pop("v").requires_grad_(True)
    out = zeromask.zero_soft_attention(q, k, v, backend="triton", **a)
    assert torch.all(out[1] == 0)
    assert torch.all(out[0, :, :4] == 0)  # rows i < Lq - Lk see no key
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_attention_strided_inputs():
    """q/k/v as (B, H, L, D) views of (B, L, H, D) buffers, and a sliced head dim."""
    g = torch.Generator().manual_seed(7)
    B, H, L, D = 2, 2, 17, 32
    q, k, v = (torch.randn(B, L, H, D, generator=g).transpose(1, 2).to(DEVICE)
               for _ in range(3))
    wide = torch.randn(B, H, L, 2 * D, generator=g).to(DEVICE)
    k2 = wide[..., :D]  # row stride 2D
    theta = f0_theta(B, L, g).float().to(DEVICE)
    kz = (torch.rand(B, L, generator=g) < 0.3).to(DEVICE)
    kw = dict(key_zero=kz, zero_scale=0.05, theta_q=theta, theta_k=theta, causal=True)
    for kk in (k, k2):
        got = zeromask.zero_soft_attention(q, kk, v, backend="triton", **kw)
        want = zeromask.zero_soft_attention(q, kk, v, backend="reference", **kw)
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=2e-5, rtol=2e-5)


def test_attention_backward_deterministic():
    case = attention_case(B=1, Hq=4, Hkv=1, Lq=17, Lk=33, radius=True)
    from cases import _run
    _, g1 = _run(case, F32, DEVICE, "triton")
    _, g2 = _run(case, F32, DEVICE, "triton")
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


# --------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------
def test_supports_reasons():
    sup = triton_backend.BACKEND.supports

    def attn(x):
        return normalised_args(dict(q=x, k=x, v=x), x.dtype)
    q = torch.randn(1, 1, 4, 16)
    assert sup("attention", attn(q)) is None  # interpreter on
    assert "float64" in sup("attention", attn(q.double()))
    big = torch.randn(1, 1, 4, 264)
    assert "256" in sup("attention", attn(big))
    rot = RotaryArgs(q, torch.full((1, 4), 100.0), torch.zeros(1, 4), None, 16, False)
    assert sup("rotary", rot) is None
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        assert "TRITON_INTERPRET" in sup("attention", attn(q))
    finally:
        os.environ["TRITON_INTERPRET"] = old
    with pytest.raises(dispatch.BackendError, match="float64"):
        zeromask.zero_soft_attention(q.double(), q.double(), q.double(), backend="triton")


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    """fullgraph tracing through the custom ops, forward and backward."""
    g = torch.Generator().manual_seed(11)
    B, H, L, D = 1, 2, 17, 16
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEVICE).requires_grad_(True)
               for _ in range(3))
    kz = (torch.rand(B, L, generator=g) < 0.3).to(DEVICE)
    theta = f0_theta(B, L, g).float().to(DEVICE)

    def f(q, k, v):
        y = zeromask.f0_rotary(v, theta, backend="triton")
        return zeromask.zero_soft_attention(q, k, y, key_zero=kz, zero_scale=0.05,
                                            theta_q=theta, theta_k=theta, causal=True,
                                            backend="triton")

    eager = f(q, k, v)
    ge = torch.autograd.grad(eager.sum(), (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    out = compiled(q, k, v)
    gc = torch.autograd.grad(out.sum(), (q, k, v))
    torch.testing.assert_close(out, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_first_load():
    """A backend loaded for the first time inside a compiled region (dispatch imports
    backends with plain import statements, which Dynamo traces)."""
    q = torch.randn(1, 1, 16, 16, device=DEVICE)
    dispatch._loaded.pop("triton", None)
    torch._dynamo.reset()
    f = torch.compile(lambda q: zeromask.zero_soft_attention(q, q, q, backend="triton"),
                      fullgraph=True, backend="aot_eager")
    try:
        f(q)
    finally:
        dispatch.load("triton")


# --------------------------------------------------------------------------------------
# compiled for real GPUs, without one: Triton's toolchain (ptxas) for sm80
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backward", [False, True])
def test_autotune_pruning(backward):
    """Every head dim keeps some config; big head dims drop the big tiles."""
    from zeromask.kernels import autotune
    configs = autotune.BWD_CONFIGS if backward else autotune.FWD_CONFIGS
    prune = autotune.prune_bwd if backward else autotune.prune_fwd
    q16 = torch.empty(1, dtype=torch.float16)
    for d in (16, 64, 128, 256):
        kept = prune(configs, {"Q": q16}, BLOCK_D=d)
        assert kept, d
        if d == 256:
            assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept)
    assert len(prune(configs, {"Q": q16}, BLOCK_D=64)) > len(
        prune(configs, {"Q": q16}, BLOCK_D=256))


def test_kernels_compile_for_sm80():
    """Loop-carried types, dot shapes and so on are only checked by the compiler."""
    import subprocess
    import sys

    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton has no NVIDIA backend here: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "zeromask.kernels.aot_check", "--quick"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed" in proc.stdout


# --------------------------------------------------------------------------------------
# GPU only: the kernels compiled, fp16/bf16
# --------------------------------------------------------------------------------------
GPU_CASES = [
    dict(B=2, Hq=8, Hkv=2, Lq=257, Lk=257, D=64, causal=True),
    dict(B=1, Hq=4, Hkv=4, Lq=100, Lk=300, D=128, zero_mode="score", seqlens=True),
    dict(B=2, Hq=4, Hkv=1, Lq=131, Lk=131, D=40, rotary_dim=24, interleaved=True, radius=True),
    dict(B=1, Hq=2, Hkv=1, Lq=64, Lk=64, D=256, causal=True),
]


@needs_gpu
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("idx", range(len(GPU_CASES)))
def test_gpu_compiled(dtype, idx):
    check_attention(attention_case(**GPU_CASES[idx]), dtype, "triton", device="cuda")


@needs_gpu
def test_gpu_torch_compile_inductor():
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 4, 128, 64, generator=g).cuda().to(BF16).requires_grad_(True)
               for _ in range(3))
    kz = (torch.rand(2, 128, generator=g) < 0.2).cuda()
    f = lambda q, k, v: zeromask.zero_soft_attention(  # noqa: E731
        q, k, v, key_zero=kz, theta_q=500.0, theta_k=500.0, causal=True, backend="triton")
    eager = f(q, k, v)
    out = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, eager)
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all()
