"""ZeroSoftAttention as a drop-in for nn.MultiheadAttention; F0Rotary; zero-token helpers."""
import copy
import math

import pytest
import torch
from torch import nn

import zeromask
from zeromask import F0Rotary, ZeroSoftAttention, zero
from zeromask.modules import resample_contour

from cases import kernel_backends
from tolerance import assert_output_close

torch.manual_seed(0)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kdim", [None, 24])
def test_from_module_matches_mha(batch_first, kdim):
    mha = nn.MultiheadAttention(32, 4, kdim=kdim, vdim=kdim, batch_first=batch_first)
    zsa = ZeroSoftAttention.from_module(mha)
    L, S, B = 7, 9, 3
    kd = kdim or 32
    q = torch.randn(B, L, 32) if batch_first else torch.randn(L, B, 32)
    kv = torch.randn(B, S, kd) if batch_first else torch.randn(S, B, kd)
    want, _ = mha(q, kv, kv, need_weights=False)
    got, w = zsa(q, kv, kv)
    assert w is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_causal_mask_and_weights_match_mha():
    mha = nn.MultiheadAttention(16, 2)
    zsa = ZeroSoftAttention.from_module(mha)
    x = torch.randn(6, 2, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    want, want_w = mha(x, x, x, attn_mask=mask, need_weights=True)
    got, got_w = zsa(x, x, x, attn_mask=mask, need_weights=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    got2, _ = zsa(x, x, x, is_causal=True)
    torch.testing.assert_close(got2, want, rtol=1e-5, atol=1e-5)


def test_unbatched_input_matches_mha():
    mha = nn.MultiheadAttention(16, 4)
    zsa = ZeroSoftAttention.from_module(mha)
    x = torch.randn(5, 16)
    torch.testing.assert_close(zsa(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-5)


def test_state_dict_loads_both_ways():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    zsa = ZeroSoftAttention(16, 4, batch_first=True, learnable_zero_scale=True)
    assert set(zsa.state_dict()) - {"zero_scale_log"} == set(mha.state_dict())
    zsa.load_state_dict(mha.state_dict())  # strict: zero_scale_log keeps its value
    back = nn.MultiheadAttention(16, 4, batch_first=True)
    plain = ZeroSoftAttention(16, 4, batch_first=True)
    plain.load_state_dict(zsa.state_dict(), strict=False)
    back.load_state_dict(plain.state_dict())  # strict both ways without the extra
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(back(x, x, x)[0], mha(x, x, x)[0])
    assert math.isclose(zsa.zero_scale.item(), 1e-6, rel_tol=1e-5)


def test_key_padding_mask_is_soft_not_hard():
    zsa = ZeroSoftAttention(16, 2, batch_first=True, zero_scale=1e-6)
    x = torch.randn(1, 6, 16)
    pad = torch.tensor([[False, False, False, True, True, True]])
    out_soft, w = zsa(x, x, x, key_padding_mask=pad, need_weights=True)
    assert torch.isfinite(out_soft).all()
    assert (w[..., 3:] > 0).all() and (w[..., 3:] < 1e-4).all()
    # every key padded: an ordinary (uniformly scaled) row, not NaN as in MHA
    out_all, _ = zsa(x, x, x, key_padding_mask=torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(out_all, zsa(x, x, x)[0], rtol=1e-5, atol=1e-5)


def test_learnable_zero_scale_and_rotary_get_gradients():
    rot = F0Rotary(learnable_radius=True, rotary_dim=8)
    zsa = ZeroSoftAttention(16, 2, batch_first=True, learnable_zero_scale=True, zero_scale=0.1,
                            rotary=rot, num_kv_heads=1)
    x = torch.randn(2, 8, 16)
    f0 = torch.tensor([[0, 120, 130, 140, float("nan"), 0, 200, 210]] * 2, dtype=torch.float32)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[:, 0] = True
    out, _ = zsa(x, x, x, key_padding_mask=pad, f0=f0, is_causal=True)
    out.square().sum().backward()
    for name, p in zsa.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert zsa.zero_scale_log.grad.abs() > 0
    assert rot.t_min.grad.abs() > 0 and rot.theta_base.grad.abs() > 0


def test_gqa_module_and_cross_attention_with_separate_contours():
    rot = F0Rotary()
    zsa = ZeroSoftAttention(32, 8, num_kv_heads=2, kdim=12, vdim=12, batch_first=True,
                            rotary=rot, zero_mode="score")
    text = torch.randn(2, 5, 32)
    audio = torch.randn(2, 11, 12)
    f0 = torch.rand(2, 40) * 200 + 80
    out, _ = zsa(text, audio, audio, key_f0=f0, key_padding_mask=torch.rand(2, 11) < 0.3)
    assert out.shape == (2, 5, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_kv_cache_steps_through_the_public_pieces_equal_the_causal_forward(num_kv_heads):
    """project_key_value once per token, attend one query at position t against the cache:
    the same rows as forward(is_causal=True) over the whole sequence, zero tokens and f0
    rotary included; attend on full projections equals forward; wrong heads are refused."""
    torch.manual_seed(3)
    zsa = ZeroSoftAttention(32, 4, num_kv_heads=num_kv_heads, batch_first=True,
                            rotary=F0Rotary(), zero_scale=1e-3).eval()
    x = torch.randn(2, 7, 32)
    f0 = torch.rand(2, 7) * 200 + 80
    zero_keys = torch.rand(2, 7) < 0.3
    zero_keys[:, 0] = True  # the start token
    with torch.no_grad():
        full, _ = zsa(x, x, x, key_padding_mask=zero_keys, is_causal=True, f0=f0)
        q = zsa.project_query(x)
        k, v = zsa.project_key_value(x)
        again = zsa.attend(q, k, v, key_padding_mask=zero_keys, is_causal=True, f0=f0)
        torch.testing.assert_close(again, full)
        steps = []
        for t in range(7):
            kt, vt = zsa.project_key_value(x[:, : t + 1])
            steps.append(zsa.attend(zsa.project_query(x[:, t:t + 1]), kt, vt,
                                    key_padding_mask=zero_keys[:, : t + 1],
                                    query_f0=f0[:, t:t + 1], key_f0=f0[:, : t + 1],
                                    query_pos=t))
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="q must be"):
            zsa.attend(torch.randn(2, 3, 7, 8), k, v)
        with pytest.raises(ValueError, match="k must be"):
            zsa.attend(q, q[:, :, :, :4], v)


# the reference and every kernel backend that takes CPU tensors here
@pytest.mark.parametrize("backend", ["reference"] + [n for n, dev in kernel_backends()
                                                     if dev == "cpu"])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_rotated_key_cache_equals_the_causal_forward(backend, num_kv_heads):
    """A KV cache that keeps keys rotated (rotate_keys once per appended key, attend with
    keys_rotated=True: only the query is rotated) gives the rows of the float64 reference's
    causal forward, with per-key f0 theta, a learnable radius, zero tokens and a partial
    rotary dim, for every backend, within the shared tolerance; without a rotary
    rotate_keys returns its input; wrong heads are refused."""
    torch.manual_seed(5)
    rot = F0Rotary(rotary_dim=6, learnable_radius=True)
    with torch.no_grad():
        rot.radius.uniform_(0.7, 1.3)
    zsa = ZeroSoftAttention(32, 4, num_kv_heads=num_kv_heads, batch_first=True,
                            rotary=rot, zero_scale=1e-3, backend=backend).eval()
    x = torch.randn(2, 9, 32)
    f0 = torch.rand(2, 9) * 200 + 80
    zero_keys = torch.rand(2, 9) < 0.3
    zero_keys[:, 0] = True  # the start token

    def full(module, dtype):
        module = copy.deepcopy(module).to(dtype)
        module.backend = "reference"
        return module(x.to(dtype), x.to(dtype), x.to(dtype), key_padding_mask=zero_keys,
                      is_causal=True, f0=f0.to(dtype))[0]

    with torch.no_grad():
        oracle, same_dtype = full(zsa, torch.float64), full(zsa, torch.float32)
        k_cache = torch.empty(2, zsa.num_kv_heads, 0, zsa.head_dim)
        v_cache = k_cache.clone()
        steps = []
        for t in range(9):
            k, v = zsa.project_key_value(x[:, t:t + 1])
            k = zsa.rotate_keys(k, key_f0=f0[:, t:t + 1], key_pos=t)
            k_cache, v_cache = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)
            steps.append(zsa.attend(zsa.project_query(x[:, t:t + 1]), k_cache, v_cache,
                                    key_padding_mask=zero_keys[:, : t + 1],
                                    query_f0=f0[:, t:t + 1], query_pos=t,
                                    keys_rotated=True))
        assert_output_close(f"rotated cache ({backend})", torch.cat(steps, 1), oracle,
                            same_dtype, torch.float32)
        plain = ZeroSoftAttention(32, 4, num_kv_heads=num_kv_heads, batch_first=True)
        k, _ = plain.project_key_value(x)
        assert plain.rotate_keys(k, key_pos=3) is k
        with pytest.raises(ValueError, match="k must be"):
            zsa.rotate_keys(k[..., :4])


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dropout"):
        ZeroSoftAttention(16, 2, dropout=0.1)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ZeroSoftAttention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="zero_scale"):
        ZeroSoftAttention(16, 4, zero_scale=0.0)
    zsa = ZeroSoftAttention(16, 2)
    x = torch.randn(4, 1, 16)
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        zsa(x, x, x, key_padding_mask=torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, Lk\)"):
        zsa(x, x, x, key_padding_mask=torch.zeros(4, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        zsa(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed dim"):
        zsa(torch.randn(4, 1, 8), x, x)
    with pytest.raises(ValueError, match="dropout"):
        ZeroSoftAttention.from_module(nn.MultiheadAttention(16, 2, dropout=0.1))


def test_module_compiles_fullgraph():
    zsa = ZeroSoftAttention(16, 2, batch_first=True, rotary=F0Rotary())
    x = torch.randn(2, 6, 16)
    f0 = torch.rand(2, 6) * 100 + 100
    pad = torch.rand(2, 6) < 0.3
    compiled = torch.compile(zsa, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, x, x, key_padding_mask=pad, f0=f0)[0],
                               zsa(x, x, x, key_padding_mask=pad, f0=f0)[0])


# ---------------------------------------------------------------- F0Rotary
def test_f0_rotary_echo_mapping_and_unvoiced():
    rot = F0Rotary(mode="echo")
    f0 = torch.tensor([[0.0, float("nan"), 300.0, 30.0, 1000.0]])
    theta = rot(f0)
    assert torch.isfinite(theta).all()
    assert theta[0, 0] == theta[0, 1] == 10000.0  # unvoiced -> theta_base
    torch.testing.assert_close(theta[0, 2], torch.tensor(10000.0))  # f0 = 300 -> t_max
    lo = 800 + 9200 * math.log1p(50 / 700) / math.log1p(300 / 700)  # clamped to fmin
    torch.testing.assert_close(theta[0, 3], torch.tensor(lo))
    assert theta[0, 4] > 10000  # clamped to fmax = 600, above the 300 Hz anchor


def test_f0_rotary_additive_and_constant():
    rot = F0Rotary(mode="additive", theta_base=500.0)
    theta = rot(torch.tensor([120.0, 0.0]))
    torch.testing.assert_close(theta, torch.tensor([[620.0, 500.0]]))
    assert rot(None, 4, batch=3).shape == (3, 4)
    with pytest.raises(ValueError, match="f0 contour or a length"):
        rot()
    with pytest.raises(ValueError, match="inf"):
        rot(torch.tensor([float("inf")]))


def test_resample_contour_keeps_voiced_values_and_gaps():
    f0 = torch.tensor([[100.0, 100.0, 0.0, 0.0, 200.0, 200.0]])
    up = resample_contour(f0, 11)
    assert up[0, 0] == 100.0 and up[0, -1] == 200.0
    assert (up[0, 4:6] == 0).all()  # the gap survives
    voiced = up[up > 0]
    assert ((voiced >= 100) & (voiced <= 200)).all()  # no dip toward 0 Hz next to gaps
    down = resample_contour(torch.tensor([[float("nan")] * 8]), 3)
    assert torch.equal(down, torch.zeros(1, 3))


# ---------------------------------------------------------------- zero tokens
def test_zero_helpers():
    assert torch.equal(zero.from_ids(torch.tensor([[0, 5, 0, 7]])),
                       torch.tensor([[True, False, True, False]]))
    k = torch.randn(2, 3, 4, 8)
    k[0, :, 1, 0] = 0
    k[1, 0, 2, 0] = 0  # only one head: not a zero token
    assert torch.equal(zero.from_keys(k), torch.tensor([[False, True, False, False]] * 1
                                                       + [[False, False, False, False]]))
    feats = torch.randn(1, 5, 4)
    feats[0, 4] = 0
    log_mel = torch.full((1, 5, 4), -10.0)
    log_mel[0, 2] = -90.0  # 80 dB below the others
    z = zero.from_audio(feats, log_mel, top_db=50.0)
    assert torch.equal(z, torch.tensor([[False, False, True, False, True]]))
    z = zero.from_audio(feats, log_mel, top_db=None, threshold_db=-5.0)
    assert z.all()
    assert torch.equal(zero.lengths_to_zero(torch.tensor([2, 4]), 4),
                       torch.tensor([[False, False, True, True], [False] * 4]))


def test_public_api_names():
    for name in ("zero_soft_attention", "f0_rotary", "ZeroSoftAttention", "F0Rotary", "zero",
                 "dispatch", "reference", "BackendError", "available_backends"):
        assert hasattr(zeromask, name), name


def test_kv_cache_pieces_follow_the_module_layout():
    """batch_first=False (MHA's default): the pieces take and give (L, B, E) like forward,
    so a decoding loop written for that layout equals the causal forward (it used to read
    L as B silently)."""
    torch.manual_seed(11)
    zsa = ZeroSoftAttention(32, 4, rotary=F0Rotary(), zero_scale=1e-3).eval()
    x = torch.randn(6, 2, 32)                                  # (L, B, E)
    zero_keys = torch.zeros(2, 6, dtype=torch.bool)
    zero_keys[:, 0] = True
    with torch.no_grad():
        full, _ = zsa(x, x, x, key_padding_mask=zero_keys, is_causal=True)
        q = zsa.project_query(x)
        k, v = zsa.project_key_value(x)
        assert q.shape == (2, 4, 6, 8) and k.shape == v.shape == (2, 4, 6, 8)
        again = zsa.attend(q, k, v, key_padding_mask=zero_keys, is_causal=True)
        assert again.shape == (6, 2, 32)
        torch.testing.assert_close(again, full)
        steps = []
        for t in range(6):
            kt, vt = zsa.project_key_value(x[: t + 1])
            steps.append(zsa.attend(zsa.project_query(x[t:t + 1]), kt, vt,
                                    key_padding_mask=zero_keys[:, : t + 1], query_pos=t))
        torch.testing.assert_close(torch.cat(steps, 0), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_pieces_name_the_argument_in_errors():
    zsa = ZeroSoftAttention(32, 4, batch_first=True, rotary=F0Rotary()).eval()
    x = torch.randn(2, 5, 32)
    q = zsa.project_query(x)
    k, v = zsa.project_key_value(x)
    with pytest.raises(ValueError, match=r"query must be \(B, L, 32\).*batch_first=True"):
        zsa.project_query(x[0])
    with pytest.raises(ValueError, match=r"key must be \(B, L, 32\)"):
        zsa.project_key_value(x[0])
    with pytest.raises(ValueError, match="key and value must share"):
        zsa.project_key_value(x, x[:, :3])
    with pytest.raises(ValueError, match=r"heads must be \(B, 4, L, 8\)"):
        zsa.project_output(k[:, :2])
    with pytest.raises(TypeError, match="k must be a floating tensor"):
        zsa.rotate_keys(k.long())
    with pytest.raises(TypeError, match="key_pos must be None, an int offset"):
        zsa.rotate_keys(k, key_pos=True)
    with pytest.raises(ValueError, match=r"key_f0 must be \(B, T\) with B = 2"):
        zsa.rotate_keys(k, key_f0=torch.rand(3, 5) * 100 + 80)
    with pytest.raises(TypeError, match="query_pos must be None, an int offset"):
        zsa.attend(q, k, v, query_pos=2.0)
    with pytest.raises(ValueError, match=r"query_f0 must be \(B, T\) with B = 2"):
        zsa.attend(q, k, v, query_f0=torch.rand(3, 5) * 100 + 80)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, Lk\)"):
        zsa.attend(q, k, v, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    # MHA's float key padding mask works in attend as in forward
    mask = torch.zeros(2, 5)
    mask[:, 0] = float("-inf")
    with torch.no_grad():
        torch.testing.assert_close(zsa.attend(q, k, v, key_padding_mask=mask),
                                   zsa.attend(q, k, v, key_padding_mask=mask.isinf()))
    with pytest.raises(ValueError, match="num_kv_heads=2 has no weights to copy"):
        ZeroSoftAttention.from_module(nn.MultiheadAttention(32, 4), num_kv_heads=2)
    # the per-step contour: one frame, from resample_contour at the text rate
    f0 = torch.rand(2, 40) * 200 + 80
    step_f0 = zeromask.resample_contour(f0, 5)[:, 3:4]
    assert step_f0.shape == (2, 1)
    assert zsa.rotate_keys(k[:, :, 3:4], key_f0=step_f0, key_pos=3).shape == (2, 4, 1, 8)
