#!/usr/bin/env bash
# Every GPU check in one command (one device call, ~8 minutes at most):
#
#     bash bench/gpu.sh "$OUT"
#
# Runs the CUDA-selected tests and every benchmark, each under its own time limit so one failure
# or hang does not lose the rest, with the Triton interpreter off. The device tool brings back at
# most 8 files, so $OUT gets: summary.log (each step's exit code and seconds), the throughput
# JSON and markdown, and results.tar.gz (every result file and every step's full log).
# A Liger-Kernel wheel in .whl/ (carried) is installed first; without it Liger columns are empty.
set -u
OUT=${1:?usage: bench/gpu.sh OUT_DIR}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu-bench.XXXX)
mkdir -p "$OUT" "$WORK/results" "$WORK/logs"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

if ls .whl/liger_kernel*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/liger_kernel*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$WORK/logs/nvidia-smi.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    local rc=$?
    printf '%-16s rc=%-3s %4ss (limit %ss)\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" | tee -a "$OUT/summary.log"
    tail -n 25 "$WORK/logs/$name.log"
}

# Correctness first (tests/test_gpu.py: Triton vs torch training steps at real shapes, CUDA graphs),
# then whole-model training and evaluation, ours vs transformers (writes after each model).
step tests 110 $PY -m pytest -q tests/test_gpu.py -p no:cacheprovider
step throughput 200 $PY bench/throughput.py --out "$WORK/results" --time-budget 150
step generate 50 $PY bench/bench_generate.py --models qwen2-0.5b bloom-560m --prompts 256   # writes bench/results/generate-*
step attention 50 $PY bench/bench_attention.py --out "$WORK/results"
step loss_optim 45 $PY bench/bench_loss_optim.py --quick --out "$WORK/results"
step kernels 45 $PY bench/bench_kernels.py --quick --out "$WORK/results"

cp bench/results/generate-* "$WORK/results/" 2>/dev/null
cp "$WORK"/results/throughput-*[^l].json "$WORK"/results/throughput-*.md "$OUT"/ 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$WORK" results logs
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
