#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): install, the CUDA tests, the GPU
# attention benchmark at N = 4096 (the issue targets' row), its report, and the
# forward + backward benchmark, each stage capped so the whole run ends by DEADLINE
# seconds. Everything lands in $OUT (at most 8 files come back):
#   log.txt, env.txt, tests_cuda.xml, attention_cuda.json/.md/.png, attention_backward_cuda.json
# (that one written by the benchmark itself, forward untuned)
# Run from the repository root: bash benchmarks/device_run.sh [DEADLINE_SECONDS]
set -u
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
DEADLINE=$(( SECONDS + ${1:-500} ))
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=$(nproc)
exec > >(tee -a "$OUT/log.txt") 2>&1

stage() {  # stage NAME CAP_SECONDS CMD...: run CMD under min(CAP, time left)
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - SECONDS ))
  (( left < cap )) && cap=$left
  if (( cap < 10 )); then echo "=== $name: skipped (no time left)"; return 1; fi
  echo "=== $name (cap ${cap} s) at ${SECONDS} s"
  timeout "$cap" "$@"
  local rc=$?
  echo "=== $name: rc $rc at ${SECONDS} s"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nproc; lscpu | grep 'Model name'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage install 180 $PY -m pip install --no-build-isolation --no-deps -q -e . || exit 1
stage tests 170 env FTATTN_AUTOTUNE=0 $PY -m pytest -q -n 16 -p no:cacheprovider --tb=short -rfE \
  --junitxml="$OUT/tests_cuda.xml" \
  tests/test_attention_triton.py tests/test_attention_backward_triton.py tests/test_linear_triton.py \
  tests/mx/test_mx_triton.py tests/test_attention_hard_data.py tests/test_backends.py
stage warm 150 $PY benchmarks/warm_triton_cache.py --seq 4096 --workers "$(nproc)"
stage bench 200 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_attention.py --benchmark-only \
  --bench-device=cuda -k "cuda and (N4096 or M4096)" --benchmark-json="$OUT/attention_cuda.json" \
  --benchmark-columns=median,rounds
stage report 30 env PYTHONSAFEPATH=1 $PY -m ftattn bench-report "$OUT/attention_cuda.json" --out "$OUT/"
# untuned forward here: its N = 2048 keys are not warmed (FTATTN_AUTOTUNE=0, recorded in the log)
stage backward 90 env FTATTN_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_attention_backward.py \
  --benchmark-only --bench-device=cuda --benchmark-columns=median,rounds
cp benchmarks/results/attention_backward_cuda.json "$OUT/" 2>/dev/null
echo "=== done at ${SECONDS} s"; ls -la "$OUT"
