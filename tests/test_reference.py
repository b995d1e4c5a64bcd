"""The reference against independent formulations: SDPA, hand loops, complex RoPE, gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from zeromask import reference

torch.manual_seed(0)


def rand(*shape, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def bottom_right_causal(lq, lk):
    """Bool mask, True = allowed, aligned to the bottom-right (as in decoding)."""
    i = torch.arange(lq).unsqueeze(1)
    j = torch.arange(lk).unsqueeze(0)
    return j <= i + (lk - lq)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 12), (12, 5)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_matches_sdpa_without_zero_tokens_or_rotary(causal, lq, lk, hq, hkv):
    q, k, v = rand(2, hq, lq, 16), rand(2, hkv, lk, 16), rand(2, hkv, lk, 16)
    out = reference.zero_soft_attention(q, k, v, causal=causal)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    mask = bottom_right_causal(lq, lk) if causal else None
    if causal and lq > lk:
        # rows with no allowed key: SDPA gives NaN there, the reference gives 0
        empty = ~mask.any(-1)
        want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
        want[:, :, empty] = 0.0
    else:
        want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [1e-6, 0.1, 1.0])
def test_prob_mode_is_sdpa_with_log_s_bias(causal, s):
    q, k, v = rand(2, 3, 11, 8), rand(2, 3, 11, 8), rand(2, 3, 11, 8)
    key_zero = torch.rand(2, 11) < 0.4
    out = reference.zero_soft_attention(q, k, v, key_zero=key_zero, zero_scale=s, causal=causal)
    bias = reference.sdpa_equivalent_mask(key_zero, s, torch.float64)
    if causal:
        bias = bias.masked_fill(~bottom_right_causal(11, 11), float("-inf"))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_prob_mode_multiplies_zero_key_weight_by_s():
    q, k = rand(1, 1, 3, 4), rand(1, 1, 6, 4)
    key_zero = torch.tensor([[True, False, True, False, False, False]])
    s = 0.01
    p = reference.zero_soft_attention_weights(q, k, key_zero=key_zero, zero_scale=s)
    raw = torch.exp(0.5 * q @ k.transpose(-1, -2))  # sm_scale = 4 ** -0.5
    raw = torch.where(key_zero.view(1, 1, 1, 6), raw * s, raw)
    torch.testing.assert_close(p, raw / raw.sum(-1, keepdim=True), rtol=1e-12, atol=1e-12)


def test_score_mode_matches_hand_loop():
    lq, lk, d = 3, 5, 4
    q, k, v = rand(1, 1, lq, d), rand(1, 1, lk, d), rand(1, 1, lk, d)
    key_zero = torch.tensor([[False, True, False, True, True]])
    s = 0.3
    out = reference.zero_soft_attention(q, k, v, key_zero=key_zero, zero_scale=s,
                                        zero_mode="score", causal=True)
    want = torch.zeros(lq, d, dtype=torch.float64)
    for i in range(lq):
        logits = []
        for j in range(lk):
            if j > i + (lk - lq):
                logits.append(float("-inf"))
                continue
            x = sum(q[0, 0, i, c].item() * k[0, 0, j, c].item() for c in range(d)) / math.sqrt(d)
            logits.append(x * s if key_zero[0, j] else x)
        m = max(logits)
        w = [math.exp(x - m) for x in logits]
        for j in range(lk):
            want[i] += w[j] / sum(w) * v[0, 0, j]
    torch.testing.assert_close(out[0, 0], want, rtol=1e-12, atol=1e-12)


def test_score_mode_gives_zero_keys_a_large_share_of_negative_rows():
    """The documented hazard of Echo's score mode: logits pulled toward 0, not -inf."""
    q = torch.ones(1, 1, 1, 4, dtype=torch.float64)
    k = -3.0 * torch.ones(1, 1, 4, 4, dtype=torch.float64)  # every logit is -6
    key_zero = torch.tensor([[True, False, False, False]])
    p_score = reference.zero_soft_attention_weights(q, k, key_zero=key_zero, zero_mode="score")
    p_prob = reference.zero_soft_attention_weights(q, k, key_zero=key_zero, zero_mode="prob")
    assert p_score[0, 0, 0, 0] > 0.9  # the "masked" key wins
    assert p_prob[0, 0, 0, 0] < 1e-5


def rope_complex(x, theta, positions, interleaved):
    """Standard RoPE written as complex multiplication (independent of reference)."""
    B, H, L, D = x.shape
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = positions.view(L, 1).double() * freqs.view(1, -1)
    rot = torch.polar(torch.ones_like(angles), angles)
    if interleaved:
        xc = torch.view_as_complex(x.reshape(B, H, L, D // 2, 2).contiguous())
        return torch.view_as_real(xc * rot).reshape(B, H, L, D)
    xc = torch.complex(x[..., : D // 2], x[..., D // 2:])
    y = xc * rot
    return torch.cat((y.real, y.imag), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_constant_theta_is_standard_rope(interleaved):
    x = rand(2, 3, 10, 16)
    y = reference.f0_rotary(x, 10000.0, None, None, interleaved)
    torch.testing.assert_close(y, rope_complex(x, 10000.0, torch.arange(10), interleaved))
    y = reference.f0_rotary(x, 500.0, 7, None, interleaved)  # int offset
    torch.testing.assert_close(y, rope_complex(x, 500.0, torch.arange(10) + 7, interleaved))


def test_rotary_dim_leaves_the_rest_and_radius_scales_pairs():
    x = rand(1, 2, 5, 12)
    radius = torch.rand(4, dtype=torch.float64) + 0.5
    y = reference.f0_rotary(x, 1000.0, None, 8, False, radius)
    torch.testing.assert_close(y[..., 8:], x[..., 8:])
    plain = reference.f0_rotary(x, 1000.0, None, 8, False)
    torch.testing.assert_close(y[..., :4], plain[..., :4] * radius)
    torch.testing.assert_close(y[..., 4:8], plain[..., 4:8] * radius)
    # rotation preserves each pair's norm
    n_x = x[..., :4] ** 2 + x[..., 4:8] ** 2
    n_y = plain[..., :4] ** 2 + plain[..., 4:8] ** 2
    torch.testing.assert_close(n_x, n_y)


def test_per_position_theta_uses_each_positions_theta():
    x = rand(1, 1, 4, 8)
    theta = torch.tensor([[100.0, 2000.0, 5.0, 9000.0]], dtype=torch.float64)
    y = reference.f0_rotary(x, theta)
    for t in range(4):
        want = rope_complex(x[:, :, t:t + 1], theta[0, t].item(), torch.tensor([t]), False)
        torch.testing.assert_close(y[:, :, t:t + 1], want)


def test_rope_scores_depend_on_relative_position_only():
    q, k, v = rand(1, 2, 6, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    kw = dict(theta_q=300.0, theta_k=300.0)
    a = reference.zero_soft_attention(q, k, v, pos_q=0, pos_k=0, **kw)
    b = reference.zero_soft_attention(q, k, v, pos_q=13, pos_k=13, **kw)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("zero_mode", ["prob", "score"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_every_input(zero_mode, causal):
    B, Hq, Hkv, Lq, Lk, D, R = 1, 2, 1, 4, 5, 6, 4
    q, k, v = rand(B, Hq, Lq, D, requires_grad=True), rand(B, Hkv, Lk, D, requires_grad=True), \
        rand(B, Hkv, Lk, D, requires_grad=True)
    theta_q = (torch.rand(B, Lq, dtype=torch.float64) * 50 + 2).requires_grad_()
    theta_k = (torch.rand(B, Lk, dtype=torch.float64) * 50 + 2).requires_grad_()
    radius = (torch.rand(R // 2, dtype=torch.float64) + 0.5).requires_grad_()
    zero_scale = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    key_zero = torch.tensor([[True, False, True, False, False]])

    def f(q, k, v, theta_q, theta_k, radius, zero_scale):
        return reference.zero_soft_attention(
            q, k, v, key_zero=key_zero, zero_scale=zero_scale, zero_mode=zero_mode,
            causal=causal, theta_q=theta_q, theta_k=theta_k, rotary_dim=R, radius=radius,
            interleaved=True)

    assert torch.autograd.gradcheck(f, (q, k, v, theta_q, theta_k, radius, zero_scale))


def test_fully_hard_masked_row_is_zero_with_finite_grads():
    q, k, v = rand(1, 2, 3, 4, requires_grad=True), rand(1, 2, 5, 4, requires_grad=True), \
        rand(1, 2, 5, 4, requires_grad=True)
    seqlens = torch.tensor([0])  # every key of batch 0 is beyond its length
    out = reference.zero_soft_attention(q, k, v, seqlens_k=seqlens, theta_q=50.0, theta_k=50.0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    lse = reference.zero_soft_attention_lse(q, k, seqlens_k=seqlens)
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("causal", [False, True])
def test_hard_mode_is_sdpa_with_zero_tokens_removed(causal):
    """zero_mode="hard": zero-token keys get -inf, exactly SDPA with a boolean mask; a row
    that sees only zero tokens (causal: the first rows of a batch whose first keys are zero
    tokens; or every key a zero token) is 0 with finite gradients and lse -inf; no gradient
    reaches zero_scale; prob mode tends to it as s -> 0 on rows with a key left."""
    import torch.nn.functional as F
    q, k, v = rand(2, 3, 6, 8, requires_grad=True), rand(2, 3, 6, 8), rand(2, 3, 6, 8)
    key_zero = torch.tensor([[True, True, False, True, False, False],
                             [True] * 6])
    zs = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = reference.zero_soft_attention(q, k, v, key_zero=key_zero, zero_scale=zs,
                                        zero_mode="hard", causal=causal)
    allowed = ~key_zero[:, None, None, :].expand(2, 1, 6, 6)
    if causal:
        allowed = allowed & torch.ones(6, 6, dtype=torch.bool).tril()
    empty = ~allowed.any(-1, keepdim=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty).masked_fill(
        empty, 0.0)
    torch.testing.assert_close(out, want)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # batch 1: every key a zero token
    if causal:
        assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and zs.grad is None
    lse = reference.zero_soft_attention_lse(q, k, key_zero=key_zero, zero_mode="hard",
                                            causal=causal)
    assert torch.equal(torch.isneginf(lse), empty[..., 0].expand(2, 3, 6))
    soft = reference.zero_soft_attention(q, k, v, key_zero=key_zero, zero_scale=1e-30,
                                         zero_mode="prob", causal=causal)
    torch.testing.assert_close(soft[~empty.expand(2, 3, 6, 1)[..., 0]],
                               out[~empty.expand(2, 3, 6, 1)[..., 0]])


def test_causal_rows_with_no_key_are_zero():
    q, k, v = rand(1, 1, 6, 4, requires_grad=True), rand(1, 1, 3, 4), rand(1, 1, 3, 4)
    out = reference.zero_soft_attention(q, k, v, causal=True)  # Lq > Lk: 3 rows see nothing
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 4, dtype=torch.float64))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("zero_mode", ["prob", "score"])
def test_all_zero_token_rows_are_ordinary(zero_mode):
    q, k, v = rand(1, 1, 3, 4, requires_grad=True), rand(1, 1, 5, 4), rand(1, 1, 5, 4)
    key_zero = torch.ones(1, 5, dtype=torch.bool)
    zs = torch.tensor(1e-6, dtype=torch.float64, requires_grad=True)
    out = reference.zero_soft_attention(q, k, v, key_zero=key_zero, zero_scale=zs,
                                        zero_mode=zero_mode)
    assert torch.isfinite(out).all()
    if zero_mode == "prob":  # a common factor s cancels: same as no zero tokens
        torch.testing.assert_close(out, reference.zero_soft_attention(q, k, v))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(zs.grad)


def test_float32_and_half_inputs_keep_their_dtype():
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        q = torch.randn(1, 2, 4, 8, dtype=dt)
        out = reference.zero_soft_attention(q, q, q, theta_q=100.0, theta_k=100.0,
                                            key_zero=torch.tensor([[True, False, False, True]]))
        assert out.dtype == dt and torch.isfinite(out).all()


@pytest.mark.parametrize("zero_fraction", [1.0, 0.9, 0.5, 0.1])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_zero_scale_gradient_is_the_float64_one(zero_fraction, causal):
    """The spec's d/d zero_scale in float32 (issue 12, item 5). At s = 1e-6 the direct
    softmax's sum over zero keys of dS, divided by s, turned float32 rounding into 1.43 where
    the exact value is 0 (every key a zero token) and 1-2% errors elsewhere. The reference
    now forms softmax(S + ln s) as a mixture whose d/d ln s has no cancellation."""
    g = torch.Generator().manual_seed(int(zero_fraction * 10) + 2 * causal)
    q, k, v, do = (torch.randn(2, 3, 24, 8, generator=g, dtype=torch.float64)
                   for _ in range(4))
    key_zero = torch.rand(2, 24, generator=g) < zero_fraction
    if zero_fraction == 1.0:
        key_zero[:] = True
    grads = {}
    for dtype in (torch.float32, torch.float64):
        zs = torch.tensor(1e-6, dtype=dtype, requires_grad=True)
        out = reference.zero_soft_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                                            key_zero=key_zero, zero_scale=zs, causal=causal)
        (out * do.to(dtype)).sum().backward()
        grads[dtype] = zs.grad.double()
    exact = grads[torch.float64]
    if zero_fraction == 1.0:  # softmax(S + ln s) does not depend on s at all
        assert exact == 0 and grads[torch.float32] == 0
    else:
        torch.testing.assert_close(grads[torch.float32], exact, rtol=2e-5, atol=0)
