"""zeromask.integrations.transformers on a tiny WhisperForConditionalGeneration built from a
config (nothing downloaded): every attention runs on the kernels and matches the eager
implementation within the shared tolerance; KV-cache decoding, training, padding masks and
zero tokens; clear errors for what the kernels cannot do."""
import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
import zeromask.integrations.transformers as zt  # noqa: E402
from transformers import (AttentionInterface, WhisperConfig,  # noqa: E402
                          WhisperForConditionalGeneration)
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402
from transformers.models.whisper import modeling_whisper  # noqa: E402

from tolerance import assert_grad_close, assert_output_close  # noqa: E402

N_MELS, FRAMES = 16, 60  # the encoder sees FRAMES / 2 = 30 positions


def tiny_whisper(seed=0, **kw) -> WhisperForConditionalGeneration:
    cfg = dict(vocab_size=64, d_model=64, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
               decoder_ffn_dim=128, num_mel_bins=N_MELS, max_source_positions=FRAMES // 2,
               max_target_positions=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
               dropout=0.0, attention_dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(WhisperConfig(**cfg)).eval()


def inputs(seed=1, B=2, N=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N_MELS, FRAMES, generator=g)
    ids = torch.randint(3, 64, (B, N), generator=g)
    ids[:, 0] = 1
    return x, ids


def with_impl(model, impl, dtype=torch.float32):
    m = copy.deepcopy(model).to(dtype)
    m.set_attn_implementation(impl)
    return m


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the zeromask kernel calls the integration makes."""
    calls = []
    real = zt.zero_soft_attention

    def counted(q, k, v, **kw):
        calls.append(dict(kw, q=tuple(q.shape), k=tuple(k.shape)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(zt, "zero_soft_attention", counted)
    return calls


def test_every_attention_runs_on_the_kernels_and_matches_eager(kernel_calls):
    """Encoder output, decoder output and logits equal eager's within the shared tolerance
    (oracle: eager in float64; yardstick: eager in float32); the 2 encoder self, 2 decoder
    self (causal) and 2 cross attentions each make one kernel call."""
    base = tiny_whisper()
    x, ids = inputs()
    outs = {}
    for name, impl, dtype in (("oracle", "eager", torch.float64), ("same", "eager", torch.float32),
                              ("zeromask", "zeromask", torch.float32)):
        m = with_impl(base, impl, dtype)
        with torch.no_grad():
            o = m(input_features=x.to(dtype), decoder_input_ids=ids, output_hidden_states=True)
        outs[name] = (o.encoder_last_hidden_state, o.decoder_hidden_states[-1], o.logits)
    assert len(kernel_calls) == 6
    assert sum(bool(c["causal"]) for c in kernel_calls) == 2
    for i, what in enumerate(("encoder", "decoder", "logits")):
        assert_output_close(what, outs["zeromask"][i], outs["oracle"][i], outs["same"][i],
                            torch.float32)


def test_from_pretrained_takes_the_name(tmp_path):
    tiny_whisper().save_pretrained(tmp_path)
    m = WhisperForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="zeromask")
    assert m.config._attn_implementation == "zeromask"
    assert m.model.decoder.config._attn_implementation == "zeromask"


def test_greedy_generate_same_tokens_with_and_without_the_kv_cache(kernel_calls):
    m = with_impl(tiny_whisper(), "zeromask")
    eager = with_impl(tiny_whisper(), "eager")
    x, _ = inputs()
    kw = dict(max_new_tokens=8, do_sample=False, num_beams=1, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        cached = m.generate(x, use_cache=True, **kw)
        uncached = m.generate(x, use_cache=False, **kw)
        want = eager.generate(x, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences, want.sequences)
    # every step's scores, not only the argmax (a random tiny model repeats itself)
    for a, b, c in zip(cached.scores, uncached.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    # decode steps: one query against a growing cache, not causal-masked (it sees every key)
    assert any(c["q"][2] == 1 and c["k"][2] > 1 and not c["causal"] for c in kernel_calls)


def test_a_training_step_runs_backward_through_the_kernels(kernel_calls):
    """Gradients of every parameter match eager's within the gradient tolerance."""
    base = tiny_whisper()
    x, ids = inputs()
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), 2)], 1)
    grads = {}
    for name, impl, dtype in (("oracle", "eager", torch.float64), ("same", "eager", torch.float32),
                              ("zeromask", "zeromask", torch.float32)):
        m = with_impl(base, impl, dtype).train()
        m(input_features=x.to(dtype), decoder_input_ids=ids, labels=labels).loss.backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert kernel_calls and set(grads["zeromask"]) == set(grads["oracle"])
    for n in ("model.encoder.layers.0.self_attn.k_proj.weight",
              "model.decoder.layers.1.encoder_attn.q_proj.weight",
              "model.decoder.layers.0.self_attn.v_proj.weight", "model.encoder.conv1.weight"):
        assert_grad_close(n, grads["zeromask"][n], grads["oracle"][n], grads["same"][n],
                          torch.float32)


def test_right_padding_becomes_kernel_lengths_and_matches_eager(kernel_calls):
    base = tiny_whisper()
    x, ids = inputs(N=9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # row 1: 5 real tokens, then padding
    outs = {}
    for name, impl, dtype in (("oracle", "eager", torch.float64), ("same", "eager", torch.float32),
                              ("zeromask", "zeromask", torch.float32)):
        m = with_impl(base, impl, dtype)
        with torch.no_grad():
            outs[name] = m(input_features=x.to(dtype), decoder_input_ids=ids,
                           decoder_attention_mask=mask).logits
    lens = [c["seqlens_k"] for c in kernel_calls if c.get("seqlens_k") is not None]
    assert lens and all(row.tolist() == [9, 5] for row in lens)
    valid = mask.bool()
    assert_output_close("logits", outs["zeromask"][valid], outs["oracle"][valid],
                        outs["same"][valid], torch.float32)


def test_masks_the_kernels_cannot_express_raise():
    m = with_impl(tiny_whisper(), "zeromask")
    x, ids = inputs()
    left = torch.ones_like(ids)
    left[0, :2] = 0
    with pytest.raises(ValueError, match="left padding"):
        m(input_features=x, decoder_input_ids=ids, decoder_attention_mask=left)
    with pytest.raises(NotImplementedError, match="sliding"):
        zt.zeromask_mask(1, 4, 4, mask_function=lambda b, h, q, k: q >= k)
    with pytest.raises(ValueError, match="4-D masks"):
        zt._seqlens_from_padding(torch.ones(2, 1, 4, 4, dtype=torch.bool), 2, 4)


def test_attention_dropout_in_training_is_refused_by_name():
    m = with_impl(tiny_whisper(attention_dropout=0.1), "zeromask").train()
    x, ids = inputs()
    with pytest.raises(ValueError, match="attention_dropout"):
        m(input_features=x, decoder_input_ids=ids)
    m.eval()  # no dropout in eval mode: runs
    with torch.no_grad():
        m(input_features=x, decoder_input_ids=ids)


def _eager_with_log_s(silent, s):
    """An eager attention that adds ln(s) to the silent keys' logits of every non-causal
    attention: zero-soft prob mode written out, the value zero_tokens must give."""
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                **kwargs):
        bias = None
        if not module.is_causal:
            bias = torch.zeros(silent.shape, dtype=query.dtype).masked_fill(silent, float(
                torch.log(torch.tensor(s, dtype=torch.float64))))[:, None, None, :]
        if attention_mask is not None:
            bias = attention_mask if bias is None else bias + attention_mask
        return modeling_whisper.eager_attention_forward(module, query, key, value, bias,
                                                        scaling=scaling, dropout=dropout)
    return forward


@pytest.mark.parametrize("s", [1e-6, 0.25])
def test_zero_tokens_scale_the_silent_frames_attention(kernel_calls, s):
    """With zero_tokens(silent, s) the encoder self- and cross-attention give the silent
    frames weight x s (prob mode): the model equals eager with ln(s) added to those keys;
    decoder self-attention is untouched; shapes that do not match the keys raise."""
    base = tiny_whisper()
    x, ids = inputs()
    silent = torch.zeros(2, FRAMES // 2, dtype=torch.bool)
    silent[0, :6] = True
    silent[1, 20:] = True
    name = "eager_log_s_test"
    AttentionInterface.register(name, _eager_with_log_s(silent, s))
    AttentionMaskInterface.register(name, eager_mask)
    outs = {}
    for key, impl, dtype in (("oracle", name, torch.float64), ("same", name, torch.float32),
                             ("zeromask", "zeromask", torch.float32), ("plain", "eager",
                                                                     torch.float32)):
        m = with_impl(base, impl, dtype)
        with torch.no_grad(), zt.zero_tokens(silent, zero_scale=s):
            outs[key] = m(input_features=x.to(dtype), decoder_input_ids=ids).logits
    scaled = [c for c in kernel_calls if c.get("key_zero") is not None]
    assert len(scaled) == 4 and not any(c["causal"] for c in scaled)  # 2 encoder + 2 cross
    assert_output_close("logits", outs["zeromask"], outs["oracle"], outs["same"], torch.float32)
    assert (outs["zeromask"] - outs["plain"]).abs().max() > 1e-3  # the scaling mattered
    m = with_impl(base, "zeromask")
    with pytest.raises(ValueError, match="encoder's output rate"), torch.no_grad(), \
            zt.zero_tokens(torch.zeros(2, FRAMES, dtype=torch.bool)):
        m(input_features=x, decoder_input_ids=ids)


def test_the_package_imports_without_transformers_and_the_bridge_says_so():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import zeromask, zeromask.integrations\n"
            "try:\n"
            "    import zeromask.integrations.transformers\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR" in out.stdout and "zeromask[hf]" in out.stdout


def test_the_whisper_example_runs_and_zero_tokens_take_the_mass_off_silence(capsys):
    import re
    import runpy
    from pathlib import Path
    pytest.importorskip("librosa")
    root = Path(__file__).resolve().parents[1]
    runpy.run_path(str(root / "examples" / "whisper_zero_soft.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    plain = [float(x) for x in re.findall(r"\d\.\d+e[-+]\d+", lines[1])]
    soft = [float(x) for x in re.findall(r"\d\.\d+e[-+]\d+", lines[2])]
    assert len(plain) == len(soft) == 2  # one per encoder layer
    assert min(plain) > 0.1 and max(soft) < 1e-5
