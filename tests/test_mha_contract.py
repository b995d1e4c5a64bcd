"""``ZeroSoftAttention`` read as ``nn.MultiheadAttention`` reads its inputs (issue 13, part 1:
the inputs that were misread). With a vanishing zero_scale a zero token is as good as
removed, so MHA's key padding and the module's zero tokens must give the same output."""
import itertools

import pytest
import torch
from torch import nn

import zeromask

TINY_SCALE = 1e-30  # exp(ln 1e-30) next to O(1) weights: removal, to float32's precision


def _pair(batch_first, E=16, H=4, kdim=None):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim)
    return mha, zeromask.ZeroSoftAttention.from_module(mha, zero_scale=TINY_SCALE,
                                                       backend="reference")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first, mask, causal", list(itertools.product(
    [False, True], [None, "bool", "float"], ["none", "attn_mask", "attn_mask+is_causal"])))
def test_unbatched_and_batched_inputs_match_mha(batch_first, mask, causal):
    mha, zsa = _pair(batch_first)
    L = 7
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(L, dtype=torch.bool)
    pad[5:] = True
    for unbatched in (True, False):
        if unbatched:
            x = torch.randn(L, 16, generator=g)
            kpm = pad
        else:
            x = torch.randn(3, L, 16, generator=g) if batch_first else torch.randn(L, 3, 16,
                                                                                generator=g)
            kpm = pad.expand(3, L).clone()
        kw = {}
        if mask == "bool":
            kw["key_padding_mask"] = kpm
        elif mask == "float":
            kw["key_padding_mask"] = torch.zeros(kpm.shape).masked_fill(kpm, float("-inf"))
        if causal != "none":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
            kw["is_causal"] = causal == "attn_mask+is_causal"
        want = mha(x, x, x, need_weights=False, **kw)[0]
        got = zsa(x, x, x, **kw)[0]
        assert got.shape == want.shape
        _close(got, want)


def test_unbatched_with_batch_first_is_one_sequence_not_many():
    mha, zsa = _pair(batch_first=True)
    x = torch.randn(6, 16)
    _close(zsa(x, x, x)[0], mha(x, x, x, need_weights=False)[0])
    # the same sequence as a batch of one
    _close(zsa(x, x, x)[0], zsa(x[None], x[None], x[None])[0][0])


def test_a_causal_mask_that_is_not_the_kernels_is_applied_as_given_not_replaced():
    """MHA applies attn_mask as given (is_causal is only a hint): with Lq != Lk its top-left
    causal mask is not the kernels' bottom-right one, so it must not be swapped for it; it
    goes through the reference, the bottom-right one through the kernels."""
    mha, zsa = _pair(batch_first=True)
    zsa.backend = None  # the automatic choice: a kernel where one applies
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    top_left = torch.triu(torch.ones(3, 5, dtype=torch.bool), diagonal=1)
    for is_causal in (False, True):
        _close(zsa(q, kv, kv, attn_mask=top_left, is_causal=is_causal)[0],
               mha(q, kv, kv, attn_mask=top_left, is_causal=is_causal, need_weights=False)[0])
    bottom_right = torch.triu(torch.ones(3, 5, dtype=torch.bool), diagonal=1 + 5 - 3)
    _close(zsa(q, kv, kv, attn_mask=bottom_right)[0],
           mha(q, kv, kv, attn_mask=bottom_right, need_weights=False)[0])


def _mha_masks(kind, B, H, Lq, Lk, g):
    """An arbitrary attn_mask of one of MHA's forms, every row keeping at least one key."""
    shape = (Lq, Lk) if kind.endswith("2d") else (B * H, Lq, Lk)
    allowed = torch.rand(shape, generator=g) < 0.6
    allowed[..., 0] = True
    if kind.startswith("bool"):
        return ~allowed
    bias = torch.randn(shape, generator=g)  # finite additive biases, -inf where masked
    return bias.masked_fill(~allowed, float("-inf"))


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # MHA's own
@pytest.mark.parametrize("kind", ["bool2d", "bool3d", "float2d", "float3d"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("lq,lk", [(6, 6), (4, 7)])
def test_arbitrary_attn_masks_match_mha(kind, batch_first, lq, lk):
    """2-D and 3-D, bool and float (additive) masks, self- and cross-attention shapes, with
    key padding (zero tokens at a vanishing scale) and need_weights: MHA's outputs and
    weights, and gradients flow to the inputs."""
    mha, zsa = _pair(batch_first)
    g = torch.Generator().manual_seed(2)
    B = 3
    mask = _mha_masks(kind, B, 4, lq, lk, g)
    q = torch.randn((B, lq, 16) if batch_first else (lq, B, 16), generator=g)
    kv = torch.randn((B, lk, 16) if batch_first else (lk, B, 16), generator=g)
    kpm = torch.zeros(B, lk, dtype=torch.bool)
    kpm[1, -2:] = True
    want, want_w = mha(q, kv, kv, attn_mask=mask, key_padding_mask=kpm, need_weights=True)
    qg = q.clone().requires_grad_(True)
    got, got_w = zsa(qg, kv, kv, attn_mask=mask, key_padding_mask=kpm, need_weights=True)
    _close(got, want)
    _close(got_w, want_w)
    got.sum().backward()
    assert torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0


def test_a_row_with_every_key_masked_is_zero_not_nan():
    _, zsa = _pair(batch_first=True)
    x = torch.randn(2, 4, 16, requires_grad=True)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2] = True  # query 2 may see nothing
    mask[0, 1] = True
    out, w = zsa(x, x, x, attn_mask=mask, need_weights=True)
    assert torch.isfinite(out).all() and (w[:, 2] == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_attn_masks_are_refused_naming_the_argument():
    _, zsa = _pair(batch_first=True)
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        zsa(x, x, x, attn_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        zsa(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.int64))


def test_float_key_padding_mask_with_other_biases_is_refused():
    _, zsa = _pair(batch_first=True)
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="only 0 .attend. and -inf"):
        zsa(x, x, x, key_padding_mask=torch.tensor([[0.0, -1.0, 0.0, 0.0]] * 2))


# --------------------------------------------------------------------------------------
# swap_attention: every nn.MultiheadAttention of a model, inside torch's Transformer layers
# --------------------------------------------------------------------------------------
def _encoder_layer():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)


def test_swap_in_an_encoder_layer_matches_mha_and_is_never_bypassed():
    layer = _encoder_layer().eval()
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[:, 6:] = True
    with torch.no_grad():
        want = layer(x, src_key_padding_mask=pad)      # torch's fused fast path
    swapped = zeromask.swap_attention(_encoder_layer(), zero_scale=TINY_SCALE,
                                      backend="reference").eval()
    assert isinstance(swapped.self_attn, zeromask.ZeroSoftAttention)
    with torch.no_grad():
        got = swapped(x, src_key_padding_mask=pad)
    _close(got[:, :6], want[:, :6])
    # soft zero tokens must be what runs in eval mode too: the fused fast path (which would
    # run plain MHA on the weights) may not take over
    soft = zeromask.swap_attention(_encoder_layer(), zero_scale=0.5, backend="reference")
    with torch.no_grad():
        eval_out = soft.eval()(x, src_key_padding_mask=pad)
        train_out = soft.train()(x, src_key_padding_mask=pad)  # dropout 0: same function
    _close(eval_out, train_out)
    assert (eval_out[:, :6] - want[:, :6]).abs().max() > 1e-3


def test_swap_in_an_encoder_layer_with_an_arbitrary_src_mask():
    """A windowed bool src_mask (each frame sees +-2 neighbours): not causal, so it runs
    through the reference, with the layer's result."""
    layer = _encoder_layer()
    x = torch.randn(2, 9, 32)
    i = torch.arange(9)
    window = (i[:, None] - i[None, :]).abs() > 2
    want = layer(x, src_mask=window)
    zeromask.swap_attention(layer, zero_scale=TINY_SCALE)
    _close(layer(x, src_mask=window), want)


def test_swap_in_a_decoder_layer_with_causal_and_memory_masks():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    tgt, mem = torch.randn(2, 5, 32), torch.randn(2, 8, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    mpad = torch.zeros(2, 8, dtype=torch.bool)
    mpad[1, 6:] = True
    want = dec(tgt, mem, tgt_mask=causal, memory_key_padding_mask=mpad, tgt_is_causal=True)
    zeromask.swap_attention(dec, zero_scale=TINY_SCALE, backend="reference")
    assert len(dec.zeromask_report) == 2
    got = dec(tgt, mem, tgt_mask=causal, memory_key_padding_mask=mpad, tgt_is_causal=True)
    _close(got, want)


def test_swap_report_and_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no nn.MultiheadAttention"):
        zeromask.swap_attention(model)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)  # dropout 0.1
    with pytest.raises(ValueError, match="drop_attention_dropout=True"):
        zeromask.swap_attention(layer)
    zeromask.swap_attention(layer, drop_attention_dropout=True)
    assert layer.zeromask_report == [
        "self_attn: nn.MultiheadAttention(16, 2, batch_first=True) -> ZeroSoftAttention, "
        "attention dropout 0.1 dropped"]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # MHA's own
def test_the_mha_grid_has_no_silent_mismatch():
    """Issue 13's grid, every dimension covered: embed dim and heads, bias, kdim/vdim,
    batch_first, unbatched input, no mask / causal / arbitrary bool 2-D / additive 3-D
    attn_mask, key padding, need_weights. Every call runs and equals MHA."""
    g = torch.Generator().manual_seed(5)
    n = 0
    for (E, H), bias, kdim, batch_first, unbatched, mask, need_weights in itertools.product(
            [(16, 4), (24, 3)], [True, False], [None, 10], [False, True], [False, True],
            ["none", "causal", "bool2d", "float3d"], [False, True]):
        torch.manual_seed(n)
        mha = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=kdim,
                                    batch_first=batch_first)
        zsa = zeromask.ZeroSoftAttention.from_module(mha, zero_scale=TINY_SCALE)
        B, Lq = (1 if unbatched else 2), 5
        Lk = Lq if kdim is None else 7
        def make(L, F):
            if unbatched:
                return torch.randn(L, F, generator=g)
            return torch.randn((B, L, F) if batch_first else (L, B, F), generator=g)
        q = make(Lq, E)
        kv = q if kdim is None else make(Lk, kdim)
        kw = {"need_weights": need_weights}
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        kpm[-1, -1] = True
        kw["key_padding_mask"] = kpm[0] if unbatched else kpm
        if mask == "causal" and Lq == Lk:
            kw.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(Lq),
                      is_causal=True)
        elif mask in ("bool2d", "float3d"):
            kw["attn_mask"] = _mha_masks(mask, B, H, Lq, Lk, g)
        want, want_w = mha(q, kv, kv, **kw)
        got, got_w = zsa(q, kv, kv, **kw)
        case = (E, H, bias, kdim, batch_first, unbatched, mask, need_weights)
        assert got.shape == want.shape, case
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}: {m}")
        if need_weights:
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{case} weights: {m}")
        n += 1
    assert n == 256
