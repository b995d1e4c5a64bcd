#!/usr/bin/env bash
# The reference speech model end to end on a CPU: synthesize a labelled set with espeak-ng,
# train for a time budget, evaluate CER/WER on held-out voices.
#   N (3000 utterances), BUDGET (900 s), DATA (data/synth), RUN (runs/demo); extra
#   arguments go to zeromask-train (e.g. --zero-mode score, --no-f0-rotary).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZEROMASK_VENV:-.venv}
[ -x "$VENV/bin/zeromask-train" ] || bash scripts/setup.sh
DATA=${DATA:-data/synth}
RUN=${RUN:-runs/demo}
[ -f "$DATA/manifest.jsonl" ] || "$VENV/bin/zeromask-make-data" --out "$DATA" --n "${N:-3000}"
"$VENV/bin/zeromask-train" --data "$DATA" --out "$RUN" --time-budget "${BUDGET:-900}" "$@"
"$VENV/bin/zeromask-eval" --checkpoint "$RUN/best.pt" --data "$DATA"
