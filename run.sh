#!/usr/bin/env bash
# One command on a fresh machine: set everything up, then run the main job, the CPU
# benchmark (zeromask against SDPA and the other ways of doing this), which prints a table
# and writes plots under benchmarks/results/<device>/.  Extra arguments go to zeromask-bench.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec "${ZEROMASK_VENV:-.venv}/bin/zeromask-bench" "$@"
