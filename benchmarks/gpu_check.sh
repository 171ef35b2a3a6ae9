#!/usr/bin/env bash
# One short check of fastft on a bare GPU machine (torch, transformers, triton, peft and nvcc
# preinstalled, no internet, this repository copied in). Stages, each timed:
#   1. install fastft in place without touching torch (pip --no-build-isolation --no-deps -e .),
#      building the CUDA extension for the GPU found here (FASTFT_CUDA_ARCHS from its capability)
#   2. `fastft env`: versions, built backends, which path each op takes on CPU and CUDA
#   3. the GPU test subset (tests/test_ops_devices.py etc.: real Triton and CUDA kernels)
#   4. `fastft bench --device cuda` LoRA and full fine-tuning on a random-init Llama-3.2-1B config
#   5. a one-page report (benchmarks/gpu_check_report.py): REPORT_DIR/REPORT.md
# Designed to finish in 8 minutes on one H100 (GPU_CHECK_BUDGET_S, default 470 s): a stage that
# would start with too little time left is skipped and the report says so.
#
# Usage: bash benchmarks/gpu_check.sh [REPORT_DIR]        (default gpu_check_report/)
# Environment: GPU_CHECK_BUDGET_S, GPU_CHECK_TESTS (test files, space-separated),
#   GPU_CHECK_BENCH_ARGS (default "--workload text --batch 8 --seq 1024 --steps 3 --warmup 2 --rounds 1"),
#   GPU_CHECK_MODEL_CONFIG (default benchmarks/configs/llama-3.2-1b.json), FASTFT_CUDA_ARCHS
#   (default: the GPU's own), GPU_CHECK_SKIP_INSTALL=1 (use the fastft already installed).
set -u -o pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  -*) die "unknown option $1 (usage: bash benchmarks/gpu_check.sh [REPORT_DIR])" ;;
esac
[ $# -le 1 ] || die "expected at most one argument, REPORT_DIR; got $# ($*)"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPORT="${1:-gpu_check_report}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
# the device-generic tests (the other test files exercise CPU paths only)
TESTS="${GPU_CHECK_TESTS:-tests/test_ops_devices.py tests/test_backend_choice.py}"
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:---workload text --batch 8 --seq 1024 --steps 3 --warmup 2 --rounds 1}"
MODEL_CONFIG="${GPU_CHECK_MODEL_CONFIG:-$ROOT/benchmarks/configs/llama-3.2-1b.json}"
PY="${PYTHON:-python}"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "GPU_CHECK_BUDGET_S=$BUDGET: expected a whole number of seconds"
[ -f "$MODEL_CONFIG" ] || die "model config $MODEL_CONFIG not found"

# Fail in a second, before anything expensive, when there is no GPU to check.
GPU_LINE="$("$PY" -c 'import torch
if not torch.cuda.is_available(): raise SystemExit(1)
p = torch.cuda.get_device_properties(0); c = torch.cuda.get_device_capability(0)
print(f"{p.name}|{c[0]}{c[1]}|{p.total_memory >> 20}|{torch.__version__}|{torch.version.cuda}")' 2>/dev/null)" \
  || die "no CUDA GPU visible to torch ($PY); run this on a GPU machine"
IFS='|' read -r GPU_NAME GPU_CC GPU_MEM_MB TORCH_VER TORCH_CUDA <<< "$GPU_LINE"
export FASTFT_CUDA_ARCHS="${FASTFT_CUDA_ARCHS:-$GPU_CC}"

mkdir -p "$REPORT/logs" || die "cannot create $REPORT"
REPORT="$(cd "$REPORT" && pwd)"
STAGES="$REPORT/stages.tsv"
printf 'stage\tstatus\tseconds\tdetail\n' > "$STAGES"
printf '{"gpu": "%s", "capability": "%s", "memory_mb": %s, "torch": "%s", "torch_cuda": "%s", "archs": "%s", "budget_s": %s}\n' \
  "$GPU_NAME" "$GPU_CC" "$GPU_MEM_MB" "$TORCH_VER" "$TORCH_CUDA" "$FASTFT_CUDA_ARCHS" "$BUDGET" > "$REPORT/machine.json"
nvidia-smi > "$REPORT/logs/nvidia-smi.txt" 2>&1 || true
echo "gpu_check: $GPU_NAME (sm_$GPU_CC, $GPU_MEM_MB MiB), torch $TORCH_VER (CUDA $TORCH_CUDA); report in $REPORT"

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

# stage NAME MAX_SECONDS CMD...: runs CMD with a timeout of min(MAX, budget left), logs it, times it.
stage() {
  local name="$1" max="$2"; shift 2
  local left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped\t0\tout of time (%ss of %ss used)\n' "$name" "$(elapsed)" "$BUDGET" >> "$STAGES"
    echo "[$(elapsed)s] $name: SKIPPED (out of time)"
    return 0
  fi
  local limit=$(( max < left ? max : left ))
  local s=$(date +%s)
  echo "[$(elapsed)s] $name: start (limit ${limit}s)"
  ( cd "$ROOT" && timeout "$limit" "$@" ) > "$REPORT/logs/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - s )) status=ok
  [ $rc -eq 0 ] || status="failed"
  [ $rc -eq 124 ] && status="timeout"
  printf '%s\t%s\t%s\trc=%s\n' "$name" "$status" "$dt" "$rc" >> "$STAGES"
  echo "[$(elapsed)s] $name: $status in ${dt}s (log: logs/$name.log)"
  [ $rc -eq 0 ] || tail -n 5 "$REPORT/logs/$name.log" | sed 's/^/    /'
  return 0
}

# 1. install (builds fastft._C and fastft._C_cuda in place; torch untouched)
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = "1" ]; then
  printf 'install\tskipped\t0\tGPU_CHECK_SKIP_INSTALL=1\n' >> "$STAGES"
else
  stage install 240 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
stage env 60 "$PY" -c 'import json, fastft._backend as b; d = b.describe(); print(json.dumps(d, indent=1, default=str))'
cp "$REPORT/logs/env.log" "$REPORT/env.json" 2>/dev/null || true

# 3. the GPU test subset, one pytest run per file (pass/fail per file in the report)
for t in $TESTS; do
  n="test-$(basename "$t" .py)"
  stage "$n" 150 "$PY" -m pytest "$t" -q -p no:cacheprovider -x --junitxml="$REPORT/junit-$(basename "$t" .py).xml"
done

# 4. fastft vs HF on the same GPU, random-init Llama-3.2-1B shapes, bf16
for mode in lora full; do
  # shellcheck disable=SC2086
  stage "bench-$mode" 200 "$PY" -m fastft.cli bench --device cuda --model-config "$MODEL_CONFIG" --mode "$mode" \
    $BENCH_ARGS --out "$REPORT/bench-$mode" --history "$REPORT/bench_history.csv"
done

# 5. the report (always, from whatever the stages left)
"$PY" "$ROOT/benchmarks/gpu_check_report.py" "$REPORT" --total-seconds "$(elapsed)" \
  || die "report generation failed"
echo "[$(elapsed)s] done: $REPORT/REPORT.md"
cat "$REPORT/REPORT.md"
