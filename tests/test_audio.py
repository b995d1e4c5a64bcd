"""zeromask.audio: features at one hop rate, F0 accuracy, silence, energy, cache."""
import numpy as np
import pytest
import torch

pytest.importorskip("librosa")
pytest.importorskip("parselmouth")

from zeromask import zero  # noqa: E402
from zeromask.audio import (FeatureCache, FeatureConfig, extract_batch,  # noqa: E402
                            extract_features, resample_contour)
from zeromask.audio import features as feat_mod  # noqa: E402

SR = 16000
HOP = 160


def harmonic(freq_hz, amp=0.5, n_harm=5):
    """A periodic signal with instantaneous frequency ``freq_hz`` (per sample)."""
    phase = 2 * np.pi * np.cumsum(freq_hz) / SR
    return amp * sum(np.sin(k * phase) / k for k in range(1, n_harm + 1)) / 1.5


def segments():
    """silence | 110 Hz | silence | 220 Hz | 100->300 Hz glide | silence (each 0.5-1 s)."""
    sil = np.zeros(SR // 2)
    glide = np.linspace(100.0, 300.0, SR)
    parts = [("sil", sil), ("110", np.full(SR, 110.0)), ("sil", sil),
             ("220", np.full(SR, 220.0)), ("glide", glide), ("sil", sil)]
    wav, truth, labels = [], [], []
    for name, f in parts:
        if name == "sil":
            wav.append(np.zeros(len(f)))
            truth.append(np.zeros(len(f)))
        else:
            wav.append(harmonic(f))
            truth.append(f)
        labels += [name] * len(f)
    return np.concatenate(wav), np.concatenate(truth), np.array(labels)


@pytest.fixture(scope="module")
def feats():
    wav, truth, labels = segments()
    return wav, truth, labels, extract_features(wav, SR)


def frame_truth(truth, labels, n):
    centers = np.arange(n) * HOP
    # a frame is "inside" a segment when its whole 25 ms window (+ margin) lies in it
    inside = np.zeros(n, bool)
    lab = np.empty(n, dtype=object)
    for i, c in enumerate(centers):
        lo, hi = c - 400, c + 400
        if lo >= 0 and hi < len(labels) and labels[lo] == labels[hi] == labels[min(c, len(labels) - 1)]:
            inside[i] = True
        lab[i] = labels[min(c, len(labels) - 1)]
    return truth[np.minimum(centers, len(truth) - 1)], inside, lab


def test_outputs_share_one_hop_rate_and_are_finite(feats):
    wav, _, _, f = feats
    n = 1 + len(wav) // HOP
    assert set(f) == {"spectrogram", "waveform", "f0", "energy", "periodicity", "pitch"}
    assert f["spectrogram"].shape == (n, 80)
    assert f["waveform"].shape == (n, HOP)
    for k in ("f0", "energy", "periodicity"):
        assert f[k].shape == (n,)
    assert f["pitch"].shape == (n, 3)
    np.testing.assert_array_equal(f["pitch"], np.stack([f["f0"], f["energy"], f["periodicity"]], -1))
    for k, v in f.items():
        assert v.dtype == np.float32 and np.isfinite(v).all(), k
    # waveform frame i is centred on sample i * hop
    i = 200
    np.testing.assert_allclose(f["waveform"][i], wav[i * HOP - HOP // 2: i * HOP + HOP // 2],
                               atol=1e-6)


@pytest.mark.parametrize("segment", ["110", "220", "glide"])
def test_f0_recovered_within_2_percent(feats, segment):
    wav, truth, labels, f = feats
    t, inside, lab = frame_truth(truth, labels, len(f["f0"]))
    sel = inside & (lab == segment)
    assert sel.sum() > 50
    est = f["f0"][sel]
    assert (est > 0).all(), "voiced frames must have an f0"
    rel = np.abs(est - t[sel]) / t[sel]
    assert rel.max() < 0.02, f"{segment}: max relative error {rel.max():.4f}"
    assert (f["periodicity"][sel] > 0.8).all()


def test_silence_gives_zero_f0_and_low_periodicity(feats):
    wav, truth, labels, f = feats
    _, inside, lab = frame_truth(truth, labels, len(f["f0"]))
    sel = inside & (lab == "sil")
    assert sel.sum() > 50
    assert (f["f0"][sel] == 0).all()
    assert f["periodicity"][sel].max() < 0.1
    assert f["energy"][sel].max() < 1e-6


def test_energy_ordering_follows_amplitude():
    parts = [harmonic(np.full(SR // 2, 150.0), amp=a) for a in (0.05, 0.2, 0.8)]
    f = extract_features(np.concatenate(parts), SR)
    n = SR // 2 // HOP
    means = [f["energy"][i * n + 5:(i + 1) * n - 5].mean() for i in range(3)]
    assert means[0] < means[1] < means[2]
    np.testing.assert_allclose(means[2] / means[1], 4.0, rtol=0.05)  # RMS is linear


def test_noise_is_unvoiced_and_never_nan():
    rng = np.random.default_rng(0)
    wav = rng.standard_normal(SR // 2) * 0.3
    f = extract_features(wav, SR)
    assert all(np.isfinite(v).all() for v in f.values())
    assert (f["f0"] > 0).mean() < 0.2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused_not_zeroed(bad):
    wav = np.random.default_rng(0).standard_normal(SR // 4) * 0.3
    wav[100:103] = bad
    with pytest.raises(ValueError, match="3 NaN or inf samples \\(first at sample 100\\)"):
        extract_features(wav, SR)


def test_stereo_and_unsigned_pcm_have_the_loudness_of_mono_float():
    """Integer PCM is scaled before channels are averaged, uint8 has its offset removed:
    the same sound in every container gives the same spectrogram (to quantisation)."""
    wav = harmonic(np.full(SR // 2, 180.0), amp=0.4)
    ref = extract_features(wav, SR)["spectrogram"]
    i16 = np.round(wav * 32767).astype(np.int16)
    cases = {
        "int16 mono": i16,
        "int16 stereo (samples, 2)": np.stack([i16, i16], axis=1),   # scipy.io.wavfile
        "int16 stereo (2, samples)": np.stack([i16, i16], axis=0),
        "int32": (wav * 2**31).astype(np.int32),
        "float32 stereo": np.stack([wav, wav], axis=1).astype(np.float32),
    }
    loud = ref > ref.max() - 40  # bins well above the quantisation noise
    for name, x in cases.items():
        spec = extract_features(x, SR)["spectrogram"]
        assert np.abs(spec - ref)[loud].max() < 0.1, name
    u8 = np.clip(np.round(wav * 128 + 128), 0, 255).astype(np.uint8)
    spec8 = extract_features(u8, SR)["spectrogram"]
    loud8 = ref > ref.max() - 25  # 8 bits: quantisation noise is ~48 dB down
    assert np.abs(spec8 - ref)[loud8].max() < 1.0


@pytest.mark.parametrize("sr", [0, -16000, 16000.5, True, None])
def test_bad_sample_rate_is_a_clear_error(sr):
    with pytest.raises(ValueError, match="sr must be a positive integer"):
        extract_features(np.zeros(1600), sr)


@pytest.mark.parametrize("kind", ["digital silence", "16-bit dither"])
def test_an_utterance_with_no_speech_is_all_zero_tokens(kind):
    """The relative cut (top_db below the loudest frame) finds nothing to cut in silence;
    the absolute floor (SILENCE_FLOOR_DB) makes every such frame a zero token."""
    rng = np.random.default_rng(0)
    wav = np.zeros(SR) if kind == "digital silence" else \
        np.round(rng.standard_normal(SR) * 0.5) / 32768
    spec = torch.from_numpy(extract_features(wav, SR)["spectrogram"])[None]
    assert zero.from_audio(spec, spec).all()
    # a quiet but real signal (-60 dBFS noise) stays above the floor
    quiet = torch.from_numpy(extract_features(rng.standard_normal(SR) * 1e-3, SR)
                             ["spectrogram"])[None]
    assert not zero.from_audio(quiet, quiet).any()
    assert not zero.from_audio(spec, spec, threshold_db=None).all()  # the floor's doing


def test_int16_input_and_resampling():
    wav = harmonic(np.full(SR, 200.0))
    pcm = (wav * 32767).astype(np.int16)
    f16 = extract_features(pcm, SR)
    wav8 = wav[::2]  # 8 kHz copy: resampled to 16 kHz before analysis
    f8 = extract_features(wav8, 8000)
    mid = slice(20, 80)
    assert np.abs(f16["f0"][mid] - 200).max() < 2
    assert np.abs(f8["f0"][mid] - 200).max() < 4
    assert abs(len(f8["f0"]) - len(f16["f0"])) <= 1


def test_silent_frames_become_zero_tokens(feats):
    wav, truth, labels, f = feats
    _, inside, lab = frame_truth(truth, labels, len(f["f0"]))
    spec = torch.from_numpy(f["spectrogram"])[None]
    z = zero.from_audio(spec, spec, top_db=50.0)[0].numpy()
    assert z[inside & (lab == "sil")].all()
    assert not z[inside & (lab != "sil")].any()
    # padding (exact zeros) is a zero token too
    padded = torch.cat([spec, torch.zeros(1, 7, spec.shape[-1])], dim=1)
    zp = zero.from_audio(padded, padded, top_db=50.0)[0]
    assert zp[-7:].all() and torch.equal(zp[:-7], torch.from_numpy(z))


def test_resample_contour_keeps_unvoiced_zero():
    f0 = np.array([0, 0, 100, 110, 120, 130, 0, 0, 0, 200], np.float32)
    out = resample_contour(f0, 5)
    assert out.shape == (5,) and isinstance(out, np.ndarray)
    assert out[0] == 0 and out[3] == 0
    assert 100 <= out[1] <= 130
    up = resample_contour(torch.from_numpy(f0)[None], 19)
    assert up.shape == (1, 19) and torch.isfinite(up).all()
    voiced = up[0][up[0] > 0]
    assert voiced.min() >= 100  # no value dragged toward 0 Hz by an unvoiced neighbour


def test_config_validation():
    with pytest.raises(ValueError, match="f0_method"):
        FeatureConfig(f0_method="crepe")
    with pytest.raises(ValueError, match="hop_length"):
        FeatureConfig(hop_length=500, n_fft=400)


def test_feature_cache_computes_once(tmp_path, monkeypatch):
    import soundfile as sf
    paths = []
    for i, hz in enumerate((120.0, 180.0)):
        p = tmp_path / f"u{i}.wav"
        sf.write(str(p), harmonic(np.full(SR // 2, hz)).astype(np.float32), SR)
        paths.append(p)
    cache_dir = tmp_path / "cache"
    first = extract_batch(paths, cache_dir)
    assert len(list(cache_dir.rglob("*.npz"))) == 2
    calls = []
    real = feat_mod.extract_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(feat_mod, "extract_features", counting)
    again = extract_batch(paths, cache_dir)
    assert calls == []  # read back, not recomputed
    for a, b in zip(first, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert np.median(again[1]["f0"][10:40]) == pytest.approx(180.0, rel=0.01)
    # filling the cache with worker processes gives the same features
    par = extract_batch(paths, tmp_path / "cache_par", num_workers=2)
    assert len(list((tmp_path / "cache_par").rglob("*.npz"))) == 2
    for a, b in zip(first, par):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # another configuration is another cache entry
    other = FeatureCache(cache_dir, FeatureConfig(hop_length=320))
    f = other.get(paths[0])
    assert calls == [1] and f["spectrogram"].shape[0] == 1 + (SR // 2) // 320
    # a rewritten file is featurised again
    import os
    sf.write(str(paths[0]), harmonic(np.full(SR // 2, 250.0)).astype(np.float32), SR)
    os.utime(paths[0], ns=(1, 10 ** 18))
    f2 = FeatureCache(cache_dir).get(paths[0])
    assert np.median(f2["f0"][10:40]) == pytest.approx(250.0, rel=0.01)


def test_pyin_estimator_also_works():
    """The librosa-only fallback (no parselmouth): same contract, slower."""
    t = np.arange(SR // 2) / SR
    wav = np.concatenate([np.zeros(SR // 4), 0.4 * np.sin(2 * np.pi * 180 * t)])
    f = extract_features(wav, SR, f0_method="pyin")
    n = 1 + len(wav) // HOP
    assert f["f0"].shape == (n,) and f["periodicity"].shape == (n,)
    assert all(np.isfinite(v).all() for v in f.values())
    assert (f["f0"][5:15] == 0).all() and f["periodicity"][5:15].max() < 0.1
    voiced = f["f0"][40:60]
    assert (np.abs(voiced - 180) / 180 < 0.02).all()
    assert f["periodicity"][40:60].min() > 0.5
