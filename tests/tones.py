"""A tiny wav+txt speech-like set that needs no espeak-ng: each 'word' is a tone burst."""
import numpy as np

SR = 16000

#: zeromask-train flags for a model small and fast enough for the CLI tests
TINY = ["--d-model", "16", "--num-heads", "2", "--enc-layers", "1", "--dec-self-layers", "1",
        "--ffn-mult", "2", "--downsample", "4", "--no-progress", "--threads", "1",
        "--samples", "1", "--max-decode-len", "12"]
FREQS = {"ab": 140.0, "ba": 190.0, "cab": 240.0, "bad": 300.0}


def write_tone_set(root, n, seed=0, words=tuple(FREQS)):
    """n utterances of 1-2 words under root (u000.wav + u000.txt, ...), silences between."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = " ".join(rng.choice(list(words), size=rng.integers(1, 3)))
        parts = [np.zeros(int(0.1 * SR))]
        for w in text.split():
            t = np.arange(int(0.12 * SR)) / SR
            parts += [0.4 * np.sin(2 * np.pi * FREQS[w] * t), np.zeros(int(0.05 * SR))]
        sf.write(str(root / f"u{i:03d}.wav"), np.concatenate(parts).astype(np.float32), SR)
        (root / f"u{i:03d}.txt").write_text(text + "\n")
