"""zeromask.models: zero tokens, backends, feature order, curriculum, switches, decoding."""
import dataclasses
import math

import pytest
import torch

from zeromask import dispatch
from zeromask.models import Attention, ModelConfig, SpeechModel, downsample_mask

N_MELS, HOP = 16, 32


def tiny_config(**kw):
    base = dict(vocab_size=12, d_model=16, num_heads=2, ffn_mult=2, enc_layers=1,
                dec_self_layers=1, dec_cross_layers=1, dropout=0.0, n_mels=N_MELS,
                hop_length=HOP, downsample=2, max_decode_len=10, spec_augment=None)
    base.update(kw)
    return ModelConfig(**base)


def tiny_batch(seed=0, B=2, T=24, N=7):
    """Random features with a silent stretch (frames 8-13 of utterance 0) and padding."""
    g = torch.Generator().manual_seed(seed)
    spec = torch.rand(B, T, N_MELS, generator=g) * 30 - 20
    spec[0, 8:14] = -100.0                        # silence
    wave = torch.randn(B, T, HOP, generator=g) * 0.1
    f0 = 100 + 100 * torch.rand(B, T, generator=g)
    f0[:, ::5] = 0.0                              # some unvoiced frames
    energy = torch.rand(B, T, generator=g)
    per = torch.rand(B, T, generator=g)
    pitch = torch.stack([f0, energy, per], -1)
    lengths = [T, T - 6]
    for i, n in enumerate(lengths):               # padding: exact zeros
        for x in (spec, wave, pitch, f0):
            x[i, n:] = 0.0
    ids = torch.randint(1, 12, (B, N), generator=g)
    ids[:, 0] = 0                                 # start token
    ids[1, 5:] = 0                                # text padding
    labels = torch.cat([ids[:, 1:], torch.zeros(B, 1, dtype=torch.long)], 1)
    labels[1, 5:] = -100
    labels[1, 4] = 0
    return dict(spectrogram=spec, waveform=wave, pitch=pitch, f0=f0, input_ids=ids,
                labels=labels)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return SpeechModel(tiny_config(**kw))


def cpu_backends():
    out = []
    for name, why in dispatch.available_backends().items():
        if why is None and "cpu" in dispatch.load(name).device_types:
            out.append(name)
    return out


# ----------------------------------------------------------------------- zero tokens
def test_silent_and_padding_frames_are_zero_tokens():
    b = tiny_batch()
    m = make()
    z = m.zero_mask(b["spectrogram"])
    assert z[0, 8:14].all() and not z[0, :8].any() and not z[0, 14:].any()
    assert z[1, 18:].all() and not z[1, :18].any()
    zd = downsample_mask(z, 2)
    assert zd.shape == (2, 12)
    assert zd[0, 4:7].all() and not zd[0, 3] and not zd[0, 7]   # frames 8..13 -> 4..6
    assert zd[1, 9:].all() and not zd[1, :9].any()
    odd = downsample_mask(torch.tensor([[False, True, True, True, True]]), 4)
    assert odd.tolist() == [[False, True]]


# ----------------------------------------------------------------------- backends
@pytest.mark.parametrize("backend", cpu_backends())
def test_forward_backward_same_loss_on_every_backend(backend):
    b = tiny_batch()
    ref = make(backend="reference")
    ref_out = ref(**b)
    ref_out["loss"].backward()
    m = make(backend=backend)
    m.load_state_dict(ref.state_dict())
    try:
        out = m(**b)
    except dispatch.BackendError as exc:  # an explicitly chosen backend that cannot serve it
        pytest.skip(f"{backend}: {exc}")
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], ref_out["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits"], ref_out["logits"], rtol=1e-3, atol=1e-4)
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    ref_grads = dict(ref.named_parameters())
    assert len(grads) > 20
    for n, g in grads.items():
        assert torch.isfinite(g).all(), n
        torch.testing.assert_close(g, ref_grads[n].grad, rtol=2e-3, atol=2e-4, msg=n)


def test_every_parameter_gets_a_gradient():
    b = tiny_batch()
    m = make(learnable_zero_scale=True)
    m(**b)["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []
    for name, stage in m.stages.items():
        assert stage.gate.grad.abs() > 0, name
    rot = m.encoders["spectrogram"].layers[0].attn.attn.rotary
    assert rot.t_min.grad is not None and rot.t_min.grad.abs() > 0  # f0 rotary is learned


# ----------------------------------------------------------------------- feature order
def test_feature_order_changes_the_computation():
    b = tiny_batch()
    m1 = make(feature_order=("spectrogram", "pitch", "waveform"))
    m2 = make(feature_order=("waveform", "pitch", "spectrogram"))
    m2.load_state_dict(m1.state_dict())  # same modules, same weights, other order
    with torch.no_grad():
        l1, l2 = m1(**b)["logits"], m2(**b)["logits"]
        l1b = m1(**b)["logits"]
    torch.testing.assert_close(l1, l1b)  # deterministic
    assert (l1 - l2).abs().max() > 1e-4
    m3 = make(feature_order=("pitch",))
    assert list(m3.encoders) == ["pitch"] and list(m3.stages) == ["pitch"]
    with torch.no_grad():
        out = m3(spectrogram=b["spectrogram"], pitch=b["pitch"], f0=b["f0"],
                 input_ids=b["input_ids"])
    assert out["logits"].shape == (2, 7, 12)
    with pytest.raises(ValueError, match="feature_order"):
        tiny_config(feature_order=("pitch", "pitch"))
    with pytest.raises(ValueError, match="feature_order"):
        tiny_config(feature_order=("mfcc",))


def test_curriculum_enables_stages_in_order():
    m = make(curriculum_steps=10, feature_order=("pitch", "spectrogram", "waveform"))
    assert m.active_features(0) == ["pitch"]
    assert m.active_features(9) == ["pitch"]
    assert m.active_features(10) == ["pitch", "spectrogram"]
    assert m.active_features(25) == ["pitch", "spectrogram", "waveform"]
    assert m.active_features(1000) == ["pitch", "spectrogram", "waveform"]
    b = tiny_batch()
    m.set_step(12)
    m(**b)["loss"].backward()
    used = {f for f in m.encoders if m.encoders[f].front.proj.weight.grad is not None}
    assert used == {"pitch", "spectrogram"}
    assert m.stages["waveform"].gate.grad is None
    assert make(curriculum_steps=0).active_features(0) == list(tiny_config().feature_order)
    # the step is part of the state (a resumed run keeps its curriculum)
    m2 = make(curriculum_steps=10, feature_order=("pitch", "spectrogram", "waveform"))
    m2.load_state_dict(m.state_dict())
    assert m2.active_features() == ["pitch", "spectrogram"]


# ----------------------------------------------------------------------- switches
def test_switches_change_the_computation():
    b = tiny_batch()
    base = make()
    sd = base.state_dict()
    with torch.no_grad():
        ref = base(**b)["loss"]
        for kw in (dict(zero_mode="score"), dict(zero_scaling=False), dict(zero_scale=0.5)):
            m = make(**kw)
            m.load_state_dict(sd)
            assert abs(m(**b)["loss"] - ref) > 1e-6, kw
        # f0 rotary: the contour matters only when it is on
        b2 = dict(b, f0=b["f0"] * 1.7)
        assert abs(base(**b2)["loss"] - ref) > 1e-6
        off = make(f0_rotary=False)
        off.load_state_dict(sd)
        torch.testing.assert_close(off(**b2)["loss"], off(**b)["loss"])


def _same_weights(model, source):
    """``model`` with every weight of ``source`` that it has (same name and shape)."""
    mine = model.state_dict()
    model.load_state_dict({k: v for k, v in source.state_dict().items()
                           if k in mine and mine[k].shape == v.shape}, strict=False)
    return model


def test_zero_tokens_padding_or_none_attend_silence_normally():
    """zero_tokens="padding": only the frames past an utterance's end are zero tokens, so the
    silent stretch (and the start token) is attended normally; "none": no key at all."""
    b = tiny_batch()
    base = make()
    pad = _same_weights(make(zero_tokens="padding"), base).eval()
    none = _same_weights(make(zero_tokens="none"), base).eval()
    base.eval()
    z = pad.zero_mask(b["spectrogram"])
    assert not z[0].any() and z[1, 18:].all() and not z[1, :18].any()
    assert not none.zero_mask(b["spectrogram"]).any()
    ids = b["input_ids"]
    assert base.text_zero_mask(ids)[:, 0].all() and not pad.text_zero_mask(ids).any()
    with torch.no_grad():
        losses = [m(**b)["loss"] for m in (base, pad, none)]
        assert abs(losses[1] - losses[0]) > 1e-5 and abs(losses[2] - losses[1]) > 1e-5
        silent = downsample_mask(base.zero_mask(b["spectrogram"]), 2)[0]   # frames 4..6
        on_silence = [m.cross_attention_weights(**b)["spectrogram"][0][0][:, silent].sum(-1)
                      for m in (base, pad)]
    assert on_silence[0].max() < 1e-4 and on_silence[1].min() > 1e-3
    # padding still starves in "padding" mode: utterance 1's keys past frame 9 (downsampled)
    with torch.no_grad():
        w = pad.cross_attention_weights(**b)["spectrogram"][0][1]
    assert w[:, 9:].sum(-1).max() < 1e-4
    with pytest.raises(ValueError, match="zero_tokens"):
        tiny_config(zero_tokens="silent")


def test_distinct_start_token_is_its_own_id_and_no_zero_token():
    """start_token="distinct": position 0 reads id vocab_size (one more embedding row, never
    predicted), which is attended normally; 0 stays pad and end."""
    b = tiny_batch()
    base = make()
    m = _same_weights(make(start_token="distinct"), base)
    assert m.config.start_id == 12 and base.config.start_id == 0
    assert m.embed.num_embeddings == 13 and m.head.out_features == 12
    with torch.no_grad():
        m.embed.weight[:12] = base.embed.weight
        m.embed.weight[12] = base.embed.weight[0]  # same vector as id 0: only the mask differs
        out = m(**b)
        assert out["logits"].shape == (2, 7, 12)
        assert abs(out["loss"] - base(**b)["loss"]) > 1e-5  # the start is no zero token
        ids = m.decoder_ids(b["input_ids"])
        assert (ids[:, 0] == 12).all() and torch.equal(ids[:, 1:], b["input_ids"][:, 1:])
        assert not m.text_zero_mask(ids)[:, 0].any() and m.text_zero_mask(ids)[1, 5:].all()
        # the start's own embedding row is what position 0 reads
        m.embed.weight[12] += torch.randn(16, generator=torch.Generator().manual_seed(0))
        assert abs(m(**b)["loss"] - out["loss"]) > 1e-5
    m.eval()
    assert "joint" in m.transcribe(**b, max_len=5)
    with pytest.raises(ValueError, match="start_token"):
        tiny_config(start_token="one")


def test_no_rotary_removes_every_rotary():
    b = tiny_batch()
    base = make(cross_rotary=True)
    off = _same_weights(make(rotary=False), base)
    const = _same_weights(make(f0_rotary=False), base)
    attns = [mod for mod in off.modules() if isinstance(mod, Attention)]
    assert len(attns) == 7 and all(a.attn.rotary is None for a in attns)  # 3 + 1 + 3
    assert not any("t_min" in n or "theta" in n for n, _ in off.named_parameters())
    with torch.no_grad():
        loss = off(**b)["loss"]
        torch.testing.assert_close(off(**dict(b, f0=b["f0"] * 1.7))["loss"], loss)
        assert abs(loss - const(**b)["loss"]) > 1e-5  # not the constant-theta rotary
    with pytest.raises(ValueError, match="cross_rotary needs rotary"):
        tiny_config(rotary=False, cross_rotary=True)


def test_new_options_round_trip_through_a_checkpoint(tmp_path):
    from zeromask.models.training import (load_checkpoint, model_from_checkpoint,
                                          save_checkpoint)
    b = tiny_batch()
    m = make(zero_tokens="padding", start_token="distinct", rotary=False).eval()
    save_checkpoint(tmp_path / "c.pt", model=m)
    m2 = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt")).eval()
    assert m2.config == m.config and m2.config.zero_tokens == "padding"
    assert m2.config.start_token == "distinct" and m2.config.rotary is False
    with torch.no_grad():
        torch.testing.assert_close(m2(**b)["logits"], m(**b)["logits"])
    # a config written before these fields existed loads with today's behaviour
    old = {k: v for k, v in tiny_config().to_dict().items()
           if k not in ("zero_tokens", "start_token", "rotary")}
    c = ModelConfig.from_dict(old)
    assert (c.zero_tokens, c.start_token, c.rotary) == ("silence", "zero", True)


def test_hard_masking_matches_soft_limit_and_never_nans():
    cfg_soft = tiny_config(zero_scale=1e-30)
    cfg_hard = tiny_config(zero_scaling=False)
    torch.manual_seed(0)
    soft = Attention(cfg_soft, None)
    hard = Attention(cfg_hard, None)
    hard.load_state_dict(soft.state_dict())
    x = torch.randn(2, 5, 16)
    mem = torch.randn(2, 9, 16)
    kz = torch.zeros(2, 9, dtype=torch.bool)
    kz[0, 2:6] = True
    kz[1, :] = True  # every key of row 1 is a zero token
    with torch.no_grad():
        hs = hard(x, mem, kz)
        ss = soft(x, mem, kz)
    torch.testing.assert_close(hs[0], ss[0], rtol=1e-5, atol=1e-6)  # s -> 0 is -inf
    # a row with no key left: the attention gives 0, so the output is the out-proj bias
    assert torch.isfinite(hs).all()
    torch.testing.assert_close(hs[1], hard.attn.out_proj.bias.expand(5, 16))
    assert not torch.allclose(ss[1], hs[1])  # soft keeps attending to zero tokens
    # with no zero tokens both paths are plain attention
    none = torch.zeros(2, 9, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(hard(x, mem, none), soft(x, mem, none), rtol=1e-5,
                                   atol=1e-6)
    # full hard model: the start token (a zero token) has no causal key, still finite
    b = tiny_batch()
    m = make(zero_scaling=False)
    out = m(**b)
    out["loss"].backward()
    assert torch.isfinite(out["logits"]).all()


def test_config_round_trip():
    c = tiny_config(feature_order=("pitch", "waveform"), zero_mode="score", curriculum_steps=3)
    c2 = ModelConfig.from_json(c.to_json())
    assert c2 == c
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict(dict(c.to_dict(), bogus=1))
    assert dataclasses.replace(c, zero_scaling=False).zero_scaling is False


# ----------------------------------------------------------------------- decoding
@pytest.mark.parametrize("kw", [dict(), dict(zero_scaling=False),
                                dict(cross_rotary=True, zero_mode="score"),
                                dict(zero_tokens="padding"), dict(zero_tokens="none"),
                                dict(start_token="distinct"),
                                dict(start_token="distinct", zero_scaling=False),
                                dict(rotary=False)])
def test_greedy_kv_cache_matches_full_decoding(kw):
    b = tiny_batch()
    m = make(seed=1, **kw).eval()
    with torch.no_grad():  # make the model keep talking so decoding runs many steps
        m.head.bias[0] = -5.0
    cached = m.generate(**b, max_len=8)
    full = m.generate(**b, max_len=8, use_cache=False)
    assert cached == full
    assert all(len(r) == 8 for r in cached)
    # and the step logits equal the full forward's logits at every position
    ids = torch.tensor([[0] + cached[0][:7], [0] + cached[1][:7]])
    with torch.no_grad():
        logits = m(**dict(b, input_ids=ids, labels=None))["logits"]
        mem = m.encode(b["spectrogram"], b["waveform"], b["pitch"], b["f0"])
        step = m._cached_stepper(mem, b["f0"], 2, torch.device("cpu"))
        for t in range(8):
            torch.testing.assert_close(step(ids[:, t:t + 1], t), logits[:, t], rtol=1e-4,
                                       atol=1e-5)


def test_greedy_decoding_stops_at_zero():
    b = tiny_batch()
    m = make().eval()
    with torch.no_grad():
        m.head.bias.zero_()
        m.head.weight.zero_()
        m.head.bias[3] = 1.0
    assert m.generate(**b, max_len=5) == [[3] * 5, [3] * 5]
    with torch.no_grad():
        m.head.bias[0] = 2.0  # 0 ("end") is now the argmax at once
    assert m.generate(**b, max_len=5) == [[], []]


def test_learns_a_fixed_batch():
    b = tiny_batch()
    m = make(seed=2)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = m(**b)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert first == pytest.approx(math.log(12), rel=0.3)  # starts near uniform


@pytest.mark.parametrize("hard", [False, True])
def test_cross_attention_weights_for_plots(hard):
    b = tiny_batch()
    m = make(zero_scaling=not hard).eval()
    w = m.cross_attention_weights(**b)
    assert list(w) == list(m.config.feature_order)
    for f, maps in w.items():
        assert len(maps) == 1 and maps[0].shape == (2, 7, 12)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 7))  # rows are softmaxes
    silent = m.zero_mask(b["spectrogram"])
    silent = downsample_mask(silent, 2)
    frac = w["spectrogram"][0][0][:, silent[0]].sum(-1)  # weight on zero tokens
    assert frac.max() < 1e-4  # zero-soft (s = 1e-6) and -inf both starve zero tokens
    # the weights come from the same computation as the output
    with torch.no_grad():
        full = m(**b)["logits"]
        torch.testing.assert_close(m.decode(b["input_ids"], m.encode(
            b["spectrogram"], b["waveform"], b["pitch"], b["f0"]), b["f0"], cross_weights={}),
            full)


# ------------------------------------------------------------------ CTC and SpecAugment
def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    from zeromask.models import ctc_greedy
    path = [[0, 3, 3, 0, 3, 5, 5, 0, 7], [4, 4, 4, 0, 0, 4, 2, 2, 2]]
    lp = torch.full((2, 9, 8), -10.0)
    for b, row in enumerate(path):
        for t, c in enumerate(row):
            lp[b, t, c] = 0.0
    # a blank between two 3s keeps both; repeats collapse; frames past the length are cut
    assert ctc_greedy(lp, torch.tensor([9, 6])) == [[3, 3, 5, 7], [4, 4]]
    assert ctc_greedy(lp, torch.tensor([0, 1])) == [[], [4]]


def test_ctc_targets_and_lengths_follow_the_batch_conventions():
    from zeromask.models import ctc_targets, downsampled_lengths, frame_lengths_of
    labels = torch.tensor([[5, 6, 7, 0], [9, 0, -100, -100]])  # text, 0 = end, -100 = pad
    targets, lengths = ctc_targets(labels)
    assert targets.tolist() == [5, 6, 7, 9] and lengths.tolist() == [3, 1]
    assert downsampled_lengths(torch.tensor([24, 18, 17, 1]), 4).tolist() == [6, 5, 5, 1]
    b = tiny_batch()
    assert frame_lengths_of(b["spectrogram"]).tolist() == [24, 18]
    m = make(downsample=4)
    for f in m.config.feature_order:  # the front-end's output length is the formula's
        assert m.encoders[f].front(b[f]).shape[1] == 6
    assert downsampled_lengths(torch.tensor([24]), 4).item() == 6


def test_ctc_loss_is_the_hand_computed_alignment_sum():
    """T' = 2 encoder frames, target [c]: p = p1(c) p2(c) + p1(c) p2(blank) + p1(blank) p2(c);
    the model's CTC term is -log p divided by the target length (reduction 'mean')."""
    from zeromask.models import ctc_targets
    m = make(downsample=4, ctc_weight=1.0, label_smoothing=0.0).eval()
    b = tiny_batch()
    b = {k: v[:1, :8] if torch.is_tensor(v) and v.dim() > 1 else v for k, v in b.items()}
    b["labels"] = torch.tensor([[4, 0, -100, -100, -100, -100, -100]])
    out = m(**b)
    lp = out["ctc_log_probs"][0].double().exp()
    assert lp.shape[0] == 2 and out["ctc_lengths"].tolist() == [2]
    c = 4
    p = lp[0, c] * lp[1, c] + lp[0, c] * lp[1, 0] + lp[0, 0] * lp[1, c]
    torch.testing.assert_close(out["ctc_loss"].double(), -torch.log(p), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["ctc_loss"])  # weight 1: CTC alone
    half = make(downsample=4, ctc_weight=0.5, label_smoothing=0.0).eval()
    o = half(**b)
    torch.testing.assert_close(o["loss"], 0.5 * o["ce_loss"] + 0.5 * o["ctc_loss"])
    targets, lengths = ctc_targets(b["labels"])
    assert targets.tolist() == [4] and lengths.tolist() == [1]


def test_no_ctc_head_when_its_weight_is_zero():
    m = make(ctc_weight=0.0)
    assert not hasattr(m, "ctc_head")
    out = m(**tiny_batch())
    assert "ctc_loss" not in out and torch.equal(out["loss"], out["ce_loss"])
    with pytest.raises(ValueError, match="no CTC head"):
        m.ctc_generate(**tiny_batch())
    with pytest.raises(ValueError, match="ctc_weight"):
        tiny_config(ctc_weight=1.5)


def test_spec_augment_masks_valid_frames_only_with_the_row_mean():
    from zeromask.models import spec_augment
    g = torch.Generator().manual_seed(0)
    spec = torch.rand(3, 50, 16, generator=g) * 40 - 60
    lengths = torch.tensor([50, 30, 10])
    spec[1, 30:] = 0.0
    spec[2, 10:] = 0.0
    out = spec_augment(spec, lengths, 2, 4, 2, 0.2, generator=g)
    assert torch.equal(out[1, 30:], spec[1, 30:]) and torch.equal(out[2, 10:], spec[2, 10:])
    changed = out != spec
    assert changed.any()
    for b in range(3):
        n = int(lengths[b])
        mean = spec[b, :n].mean()
        torch.testing.assert_close(out[b][changed[b]], mean.expand(int(changed[b].sum())))
    # masked widths stay within the limits: at most 2 bands of <= 4 bins fully masked
    full_bins = (out[0] != spec[0]).all(0).sum()
    assert full_bins <= 8
    assert torch.equal(spec_augment(spec, lengths, 0, 4, 0, 0.2), spec)
    # the model applies it in training only, after the zero tokens are taken
    m = make(spec_augment=(2, 4, 2, 0.2), dropout=0.0)
    b = tiny_batch()
    m.eval()
    e1 = m(**b)["logits"]
    torch.testing.assert_close(m(**b)["logits"], e1)
    m.train()
    torch.manual_seed(1)
    assert not torch.allclose(m(**b)["logits"], e1)


def test_encoder_layers_per_feature():
    m = make(encoder_layers={"spectrogram": 3, "pitch": 0})
    assert len(m.encoders["spectrogram"].layers) == 3
    assert len(m.encoders["pitch"].layers) == 0
    assert len(m.encoders["waveform"].layers) == 1  # enc_layers for the rest
    cfg = m.config
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="encoder_layers"):
        tiny_config(encoder_layers={"speech": 2})


def _collapse(path):
    out, prev = [], 0
    for t in path:
        if t != prev and t != 0:
            out.append(t)
        prev = t
    return tuple(out)


def _brute_force_ctc(lp, n, prefix, whole):
    """log of the summed probability of every frame path over the first ``n`` frames whose
    collapsed output is ``prefix`` (``whole``) or starts with it; -inf if none."""
    import itertools
    total = 0.0
    for path in itertools.product(range(lp.shape[-1]), repeat=n):
        y = _collapse(path)
        if (y == tuple(prefix)) if whole else (y[:len(prefix)] == tuple(prefix)):
            total += math.exp(sum(float(lp[t, c]) for t, c in enumerate(path)))
    return math.log(total) if total > 0 else -math.inf


def test_ctc_prefix_scores_are_the_enumerated_prefix_probabilities():
    """Every id's score at every step equals log psi(g + c) - log psi(g) by enumerating all
    V^T frame paths (psi = the probability that the output starts with the prefix; for the
    end id, that it is the prefix); impossible prefixes (longer than the frames allow) score
    -inf, and rows of different lengths are scored over their own frames."""
    from zeromask.models import CTCPrefixScorer
    g = torch.Generator().manual_seed(5)
    lp = torch.randn(2, 5, 3, generator=g).log_softmax(-1)
    lengths, seqs = [5, 4], [[1, 2, 2], [2, 2, 1]]
    scorer = CTCPrefixScorer(lp, torch.tensor(lengths))
    for k in range(3):
        got = scorer.score()
        for b in range(2):
            g_ = seqs[b][:k]
            base = _brute_force_ctc(lp[b], lengths[b], g_, whole=False)
            for c in range(3):
                want = _brute_force_ctc(lp[b], lengths[b], g_ if c == 0 else g_ + [c],
                                        whole=c == 0) - base
                if want == -math.inf:
                    assert got[b, c] == -math.inf, (k, b, c)
                else:
                    assert abs(float(got[b, c]) - want) < 1e-6, (k, b, c, float(got[b, c]), want)
        scorer.advance(torch.tensor([seqs[0][k], seqs[1][k]]))
    assert math.isinf(float(scorer.score()[1, 2]))  # 2 2 1 2 needs 5 frames; row 1 has 4


def test_ctc_prefix_scores_sum_to_the_ctc_loss_and_frozen_rows_keep_their_state():
    from zeromask.models import CTCPrefixScorer
    g = torch.Generator().manual_seed(6)
    B, T, V = 3, 30, 6
    lp = torch.randn(B, T, V, generator=g).mul(3).log_softmax(-1)
    lengths = torch.tensor([30, 17, 25])
    seqs = [[1, 1, 4, 2, 5], [3, 3, 3], [5, 2, 1, 1]]
    scorer = CTCPrefixScorer(lp, lengths)
    total, ended = torch.zeros(B, dtype=torch.float64), {}
    for k in range(6):  # each row: its ids, then its end score once, then frozen
        step = scorer.score()
        ids = torch.tensor([s[k] if k < len(s) else 0 for s in seqs])
        for b, s_ in enumerate(seqs):
            if k <= len(s_):
                total[b] += step[b, int(ids[b])]
            else:  # frozen after its end: the same end score as when it ended
                assert float(step[b, 0]) == ended[b]
            if k == len(s_):
                ended[b] = float(step[b, 0])
        scorer.advance(ids, keep=ids != 0)
    targets = torch.tensor([c for s in seqs for c in s])
    want = -torch.nn.functional.ctc_loss(lp.double().transpose(0, 1), targets, lengths,
                                         torch.tensor([len(s) for s in seqs]), blank=0,
                                         reduction="none")
    torch.testing.assert_close(total, want, rtol=1e-9, atol=1e-9)


def test_transcribe_gives_every_decoder_and_joint_takes_the_best_joint_step():
    """``joint``: at every step the chosen id maximises (1 - w) log p_att (teacher-forced
    through the full decoder, no cache) + w x the CTC prefix score; w = 0 is the attention
    decoder's greedy output."""
    from zeromask.models import CTCPrefixScorer, downsampled_lengths, frame_lengths_of
    b = tiny_batch()
    m = make(seed=3, ctc_weight=0.5).eval()
    out = m.transcribe(**b, max_len=6)
    assert out["attention"] == m.generate(**b, max_len=6)
    assert out["ctc"] == m.ctc_generate(**b)
    assert m.transcribe(**b, max_len=6, ctc_weight=0.0)["joint"] == out["attention"]
    with torch.no_grad():
        mem = m.encode(b["spectrogram"], b["waveform"], b["pitch"], b["f0"])
        lengths = downsampled_lengths(frame_lengths_of(b["spectrogram"]), 2)
        lp = m.ctc_log_probs(mem)
        for w in (0.5, 1.0):
            joint = m.transcribe(**b, max_len=6, ctc_weight=w)["joint"]
            for i in range(2):
                y = joint[i]
                row = {f: (mm[i:i + 1], z[i:i + 1]) for f, (mm, z) in mem.items()}
                att = torch.log_softmax(m.decode(torch.tensor([[0] + y]), row,
                                                 b["f0"][i:i + 1]).double(), -1)[0]
                scorer = CTCPrefixScorer(lp[i:i + 1], lengths[i:i + 1])
                for t, tok in enumerate(y + ([0] if len(y) < min(6, int(lengths[i])) else [])):
                    total = (1 - w) * att[t] + w * scorer.score()[0]
                    assert int(total.argmax()) == tok, (w, i, t)
                    if tok:
                        scorer.advance(torch.tensor([tok]))
    assert "ctc" not in make(ctc_weight=0.0).eval().transcribe(**b, max_len=4)
    with pytest.raises(ValueError, match="ctc_weight"):
        m.transcribe(**b, max_len=4, ctc_weight=1.5)


def _joint_score(m, mem, f0, lp, lengths, i, y, w):
    """Joint CTC/attention log score of the closed hypothesis ``y`` (then the end token) of
    utterance ``i``, teacher-forced through the full decoder (no cache)."""
    from zeromask.models import CTCPrefixScorer
    row = {f: (mm[i:i + 1], z[i:i + 1]) for f, (mm, z) in mem.items()}
    att = torch.log_softmax(m.decode(torch.tensor([[0] + y]), row, f0[i:i + 1]).double(),
                            -1)[0]
    scorer = CTCPrefixScorer(lp[i:i + 1], lengths[i:i + 1])
    total = 0.0
    for t, tok in enumerate(y + [0]):
        total += float((1 - w) * att[t, tok] + w * scorer.score()[0, tok])
        if tok:
            scorer.advance(torch.tensor([tok]))
    return total


def _step_scores(m, mem, f0, lp, lengths, i, g, w):
    """(V,) joint scores of every next id after prefix ``g``, teacher-forced, no cache."""
    from zeromask.models import CTCPrefixScorer
    row = {f: (mm[i:i + 1], z[i:i + 1]) for f, (mm, z) in mem.items()}
    att = torch.log_softmax(m.decode(torch.tensor([[0] + g]), row, f0[i:i + 1]).double(),
                            -1)[0, -1]
    scorer = CTCPrefixScorer(lp[i:i + 1], lengths[i:i + 1])
    for tok in g:
        scorer.advance(torch.tensor([tok]))
    return (1 - w) * att + w * scorer.score()[0]


def _plain_beam(m, mem, f0, lp, lengths, i, w, cap, beam):
    """The beam search of SpeechModel._joint_beam for utterance ``i``, one hypothesis at a
    time: keep the ``beam`` best open extensions, the best closed one, stop when it is at
    least the best open one or at the cap (then the best open one if none closed)."""
    live, closed = [([], 0.0)], (None, -math.inf)
    cap = min(cap, int(lengths[i]))
    for t in range(cap):
        ext = []
        for g, sc in live:
            step = _step_scores(m, mem, f0, lp, lengths, i, g, w)
            if sc + float(step[0]) > closed[1]:
                closed = (g, sc + float(step[0]))
            ext += [(g + [c], sc + float(step[c])) for c in range(1, step.shape[0])]
        live = sorted(ext, key=lambda h: -h[1])[:beam]
        if closed[1] >= live[0][1] or t + 1 >= cap:
            return closed if closed[0] is not None else live[0]


def test_joint_beam_search_finds_the_best_hypothesis_when_the_beam_holds_them_all():
    """With beam >= (V - 1) ** (cap - 1) every open prefix is kept, so the beam search must
    return the best closed hypothesis of all that fit the cap (enumerated by hand and scored
    teacher-forced; here one of length 3, so the caches' reordering between steps counts);
    a narrow beam scores no better than that."""
    import itertools
    from zeromask.models import downsampled_lengths, frame_lengths_of
    b = tiny_batch()
    b = {k: b[k] for k in ("spectrogram", "waveform", "pitch", "f0")}
    V, cap, w = 5, 5, 0.3
    m = make(seed=0, ctc_weight=w, vocab_size=V).eval()
    with torch.no_grad():
        mem = m.encode(b["spectrogram"], b["waveform"], b["pitch"], b["f0"])
        lengths = downsampled_lengths(frame_lengths_of(b["spectrogram"]), 2)
        lp = m.ctc_log_probs(mem)
        wide = m.transcribe(**b, max_len=cap, beam=(V - 1) ** (cap - 1))
        narrow = m.transcribe(**b, max_len=cap, beam=2)
        greedy = m.transcribe(**b, max_len=cap)
        assert wide["attention"] == greedy["attention"]  # only the joint decoder changes
        assert max(len(y) for y in wide["joint"]) >= 3
        for i in range(2):
            scores = {y: _joint_score(m, mem, b["f0"], lp, lengths, i, list(y), w)
                      for n in range(cap) for y in itertools.product(range(1, V), repeat=n)}
            best = max(scores, key=scores.get)
            assert wide["joint"][i] == list(best), i
            assert scores[tuple(narrow["joint"][i])] <= scores[best] + 1e-9
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="beam"):
            m.transcribe(**b, beam=bad)
    with pytest.raises(ValueError, match="CTC head"):
        make(ctc_weight=0.0).eval().transcribe(**b, beam=2)


@pytest.mark.parametrize("seed", range(6))
def test_joint_beam_search_is_the_plain_beam_search(seed):
    """Narrow beams (2, 3) against the same search written plainly, one hypothesis at a time
    and teacher-forced, no caches (:func:`_plain_beam`): same outputs, same scores. (These
    random models' winners mostly stay in the first beam slot; the reordering of caches and
    CTC states when a beam takes another's prefix is checked on its own below.)"""
    from zeromask.models import downsampled_lengths, frame_lengths_of
    b = tiny_batch(seed=seed)
    b = {k: b[k] for k in ("spectrogram", "waveform", "pitch", "f0")}
    V, cap, w = 5, 6, 0.3
    m = make(seed=seed, ctc_weight=w, vocab_size=V).eval()
    with torch.no_grad():
        mem = m.encode(b["spectrogram"], b["waveform"], b["pitch"], b["f0"])
        lengths = downsampled_lengths(frame_lengths_of(b["spectrogram"]), 2)
        lp = m.ctc_log_probs(mem)
        for beam in (2, 3):
            reported = []
            hyps = m._joint_beam(mem, b["f0"], lp, lengths, w, cap, beam, scores=reported)
            for i in range(2):
                want, want_score = _plain_beam(m, mem, b["f0"], lp, lengths, i, w, cap, beam)
                assert hyps[i] == want and abs(reported[i] - want_score) < 1e-6, (beam, i)


def test_beam_reorder_moves_the_decoder_cache_and_the_ctc_prefix_state():
    """A beam that takes another beam's prefix must continue exactly as that one would: after
    ``reorder([1, 1])`` row 0 of the cached stepper and of the CTC prefix scorer give row 1's
    next scores (both rows read the same utterance, as a beam search's rows do)."""
    from zeromask.models import CTCPrefixScorer, downsampled_lengths, frame_lengths_of
    b = tiny_batch()
    b = {k: b[k][:1].expand(2, *b[k].shape[1:]).contiguous()
         for k in ("spectrogram", "waveform", "pitch", "f0")}
    m = make(seed=1, ctc_weight=0.5).eval()
    with torch.no_grad():
        mem = m.encode(b["spectrogram"], b["waveform"], b["pitch"], b["f0"])
        lengths = downsampled_lengths(frame_lengths_of(b["spectrogram"]), 2)
        step = m._cached_stepper(mem, b["f0"], 2, "cpu")
        scorer = CTCPrefixScorer(m.ctc_log_probs(mem), lengths)
        step(torch.zeros(2, 1, dtype=torch.long), 0)
        for t, tok in enumerate(([3, 5], [0, 7]), start=1):  # (a 0 is a zero token in text)
            step(torch.tensor([tok]).T, t)
            scorer.advance(torch.tensor(tok), keep=torch.tensor(tok) != 0)
        before = scorer.score()
        index = torch.tensor([1, 1])
        step.reorder(index)
        scorer.reorder(index)
        nxt = step(torch.tensor([[4], [4]]), 3)
        torch.testing.assert_close(nxt[0], nxt[1], rtol=0, atol=0)
        torch.testing.assert_close(scorer.score()[0], before[1], rtol=0, atol=0)
        plain = m.decode(torch.tensor([[0, 5, 7, 4]]), {f: (x[:1], z[:1]) for f, (x, z) in
                                                       mem.items()}, b["f0"][:1])[0, -1]
        torch.testing.assert_close(nxt[0], plain, rtol=1e-5, atol=1e-5)


def test_joint_beam_search_under_the_tempo_search_and_its_caps():
    """beam > 1 composes with the tempo search (each factor decoded with the beam, then the
    same per-utterance choice) and never returns a hypothesis longer than its cap."""
    b = tiny_batch(T=40)
    b = {k: b[k] for k in ("spectrogram", "waveform", "pitch", "f0")}
    m = make(seed=5, ctc_weight=0.5).eval()
    one = m.transcribe(**b, max_len=6, beam=4, tempo_factors=[1.0])
    assert one.pop("tempo") == [1.0, 1.0]
    assert one == m.transcribe(**b, max_len=6, beam=4)
    out = m.transcribe(**b, max_len=6, beam=4, tempo_factors=[1.0, 0.5, 2.0])
    assert all(len(y) <= 6 for y in out["joint"])


# ----------------------------------------------------------------------- input scaling
def test_utterance_norm_takes_out_loudness_and_keeps_padding_zero():
    """CMVN / RMS normalisation: a louder copy of an utterance (+12 dB on the log-mel, x4 on
    the waveform, x16 on the frame energy) gives the same scaled input; padding stays 0; the
    valid frames of each channel have mean 0 and variance 1."""
    from zeromask.models import FrontEnd, frame_lengths_of
    b = tiny_batch()
    lengths = frame_lengths_of(b["spectrogram"])
    cfg = tiny_config(input_norm="utterance")
    louder = {"spectrogram": b["spectrogram"] + 12.0, "waveform": b["waveform"] * 4.0,
              "pitch": b["pitch"] * torch.tensor([1.0, 16.0, 1.0])}
    for row in range(2):  # padding stays exactly zero in the louder copy as well
        for x in louder.values():
            x[row, int(lengths[row]):] = 0.0
    for f in ("spectrogram", "waveform", "pitch"):
        fe = FrontEnd(f, cfg)
        x = fe.scale(b[f], lengths)
        tol = 5e-3 if f == "pitch" else 1e-4  # log(energy + 1e-4): nearly scale-free
        torch.testing.assert_close(fe.scale(louder[f], lengths), x, atol=tol, rtol=tol)
        assert (x[1, int(lengths[1]):] == 0).all()
        v = x[1, : int(lengths[1])]
        if f == "waveform":
            torch.testing.assert_close(v.pow(2).mean(), torch.tensor(1.0))
        else:
            torch.testing.assert_close(v.mean(0), torch.zeros(v.shape[1]), atol=1e-5, rtol=0)
            torch.testing.assert_close(v.var(0, unbiased=False), torch.ones(v.shape[1]),
                                       atol=1e-3, rtol=1e-3)
    fixed = FrontEnd("spectrogram", tiny_config())
    assert (fixed.scale(louder["spectrogram"], lengths)
            - fixed.scale(b["spectrogram"], lengths)).abs().max() > 0.3
    with pytest.raises(ValueError, match="input_norm"):
        tiny_config(input_norm="global")


@pytest.mark.parametrize("downsample", [1, 2, 4])
def test_conv_frontend_subsamples_like_the_projecting_one(downsample):
    """Both front-ends give T / downsample frames; the conv one has no full-rate layer of
    width d_model, and the model trains through it (every parameter gets a gradient)."""
    b = tiny_batch()
    outs = {}
    for kind in ("project", "conv"):
        m = make(frontend=kind, downsample=downsample, input_norm="utterance")
        out = m(**b)
        out["loss"].backward()
        assert [n for n, p in m.named_parameters() if p.grad is None] == []
        outs[kind] = m.encoders["pitch"].front
        assert out["ctc_log_probs"].shape[1] == math.ceil(24 / downsample)
    conv = outs["conv"]
    assert (conv.proj is None) == (downsample > 1)
    if downsample > 1:
        assert conv.convs[0].in_channels == 3  # pitch: f0, energy, periodicity
    with pytest.raises(ValueError, match="frontend"):
        tiny_config(frontend="conv2d")


def test_vtlp_warps_the_mel_axis_and_keeps_padding_and_the_ends():
    """alpha = 1 is the identity; a formant at bin f moves to about f / alpha below the
    boundary; bins 0 and M - 1 map onto themselves; padding frames stay 0; the model trains
    with it on (and eval mode leaves the input alone)."""
    from zeromask.models import vtlp_warp
    M, T = 40, 6
    spec = torch.full((3, T, M), -60.0)
    spec[:, :, 10] = 0.0                              # one "formant" at bin 10
    spec[2, 4:] = 0.0                                 # padding of row 2
    lengths = torch.tensor([T, T, 4])
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(vtlp_warp(spec, lengths, 0.0, generator=g), spec)
    g = torch.Generator().manual_seed(0)
    alpha = 1 + 0.2 * (2 * torch.rand(3, 1, generator=g) - 1)
    out = vtlp_warp(spec, lengths, 0.2, generator=torch.Generator().manual_seed(0))
    for b in range(3):
        peak = out[b, 0].argmax().item()
        assert abs(peak - 10 / alpha[b].item()) <= 1.0, (peak, alpha[b])
        assert out[b, 0, 0] == -60.0 and out[b, 0, M - 1] == -60.0
    assert (out[2, 4:] == 0).all()
    m = make(vtlp=0.1)
    b = tiny_batch()
    m.train()
    m(**b)["loss"].backward()
    with pytest.raises(ValueError, match="vtlp"):
        tiny_config(vtlp=0.7)


def test_resample_time_rescales_each_utterance_and_keeps_unvoiced_zero():
    from zeromask.models import resample_time
    x = torch.zeros(2, 6, 3)
    x[0, :6] = 2.0                    # constant rows stay constant at any factor
    x[1, :4] = torch.arange(4.0)[:, None]
    y, n = resample_time(x, torch.tensor([6, 4]), 1.5, pad_multiple=4)
    assert n.tolist() == [9, 6] and y.shape == (2, 12, 3)
    assert torch.equal(y[0, :9], torch.full((9, 3), 2.0)) and not y[:, 9:].any()
    assert not y[1, 6:].any()
    # linear, align_corners=False: source position (j + 0.5) / 1.5 - 0.5, clamped to [0, 3]
    src = ((torch.arange(6.0) + 0.5) / 1.5 - 0.5).clamp(0, 3)
    torch.testing.assert_close(y[1, :6, 0], src)
    same, n1 = resample_time(x, torch.tensor([6, 4]), 1.0)
    assert torch.equal(same, x) and n1.tolist() == [6, 4]
    f0 = torch.tensor([[0.0, 120.0, 0.0, 130.0, 140.0, 0.0]])
    z, _ = resample_time(f0, torch.tensor([6]), 0.5, mode="nearest")
    assert set(z[0].tolist()) <= {0.0, 120.0, 130.0, 140.0}     # no value between 0 and F0
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="factor"):
            resample_time(x, torch.tensor([6, 4]), bad)
    with pytest.raises(ValueError, match="mode"):
        resample_time(x, torch.tensor([6, 4]), 2.0, mode="cubic")


def test_ctc_token_log_likelihood_is_the_hand_computed_alignment_sum():
    """T = 2 frames: [c] is p1(c) p2(c) + p1(c) p2(b) + p1(b) p2(c); [] is p1(b) p2(b); [c, c]
    needs a blank between its repeats (3 frames): no alignment, -inf; per token."""
    from zeromask.models import ctc_token_log_likelihood
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 2, 5, generator=g, dtype=torch.float64), -1)
    p = lp.exp()
    c, d = 3, 2
    got = ctc_token_log_likelihood(lp, torch.tensor([2, 2, 2]), [[c], [], [c, c]])
    want0 = torch.log(p[0, 0, c] * p[0, 1, c] + p[0, 0, c] * p[0, 1, 0] + p[0, 0, 0] * p[0, 1, c])
    torch.testing.assert_close(got[0], want0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], torch.log(p[1, 0, 0] * p[1, 1, 0]), rtol=1e-5, atol=1e-6)
    assert got[2] == -math.inf
    two = ctc_token_log_likelihood(lp[:1], torch.tensor([2]), [[c, d]])
    torch.testing.assert_close(two[0], torch.log(p[0, 0, c] * p[0, 1, d]) / 2, rtol=1e-5,
                               atol=1e-6)


def test_tempo_search_keeps_per_utterance_the_most_likely_tempo():
    """transcribe(tempo_factors=...): factor 1 alone is plain decoding; with several, each
    utterance gets the outputs of the factor whose joint hypothesis has the highest CTC
    log-likelihood per token (checked against decoding each resampled batch by hand)."""
    from zeromask.models import (ctc_token_log_likelihood, downsampled_lengths,
                                 frame_lengths_of, resample_time)
    b = tiny_batch(T=40)
    b = {k: b[k] for k in ("spectrogram", "waveform", "pitch", "f0")}
    m = make(seed=5, ctc_weight=0.5).eval()
    plain = m.transcribe(**b, max_len=6)
    one = m.transcribe(**b, max_len=6, tempo_factors=[1.0])
    assert one.pop("tempo") == [1.0, 1.0] and one == plain
    factors = [1.0, 0.5, 2.0]
    out = m.transcribe(**b, max_len=6, tempo_factors=factors)
    n = frame_lengths_of(b["spectrogram"])
    by, scores = {}, {}
    with torch.no_grad():
        for r in factors:
            rb = dict(b)
            if r != 1.0:
                rb["spectrogram"], _ = resample_time(b["spectrogram"], n, r, pad_multiple=32)
                T = rb["spectrogram"].shape[1]
                for k, mode in (("waveform", "linear"), ("pitch", "nearest"),
                                ("f0", "nearest")):
                    rb[k] = resample_time(b[k], n, r, mode=mode, pad_multiple=32)[0][:, :T]
            by[r] = m.transcribe(**rb, max_len=6)
            fl = frame_lengths_of(rb["spectrogram"])
            lp = m.ctc_log_probs(m.encode(rb["spectrogram"], rb["waveform"], rb["pitch"],
                                          rb["f0"], frame_lengths=fl))
            scores[r] = ctc_token_log_likelihood(lp, downsampled_lengths(fl, 2), by[r]["joint"])
    for i in range(2):
        best = max(factors, key=lambda r: (float(scores[r][i]), -factors.index(r)))
        assert out["tempo"][i] == best
        for key in ("attention", "ctc", "joint", "unended"):
            assert out[key][i] == by[best][key][i], (i, key)
    for bad in ([], [0.0], [1.0, -2.0], [float("nan")]):
        with pytest.raises(ValueError, match="tempo_factors"):
            m.transcribe(**b, tempo_factors=bad)
    with pytest.raises(ValueError, match="CTC head"):
        make(ctc_weight=0.0).eval().transcribe(**b, tempo_factors=[1.0, 1.5])
