#!/usr/bin/env bash
# The reference speech model end to end on a CPU:
#   1. synthesize a labelled set (zeromask-make-data: train = espeak-ng + flite voices, half
#      of it with noise/reverberation; test = held-out espeak-ng voices; shifted = festival,
#      a held-out espeak-ng accent, out-of-range speed/pitch, noise and reverberation);
#   2. train for a 15-minute budget of training time (joint CTC/attention);
#   3. evaluate the final checkpoint on both held-out sets (CER/WER, attention greedy, CTC
#      greedy and joint CTC/attention), plain (greedy) and searched (the test-time tempo
#      search and a joint CTC/attention beam search), and draw the CER-vs-time curve and
#      the utterance figure.
# Environment: N (utterances, 14400), BUDGET (training seconds, 900), DATA (data/synth-N),
# RUN (runs/demo), THREADS (torch threads, 2), TEMPO (the tempo search's factors,
# 0.65,0.8,1,1.25,1.5; empty: no tempo search), BEAM (beams of the searched decoding, 4;
# 1: greedy). Extra arguments go to zeromask-train and override the recipe (e.g.
# --zero-mode score, --no-f0-rotary, --ctc-weight 0).
# Results: RUN/demo.json (all numbers), RUN/eval_{test,shifted}.json (greedy decoding),
# RUN/eval_{test,shifted}_search.json (searched), RUN/cer_vs_time.png, RUN/utterance.png.
# Nothing is written into the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZEROMASK_VENV:-.venv}
[ -x "$VENV/bin/zeromask-train" ] || bash scripts/setup.sh
N=${N:-14400}
DATA=${DATA:-data/synth-$N}
RUN=${RUN:-runs/demo}
THREADS=${THREADS:-2}
BUDGET=${BUDGET:-900}
TEMPO=${TEMPO-0.65,0.8,1,1.25,1.5}
BEAM=${BEAM:-4}
[ -f "$DATA/manifest.jsonl" ] || "$VENV/bin/zeromask-make-data" --out "$DATA" --n "$N"
"$VENV/bin/zeromask-train" --data "$DATA" --out "$RUN" --config scripts/asr_demo.json \
  --time-budget "$BUDGET" --threads "$THREADS" --no-final-eval "$@"
for split in test shifted; do
  if [ -d "$DATA/$split" ]; then
    "$VENV/bin/zeromask-eval" --checkpoint "$RUN/last.pt" --data "$DATA/$split" \
      --cache-dir "$DATA/.features" --threads "$THREADS" --json "$RUN/eval_$split.json" \
      --no-progress --samples 3
    if [ -n "$TEMPO" ] || [ "$BEAM" != 1 ]; then
      "$VENV/bin/zeromask-eval" --checkpoint "$RUN/last.pt" --data "$DATA/$split" \
        --cache-dir "$DATA/.features" --threads "$THREADS" ${TEMPO:+--tempo-search "$TEMPO"} \
        --beam "$BEAM" --json "$RUN/eval_${split}_search.json" --no-progress --samples 0
    fi
  fi
done
"$VENV/bin/zeromask-plots" cer --out "$RUN/cer_vs_time.png" "$RUN/log.jsonl"
"$VENV/bin/zeromask-plots" utterance --checkpoint "$RUN/last.pt" --data "$DATA/test" \
  --cache-dir "$DATA/.features" --stage spectrogram --out "$RUN/utterance.png"
"$VENV/bin/python" - "$RUN" <<'PY'
import json, os, platform, sys, time
import torch, zeromask
run = sys.argv[1]
res = json.load(open(os.path.join(run, "results.json")))
out = {"steps": res["step"], "training_s": round(res["elapsed_s"], 1),
       "parameters": res["parameters"], "date": time.strftime("%Y-%m-%d"),
       "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
       "torch": torch.__version__, "zeromask": zeromask.__version__}
try:
    out["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                      if l.startswith("model name"))
except (OSError, StopIteration):
    pass
for split in ("test", "shifted", "test_search", "shifted_search"):
    p = os.path.join(run, f"eval_{split}.json")
    if os.path.exists(p):
        e = json.load(open(p))
        out[split] = {k: e.get(k) for k in ("cer", "wer", "ctc_cer", "ctc_wer", "joint_cer",
                                            "joint_wer", "n", "tempo_search", "beam")}
json.dump(out, open(os.path.join(run, "demo.json"), "w"), indent=2)
print(json.dumps(out, indent=2))
PY
