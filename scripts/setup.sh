#!/usr/bin/env bash
# Set up zeromask on a fresh machine: system tools, a virtual environment, torch, the
# package with its C++ extension and test extras. Idempotent; safe to re-run.
#   ZEROMASK_VENV   where the venv goes (default .venv)
#   ZEROMASK_TORCH  the torch requirement (default torch==2.13.0, the CPU build; on a GPU
#                   machine set it to the CUDA build you want)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZEROMASK_VENV:-.venv}
TORCH=${ZEROMASK_TORCH:-torch==2.13.0}

# Speech synthesis for zeromask-make-data, from Debian: espeak-ng and flite (training voices),
# festival with three voices (the shifted evaluation set only), and sox.
SYNTH_PKGS="espeak-ng sox flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts"
missing=""
if command -v dpkg-query >/dev/null 2>&1; then
  for p in $SYNTH_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
else
  for c in espeak-ng flite text2wave sox; do command -v "$c" >/dev/null 2>&1 || missing="$missing $c"; done
fi
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $SYNTH_PKGS >/dev/null) \
      || echo "setup: could not install$missing; data-synthesis tests that need them will be skipped" >&2
  else
    echo "setup: missing$missing (apt-get install $SYNTH_PKGS); data-synthesis tests that need them will be skipped" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q "$TORCH"
python -m pip install -q setuptools wheel ninja
# --no-build-isolation: the C++ extension builds against the torch installed above.
python -m pip install -q --no-build-isolation -e ".[test]"
python - <<'PY'
import zeromask
status = zeromask.available_backends()
print("zeromask", zeromask.__version__, "backends:",
      ", ".join(f"{k}={'ok' if v is None else 'unavailable'}" for k, v in status.items()))
PY
