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


def test_a_causal_mask_that_is_not_the_kernels_is_refused_not_replaced():
    """MHA applies attn_mask as given (is_causal is only a hint): with Lq != Lk its top-left
    causal mask is not the kernels' bottom-right one, so it must not be swapped for it."""
    mha, zsa = _pair(batch_first=True)
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    top_left = torch.triu(torch.ones(3, 5, dtype=torch.bool), diagonal=1)
    for is_causal in (False, True):
        with pytest.raises(ValueError, match="accepts only the causal mask"):
            zsa(q, kv, kv, attn_mask=top_left, is_causal=is_causal)
    bottom_right = torch.triu(torch.ones(3, 5, dtype=torch.bool), diagonal=1 + 5 - 3)
    _close(zsa(q, kv, kv, attn_mask=bottom_right)[0],
           mha(q, kv, kv, attn_mask=bottom_right, need_weights=False)[0])


def test_float_key_padding_mask_with_other_biases_is_refused():
    _, zsa = _pair(batch_first=True)
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="only 0 .attend. and -inf"):
        zsa(x, x, x, key_padding_mask=torch.tensor([[0.0, -1.0, 0.0, 0.0]] * 2))
