#!/usr/bin/env bash
# Every GPU check in one command, most valuable first, sized for one device call (<= 9 minutes
# with a cold Triton cache: the step limits below sum to at most 540 s, tests/test_bench_dry_run.py
# checks it):
#
#     bash bench/gpu.sh "$OUT"              # on the GPU machine (python3, its own torch/triton)
#     bash bench/gpu.sh --dry-run OUT       # on a CPU: every step at tiny sizes (CI runs it)
#
# Each step runs under its own `timeout`, so a failure or a hang loses only that step, and every
# step's numbers are packed into $OUT before the next starts (and every 15 s while it runs: the
# throughput bench writes each model's parts, a partial row, the moment they are measured). The timeout sends SIGINT first (10 s
# before SIGKILL): pytest then stops like a Ctrl-C and still prints its short summary (-rfE
# --tb=short), a Python benchmark gets KeyboardInterrupt and its traceback says where it was.
# The first three steps (tests, qwen2-0.5b training ours vs transformers [vs Liger], generation)
# fit in the first 300 s. The device tool brings back at most
# 8 files: $OUT gets summary.log (each step's exit code and seconds), results.tar.gz (every result
# file and every step's full log, rewritten after each step) and a copy of each step's markdown
# plus the throughput JSON. A Liger-Kernel wheel in .whl/ (carried) is installed first; without
# it the Liger columns are empty. Nothing is downloaded: the models are the registry's shapes
# with random weights.
#
# --dry-run: CPU only (CUDA hidden), the Triton interpreter, tests/test_gpu.py at the tiny
# presets (GPU_TESTS_ON_CPU=1) and every script with --dry-run, limits x3: an import, path or
# argument error shows here instead of on a lease. It measures nothing.
set -u
DRY=
if [ "${1:-}" = "--dry-run" ]; then DRY=--dry-run; shift; fi
OUT=${1:?usage: bash bench/gpu.sh [--dry-run] OUT_DIR}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench.XXXX")
RESULTS=$WORK/results
mkdir -p "$RESULTS" "$WORK/logs"
: > "$OUT/summary.log"
export PYTHONUNBUFFERED=1
if [ -n "$DRY" ]; then
    export TRITON_INTERPRET=1 GPU_TESTS_ON_CPU=1 CUDA_VISIBLE_DEVICES=
    TRAIN_MODELS="tiny-qwen2"
    SLOWER=3                                  # a loaded CPU under the interpreter: limits x3, still catching hangs
    EVAL_MODELS="tiny-qwen2"
else
    export TRITON_INTERPRET=0
    SLOWER=1
    TRAIN_MODELS="qwen2-0.5b qwen2-1.5b"
    EVAL_MODELS="qwen2-0.5b bloom-560m"
    if ls .whl/liger_kernel*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/liger_kernel*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$WORK/logs/nvidia-smi.txt" 2>&1
fi

pack() {  # every result and log so far, and each markdown table, into $OUT
    cp "$RESULTS"/*.md "$OUT"/ 2>/dev/null
    cp "$RESULTS"/throughput-*[^l].json "$OUT"/ 2>/dev/null
    tar -czf "$OUT/results.tar.gz" -C "$WORK" results logs
}

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    # packed every 15 s while it runs too: the rows and parts a benchmark writes as it measures them
    # reach $OUT even if the whole call is cut before the step ends. The packer stops between two packs
    # (the stop file), so no pack of it writes $OUT while the step's own final pack does.
    rm -f "$WORK/stop"
    ( n=0; while [ ! -e "$WORK/stop" ]; do sleep 1; n=$((n + 1)); [ $((n % 15)) -eq 0 ] && pack; done ) \
        > /dev/null 2>&1 &
    local packer=$!
    timeout -s INT --kill-after=10 "$((limit * SLOWER))" "$@" > "$WORK/logs/$name.log" 2>&1
    local rc=$?
    touch "$WORK/stop"
    wait "$packer"
    printf '%-12s rc=%-3s %4ss (limit %ss)\n' "$name" "$rc" "$((SECONDS - t0))" "$((limit * SLOWER))" | tee -a "$OUT/summary.log"
    tail -n 25 "$WORK/logs/$name.log"
    pack
}

# 1. Correctness: Triton vs torch gradients and losses at the real layer shapes, CUDA graphs.
step tests 110 $PY -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_gpu.py
# 2. Training throughput (and its evaluation), ours vs transformers (vs Liger when carried);
#    results are rewritten after each model, later models are skipped past --time-budget.
step train 130 $PY bench/throughput.py $DRY --models $TRAIN_MODELS --time-budget 100 --out "$RESULTS"
# 3. Evaluation throughput: greedy generation, three workloads, ours vs transformers' generate.
step generate 60 $PY bench/bench_generate.py $DRY --models $EVAL_MODELS --prompts 256 --out "$RESULTS"
# 4. The kernels: attention (training and decode), fused loss and AdamW, row and elementwise ops.
step attention 60 $PY bench/bench_attention.py $DRY --out "$RESULTS"
step loss_optim 60 $PY bench/bench_loss_optim.py $DRY --quick --out "$RESULTS"
step kernels 60 $PY bench/bench_kernels.py $DRY --quick --out "$RESULTS"

echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
! grep -qv ' rc=0 ' "$OUT/summary.log"     # exit 1 when any step failed
