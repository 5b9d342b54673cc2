#!/usr/bin/env bash
# ONE script for an H100 / H200 machine (no network; torch+CUDA, triton, nvcc, compute-sanitizer present) that
# checks the GPU side of splitzip-vllm in < 8 minutes. Every step is timed, its output goes to the log, a failure
# is recorded and the script goes on; the exit status is non-zero if any step failed.
#
#   scripts/gpu_check.sh                 # writes $OUT/gpu_check.log, $OUT/summary.json, bench JSON
#   OUT=/tmp/x PY=python3 scripts/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh   # print the steps without running them (no GPU needed)
#
# Steps: build the extension; CUDA tests (tests/test_codec_cuda.py, the GPU cases of the tag / error / cross
# backend tests, tests/test_connector_flow_gpu.py when present); compute-sanitizer memcheck + racecheck on small
# sizes; look-back stress (repeated 256 MiB encodes, identical bytes, under a timeout); multi-region CUDA-graph
# capture + replay; GPU codec benchmark (cuda vs triton vs device memcpy at 2 MiB and 256 MiB) and the
# one-launch batched encode of 32 x 2 MiB layers.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-$ROOT/out/gpu_check}"
if [ -z "${PY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
DRY="${GPU_CHECK_DRY_RUN:-0}"
SANITIZER="${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
STEPS_JSON="$OUT/steps.jsonl"
: > "$STEPS_JSON"
FAILED=0
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"  # the whole script stays under 8 minutes: later steps get what is left
START_S=$(date +%s)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S COMMAND...: run COMMAND with a timeout, record status and seconds
step() {
  local name="$1" limit="$2"
  shift 2
  log "=== $name (limit ${limit}s): $*"
  if [ "$DRY" = "1" ]; then
    echo "{\"step\": \"$name\", \"status\": \"dry-run\", \"seconds\": 0}" >> "$STEPS_JSON"
    return 0
  fi
  local left=$((BUDGET_S - ($(date +%s) - START_S)))
  if [ "$left" -lt 15 ]; then
    log "--- $name: skipped, the ${BUDGET_S}s budget is spent"
    FAILED=$((FAILED + 1))
    echo "{\"step\": \"$name\", \"status\": \"no-time\"}" >> "$STEPS_JSON"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 rc t1
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  local status=ok
  if [ "$rc" -ne 0 ]; then
    status=failed
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
    FAILED=$((FAILED + 1))
  fi
  log "--- $name: $status (rc=$rc, ${secs}s)"
  echo "{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $secs}" >> "$STEPS_JSON"
}

log "repo $ROOT, python $PY, out $OUT"
if [ "$DRY" != "1" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" >> "$LOG" 2>&1
fi

# 1. build (pinned to sm_80 + sm_90 by setup.py; SPLITZIP_BUILD_CUDA=1 makes a missing CUDA build an error)
step build 300 env SPLITZIP_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .

# 2. CUDA tests (the test modules skip themselves without a GPU or extension: make that a failure here)
step cuda-available 60 "$PY" -c "import torch; from splitzip_vllm.codec.backends.cuda_backend import CudaBackend as B, \
_IMPORT_ERROR as E; assert torch.cuda.is_available(), 'no CUDA device'; assert B.is_available(), f'_C_cuda: {E}'"

GPU_TESTS=(tests/test_codec_cuda.py)
for t in tests/test_codec_transfer_tag.py tests/test_codec_errors.py tests/test_codec_cross_backend.py; do
  [ -f "$t" ] && GPU_TESTS+=("$t")
done
step cuda-tests 180 "$PY" -m pytest -q -x -rs -p no:cacheprovider "${GPU_TESTS[@]}" -k "cuda"
if [ -f tests/test_connector_flow_gpu.py ]; then
  step connector-flow-gpu 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_connector_flow_gpu.py
else
  log "tests/test_connector_flow_gpu.py not present: step skipped"
fi

# 3. compute-sanitizer on small sizes
if [ -x "$SANITIZER" ] || [ "$DRY" = "1" ]; then
  step memcheck 120 "$SANITIZER" --tool memcheck --error-exitcode 3 --leak-check no \
    "$PY" scripts/gpu_check_driver.py sanitize
  step racecheck 150 "$SANITIZER" --tool racecheck --error-exitcode 3 --racecheck-report hazard \
    "$PY" scripts/gpu_check_driver.py sanitize
else
  log "compute-sanitizer not found ($SANITIZER): sanitizer steps FAILED"
  FAILED=$((FAILED + 1))
  echo '{"step": "sanitizer", "status": "missing"}' >> "$STEPS_JSON"
fi

# 4. look-back stress: 20 x 256 MiB encodes, identical bytes, no hang (the timeout is the hang detector)
step lookback-stress 90 "$PY" scripts/gpu_check_driver.py stress --mib 256 --reps 20

# 5. multi-region graph capture + replay (device region tables)
step graph-replay 60 "$PY" scripts/gpu_check_driver.py graph

# 6. benchmarks: cuda vs triton vs device memcpy (2 MiB per-layer and 256 MiB), batched per-layer encode
step codec-bench 180 "$PY" benchmarks/gpu_codec_bench.py --sizes-mib 256 2 --iters 10 --warmup 3 \
  --json "$OUT/gpu_codec_bench.json"
step batch-bench 60 "$PY" scripts/gpu_check_driver.py batch --layers 32 --layer-mib 2 --json "$OUT/batch_bench.json"

# summary
"$PY" - "$STEPS_JSON" "$OUT/summary.json" "$FAILED" <<'EOF' 2>> "$LOG" || true
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
json.dump({"failed": int(sys.argv[3]), "steps": steps}, open(sys.argv[2], "w"), indent=1)
EOF
log "done: $FAILED step(s) failed; summary $OUT/summary.json, log $LOG"
[ "$FAILED" -eq 0 ]
