"""scripts/asr_demo.sh end to end on a tiny tone set (no speech synthesis): it trains, scores
both held-out sets greedily and searched (the test-time tempo search and a beam search),
draws both figures and writes
demo.json with every number the README quotes from it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("soundfile")
pytest.importorskip("librosa")
pytest.importorskip("jiwer")
pytest.importorskip("matplotlib")

from tones import TINY, write_tone_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _venv():
    """The environment this test runs in, as the script's ZEROMASK_VENV."""
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "zeromask-train").exists():
        pytest.skip("the package's console scripts are not installed next to this python")
    return venv


def test_demo_script_trains_scores_and_reports(tmp_path):
    tempo = "0.8,1"
    data = tmp_path / "data"
    for split, n, seed in (("train", 8, 0), ("test", 3, 1), ("shifted", 3, 2)):
        write_tone_set(data / split, n, seed=seed)
    (data / "manifest.jsonl").write_text("")  # the script then makes no data of its own
    run = tmp_path / "run"
    i = TINY.index("--threads")
    train_args = TINY[:i] + TINY[i + 2:]  # the script passes THREADS
    env = dict(os.environ, ZEROMASK_VENV=str(_venv()), DATA=str(data), RUN=str(run),
               BUDGET="4", THREADS="1", TEMPO=tempo, BEAM="2")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "asr_demo.sh"), *train_args,
                          "--ctc-weight", "0.5", "--eval-every", "30"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    demo = json.loads((run / "demo.json").read_text())
    for split in ("test", "shifted"):
        rec = demo[split]
        assert rec["n"] == 3 and rec["tempo_search"] is None and rec["beam"] == 1
        for key in ("cer", "ctc_cer", "joint_cer", "wer", "joint_wer"):
            assert 0.0 <= rec[key] < 100.0
        searched = demo[split + "_search"]
        assert searched["tempo_search"] == [0.8, 1.0] and searched["n"] == 3
        assert searched["beam"] == 2
        utts = json.loads((run / f"eval_{split}_search.json").read_text())["utterances"]
        assert {u["tempo"] for u in utts} <= {0.8, 1.0}
    assert demo["steps"] >= 1 and demo["training_s"] >= 0
    for png in ("cer_vs_time.png", "utterance.png"):
        assert (run / png).read_bytes()[:8] == PNG_MAGIC
