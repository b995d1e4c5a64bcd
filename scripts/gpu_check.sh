#!/usr/bin/env bash
# The GPU check a session lent a GPU runs in one call (under 8 minutes on an H100/H200):
#   1. builds the package with its CUDA extension (zeromask._C_cuda) in place;
#   2. runs the compiled-Triton and CUDA tests (the same suites CI runs in Triton's CPU
#      interpreter, now on the device), the fault tests on every backend and the
#      torch.compile tests, stopping at the first failure;
#   3. runs the GPU benchmark suite;
#   4. writes everything under OUT (default benchmarks/results/gpu-check-<date>/): env.txt
#      (device, driver, versions, commit, date), build.log, tests.log, the benchmark's files.
# Any wrong result fails the script loudly (non-zero exit, the failing step named last).
# Environment: PYTHON (python3), OUT, BENCH_ARGS (extra benchmarks/bench.py arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-check-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
step() { echo "== $* ($(date +%T))"; CURRENT="$*"; }
trap 'echo "gpu_check: FAILED at: ${CURRENT:-setup} (see $OUT)" >&2' ERR

step "environment"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PYTHON" -c "import triton; print('triton', triton.__version__)" || echo "triton: missing"
} | tee "$OUT/env.txt"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: torch sees no CUDA device" >&2; exit 1; }

step "build (CPU and CUDA extensions, in place)"
"$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || {
  tail -n 40 "$OUT/build.log" >&2; exit 1; }
"$PYTHON" -c "import zeromask._C_cuda" || { echo "gpu_check: _C_cuda did not build" >&2; exit 1; }

step "tests on the device (first failure stops)"
# no TRITON_INTERPRET: Triton compiles for the GPU; ZEROMASK_POISON=1 comes from conftest
env -u TRITON_INTERPRET "$PYTHON" -m pytest -x -q -p no:cacheprovider \
  tests/test_triton.py tests/test_faults.py tests/test_compile.py tests/test_cuda_compile.py \
  tests/test_api.py 2>&1 | tee "$OUT/tests.log"
grep -q " passed" "$OUT/tests.log"

step "GPU benchmark suite"
"$PYTHON" benchmarks/bench.py --suite gpu --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log"

echo "gpu_check: all passed; results in $OUT"
