#!/usr/bin/env bash
# The reference speech model end to end on a CPU: synthesize a labelled set with espeak-ng,
# train (1800 steps, capped at a 15-minute budget), evaluate CER/WER on held-out voices.
#   N (2400 utterances), BUDGET (900 s), DATA (data/synth), RUN (runs/demo); extra
#   arguments go to zeromask-train and override the defaults (e.g. --zero-mode score,
#   --no-f0-rotary, --max-steps 4000).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZEROMASK_VENV:-.venv}
[ -x "$VENV/bin/zeromask-train" ] || bash scripts/setup.sh
DATA=${DATA:-data/synth}
RUN=${RUN:-runs/demo}
[ -f "$DATA/manifest.jsonl" ] || "$VENV/bin/zeromask-make-data" --out "$DATA" --n "${N:-2400}"
"$VENV/bin/zeromask-train" --data "$DATA" --out "$RUN" --time-budget "${BUDGET:-900}" \
  --max-steps 1800 --lr 2e-3 --warmup 30 "$@"
"$VENV/bin/zeromask-eval" --checkpoint "$RUN/best.pt" --data "$DATA"
