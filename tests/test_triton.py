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
from zeromask.backends import triton as triton_backend  # noqa: E402

from cases import attention_case, check_attention, f0_theta  # noqa: E402
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
# attention: every feature against the float64 reference, forward and every gradient
# --------------------------------------------------------------------------------------
def _without(case, *names):
    for n in names:
        case.pop(n, None)
    return case


FEATURES = {
    # name: (attention_case kwargs, dtype)
    "prob-fp32": (dict(), F32),
    "prob-fp16": (dict(), F16),
    "prob-bf16": (dict(), BF16),
    "score-fp32": (dict(zero_mode="score"), F32),
    "score-fp16-causal": (dict(zero_mode="score", causal=True), F16),
    "causal-fp32": (dict(causal=True), F32),
    "causal-bf16-gqa4": (dict(causal=True, Hq=4, Hkv=1), BF16),
    "mha-fp32": (dict(Hq=2, Hkv=2), F32),
    "mqa-fp32": (dict(Hq=4, Hkv=1), F32),
    "cross-lq5-lk17": (dict(Lq=5, Lk=17), F32),
    "cross-lq17-lk5-score": (dict(Lq=17, Lk=5, zero_mode="score"), F32),
    "causal-cross-lq5-lk17": (dict(causal=True, Lq=5, Lk=17), F32),
    "lq1": (dict(Lq=1, Lk=17), F32),
    "lq1-causal": (dict(Lq=1, Lk=17, causal=True), F16),
    # a single key: softmax is exactly 1 and the exact dS is 0; in fp32 the kernel's
    # dP - delta leaves ~1e-6 of rounding there, beyond a floor built for nonzero grads
    "lk1-fp16": (dict(Lq=17, Lk=1), F16),
    "l1": (dict(Lq=1, Lk=1, B=1, Hq=2, Hkv=1), F16),
    "l131-causal": (dict(Lq=131, Lk=131, B=1, Hq=1, Hkv=1, D=16, causal=True), F32),
    "l131-q-cross-score-fp16": (dict(Lq=131, Lk=17, B=1, Hq=2, Hkv=1, D=16,
                                     zero_mode="score"), F16),
    "l131-k-seqlens": (dict(Lq=17, Lk=131, B=2, Hq=2, Hkv=1, D=16, seqlens=True), F32),
    "d16-fp16": (dict(D=16), F16),
    "d40-bf16": (dict(D=40, B=1), BF16),
    "d128-rot64-interleaved-fp16": (dict(D=128, B=1, Hq=2, Hkv=1, rotary_dim=64,
                                         interleaved=True, radius=True), F16),
    "d256-fp32": (dict(D=256, B=1, Hq=1, Hkv=1), F32),
    "d40-rot24-fp32": (dict(D=40, rotary_dim=24), F32),
    "d64-interleaved": (dict(D=64, B=1, interleaved=True), F32),
    "d128-fp32": (dict(D=128, B=1, Hq=2, Hkv=1), F32),
    "d128-bf16-causal": (dict(D=128, B=1, Hq=1, Hkv=1, causal=True), BF16),
    "radius": (dict(radius=True), F32),
    "radius-interleaved-rot-lt-d": (dict(D=40, rotary_dim=16, interleaved=True, radius=True),
                                    F32),
    "seqlens": (dict(seqlens=True), F32),
    "seqlens-causal-score-fp16": (dict(seqlens=True, causal=True, zero_mode="score"), F16),
    "no-rotary": (dict(rotary=False), F32),
    "no-zero-tokens": (dict(zero_frac=0.0), F32),
    "all-zero-tokens": (dict(zero_frac=1.1), F32),
    "tiny-zero-scale": (dict(zero_scale=1e-6), F32),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_attention_feature(name):
    kwargs, dtype = FEATURES[name]
    case = attention_case(**kwargs)
    if kwargs.get("zero_frac") == 0.0:
        # no key_zero at all (the kernels' no-zero-token path): zero_scale then has no
        # gradient, so it is left at its default float
        _without(case, "key_zero", "zero_scale")
    check_attention(case, dtype, "triton", device=DEVICE)


def test_attention_rotary_on_one_side():
    """Cross-attention with rotary keys only (text queries, audio keys), and q only."""
    case = attention_case(Lq=5, Lk=17, radius=True)
    check_attention(_without(dict(case), "theta_q"), F32, "triton", device=DEVICE)
    check_attention(_without(dict(case), "theta_k"), F32, "triton", device=DEVICE)


def test_attention_explicit_positions_and_scale():
    """Explicit (B, L) positions for both sides, a custom sm_scale, a float theta on k."""
    g = torch.Generator().manual_seed(8)
    case = attention_case(Lq=9, Lk=17, rotary_dim=16, causal=True)
    case["pos_q"] = torch.randint(0, 400, (2, 9), generator=g).double()
    case["pos_k"] = torch.randint(0, 400, (2, 17), generator=g).double()
    case["theta_k"] = 8000.0
    case["sm_scale"] = 0.3
    check_attention(case, F32, "triton", device=DEVICE)


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


def _backend_forward(case, dtype=F32):
    from zeromask.ops import _normalise_attention
    kw = {k: v for k, v in case.items() if k not in ("q", "k", "v")}
    a = _normalise_attention(case["q"].to(dtype).to(DEVICE), case["k"].to(dtype).to(DEVICE),
                             case["v"].to(dtype).to(DEVICE),
                             **{n: (v.to(DEVICE) if torch.is_tensor(v) else v)
                                for n, v in {**dict(key_zero=None, zero_scale=1e-6,
                                                    zero_mode="prob", causal=False,
                                                    sm_scale=None, seqlens_k=None,
                                                    theta_q=None, theta_k=None, pos_q=None,
                                                    pos_k=None, rotary_dim=None,
                                                    interleaved=False, radius=None),
                                             **kw}.items()})
    f = lambda t: None if t is None else t.float()  # noqa: E731
    out, lse = triton_backend.BACKEND.attention_forward(
        a["q"], a["k"], a["v"], a["key_zero"], a["zero_scale"].float(), f(a["theta_q"]),
        f(a["theta_k"]), f(a["pos_q"]), f(a["pos_k"]), f(a["radius"]), a["seqlens_k"],
        zero_mode=a["zero_mode"], causal=a["causal"], sm_scale=a["sm_scale"],
        rotary_dim=a["rotary_dim"], interleaved=a["interleaved"])
    return a, out, lse


@pytest.mark.parametrize("zero_mode", ["prob", "score"])
def test_attention_saved_lse(zero_mode):
    case = attention_case(Lq=9, Lk=17, causal=True, seqlens=True, zero_mode=zero_mode)
    case["seqlens_k"] = torch.tensor([17, 0])
    a, out, lse = _backend_forward(case)
    # from the normalised arguments: with causal and Lq != Lk the default query positions
    # are offset by Lk - Lq (ops._normalise_attention)
    d = {n: (t.cpu().double() if torch.is_tensor(t) and t.is_floating_point() else
             (t.cpu() if torch.is_tensor(t) else t)) for n, t in a.items()}
    expect = reference.zero_soft_attention_lse(d.pop("q"), d.pop("k"),
                                               **_without(d, "v"))
    assert lse.dtype == torch.float32 and lse.shape == expect.shape
    lse = lse.cpu().double()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expect))
    finite = torch.isfinite(expect)
    assert torch.isfinite(lse[finite]).all()
    torch.testing.assert_close(lse[finite], expect[finite], atol=1e-5, rtol=1e-5)
    assert torch.all(out[1] == 0)


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
    q = torch.randn(1, 1, 4, 16)
    assert sup("attention", q=q, k=q, v=q) is None  # interpreter on
    assert "float64" in sup("attention", q=q.double(), k=q.double(), v=q.double())
    big = torch.randn(1, 1, 4, 264)
    assert "256" in sup("attention", q=big, k=big, v=big)
    assert sup("rotary", x=q) is None
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        assert "TRITON_INTERPRET" in sup("attention", q=q, k=q, v=q)
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
