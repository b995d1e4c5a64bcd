"""Paired bootstrap of the joint CTC/attention CER between two zeromask-eval --json outputs
on the same utterances: python paired_bootstrap.py A.json[.gz] B.json[.gz]

Prints CER(A) -> CER(B), the difference and its 95% interval over 1000 resamples of the
utterances (corpus CER: edits over reference characters, jiwer)."""
import gzip
import json
import sys

import jiwer
import numpy as np


def edits(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        d = json.load(fh)
    return {u["id"]: (jiwer.cer(u["ref"], u["joint_hyp"]) * len(u["ref"]), len(u["ref"]))
            for u in d["utterances"]}


a, b = edits(sys.argv[1]), edits(sys.argv[2])
ids = sorted(set(a) & set(b))
ea = np.array([a[i][0] for i in ids])
eb = np.array([b[i][0] for i in ids])
n = np.array([a[i][1] for i in ids])
rng = np.random.default_rng(0)
diffs = []
for _ in range(1000):
    k = rng.integers(0, len(ids), len(ids))
    diffs.append((eb[k].sum() - ea[k].sum()) / n[k].sum())
print(f"n={len(ids)} {ea.sum() / n.sum():.4f} -> {eb.sum() / n.sum():.4f}  diff "
      f"{(eb.sum() - ea.sum()) / n.sum():+.4f} [{np.percentile(diffs, 2.5):+.4f}, "
      f"{np.percentile(diffs, 97.5):+.4f}]")
