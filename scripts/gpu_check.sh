#!/usr/bin/env bash
# The GPU check (issue #19): one script, under 8 minutes on one modern NVIDIA GPU. Each step has its own time
# limit, a failed step does not stop the others, and every step's status goes into the results file.
#
#   bash scripts/gpu_check.sh                    # set up (scripts/gpu_env.sh install), then every step
#   bash scripts/gpu_check.sh --no-setup         # an environment that already has everything (PYTHON, or python)
#   bash scripts/gpu_check.sh --smoke --no-setup # CI on the CPU: the CUDA tests (they skip), a tiny benchmark
#
# Results: $OUT/gpu_check.md (when OUT is set) else gpu_check_results/gpu_check.md, the whole log beside it
# (gpu_check.log), and gpu_profile.txt (the profile of the rows behind a missed target). Exit status 1 when a
# step failed or ran out of time.
# Steps (limit in seconds): setup 90, nvidia-smi 20, versions 40, cuda-tests 200, benchmark 200.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
SETUP=1
for arg in "$@"; do
    case "$arg" in
    --smoke) SMOKE=1 ;;
    --no-setup) SETUP=0 ;;
    -h | --help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
    esac
done
RESULTS="${OUT:-$ROOT/gpu_check_results}"
mkdir -p "$RESULTS"
REPORT="$RESULTS/gpu_check.md"
LOG="$RESULTS/gpu_check.log"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$LOG"
if [ "$SETUP" = 1 ]; then PY="${PYTHON:-python3}"; else PY="${PYTHON:-python}"; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT:$ROOT/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
ROWS=()

# step NAME LIMIT COMMAND...: runs COMMAND with its own time limit; output to the log and $WORK/NAME.out
step() {
    local name=$1 limit=$2 t0 rc status detail
    shift 2
    t0=$(date +%s)
    echo "===== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" >"$WORK/$name.out" 2>&1
    rc=$?
    cat "$WORK/$name.out" >>"$LOG"
    case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    detail=$(grep -v '^\s*$' "$WORK/$name.out" | tail -1 | tr '|' '/' | cut -c1-160)
    ROWS+=("| $name | $status | $(($(date +%s) - t0)) | $detail |")
    echo "----- $name: $status" | tee -a "$LOG"
}

skip() {  # skip NAME WHY
    ROWS+=("| $1 | skipped | 0 | $2 |")
    echo "----- $1: skipped ($2)" | tee -a "$LOG"
}

if [ "$SETUP" = 1 ]; then
    step setup 90 bash scripts/gpu_env.sh install "$PY"
else
    skip setup "--no-setup: $PY as it is"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    step nvidia-smi 20 nvidia-smi
else
    skip nvidia-smi "no nvidia-smi on this machine"
fi

step versions 40 "$PY" -c '
import importlib.metadata as m
import platform

import torch

for n in ("torch", "transformers", "lightning", "peft", "bitsandbytes"):
    try:
        print(f"{n} {m.version(n)}")
    except m.PackageNotFoundError:
        print(f"{n} not installed")
print(f"python {platform.python_version()}, torch CUDA build {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {torch.cuda.get_device_name()}: {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs; bf16 supported: {torch.cuda.is_bf16_supported()}")
else:
    print("CUDA: not available")
'

step cuda-tests 200 "$PY" -m pytest -m cuda tests/test_cuda.py tests/test_matrix.py -q -rA -s -p no:cacheprovider

if [ "$SMOKE" = 1 ]; then
    BENCH=(--smoke --device cpu)
else
    BENCH=(--device cuda)
fi
step benchmark 200 "$PY" benchmarks/gpu_speed.py "${BENCH[@]}" --out "$WORK/bench.md" \
    --profile-out "$RESULTS/gpu_profile.txt"

{
    echo "# GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(uname -n)," \
        "mode: $([ "$SMOKE" = 1 ] && echo smoke || echo full), $(($(date +%s) - START)) s in all"
    echo
    echo "| step | status | seconds | last line |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "## Versions and device"
    echo
    echo '```'
    cat "$WORK/versions.out" 2>/dev/null
    grep -E "Driver Version|H100|H200|A100|NVIDIA" "$WORK/nvidia-smi.out" 2>/dev/null | head -4
    echo '```'
    echo
    echo "## CUDA tests (pytest -m cuda)"
    echo
    echo '```'
    # each test's outcome (-rA), the figures the tests print (-s; they may follow pytest's progress dots) and the
    # summary line
    grep -E "^(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)|mixed batch on |nf4 on |bf16-(mixed|true): max|FSDP\(1 GPU\)|(passed|failed|skipped|error).* in [0-9.]+s" \
        "$WORK/cuda-tests.out" 2>/dev/null | cut -c1-220 | tail -80
    echo '```'
    echo
    echo "## Speed and memory (benchmarks/gpu_speed.py)"
    echo
    cat "$WORK/bench.md" 2>/dev/null || echo "no table: see the benchmark step's status and gpu_check.log"
} >"$REPORT"
echo "results: $REPORT" | tee -a "$LOG"
cat "$REPORT"
# exit 1 when a step failed or ran out of time (the report is written either way)
! printf '%s\n' "${ROWS[@]}" | grep -qE '\| (FAILED|TIMEOUT)'
