#!/usr/bin/env bash
# One command on a fresh machine: set everything up, then run the main job, the CPU
# benchmark (zeromask against SDPA and the other ways of doing this), which prints a table
# and writes plots under runs/bench/<device>/ (git-ignored).  Extra arguments go to
# benchmarks/bench.py (--suite cpu-quick: a one-minute run; --suite model: the speech
# model's shapes; --out DIR: elsewhere).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec "${ZEROMASK_VENV:-.venv}/bin/python" benchmarks/bench.py "$@"
