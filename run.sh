#!/usr/bin/env bash
# One command on a fresh machine: set everything up, then run the main job, the CPU
# benchmark (zeromask against SDPA and the other ways of doing this), which prints a table
# and writes plots under runs/bench/<device>/ (git-ignored).  Extra arguments go to
# zeromask-bench (--suite cpu-quick: a one-minute run; --out DIR: elsewhere).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec "${ZEROMASK_VENV:-.venv}/bin/zeromask-bench" "$@"
