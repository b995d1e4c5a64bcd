"""The reference model learns: a tiny model overfits a handful of real (espeak-ng) utterances
to CER 0 with greedy decoding, through both its attention decoder and its CTC head."""
import shutil

import pytest
import torch

pytest.importorskip("librosa")
jiwer = pytest.importorskip("jiwer")

from zeromask.audio import extract_features  # noqa: E402
from zeromask.data import CharTokenizer, collate  # noqa: E402
from zeromask.models import ModelConfig, SpeechModel  # noqa: E402

TEXTS = ["the red dog", "a cat sings", "my blue door", "tom runs home"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None,
                    reason="espeak-ng is not installed (apt-get install -y espeak-ng)")
def test_tiny_model_overfits_four_utterances_to_cer_zero():
    from zeromask.data.synth import synthesize
    torch.manual_seed(0)
    tok = CharTokenizer()
    items = []
    for i, text in enumerate(TEXTS):
        wav = synthesize(text, "en-us", speed=170, pitch=30 + 10 * i)
        f = extract_features(wav, 16000)
        items.append({"id": str(i), "text": text,
                      **{k: torch.from_numpy(f[k]) for k in ("spectrogram", "waveform",
                                                              "pitch", "f0")},
                      "tokens": torch.tensor(tok.encode(text))})
    batch = collate(items)
    inputs = {k: batch[k] for k in ("spectrogram", "waveform", "pitch", "f0", "input_ids",
                                    "labels", "frame_lengths")}
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_heads=2, ffn_mult=2,
                      enc_layers=1, encoder_layers={"spectrogram": 2}, dec_self_layers=1,
                      dropout=0.0, spec_augment=None, label_smoothing=0.0, ctc_weight=0.3,
                      max_decode_len=30)
    model = SpeechModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = model(**inputs)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    hyps = [tok.decode(h) for h in model.generate(**inputs)]
    ctc = [tok.decode(h) for h in model.ctc_generate(**inputs)]
    assert jiwer.cer(TEXTS, hyps) == 0.0, hyps
    assert jiwer.cer(TEXTS, ctc) == 0.0, ctc
