#!/usr/bin/env bash
# One device call: GPU correctness first, then the feedback sweep, then the layer benchmark.
# Usage on the GPU machine, from the repo root: bash kernels/benchmarks/device_run.sh [bench args]
export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee "$OUT/gpu.txt"
timeout ${TEST_S:-240} python3 -m pytest -m gpu -q -s -p no:cacheprovider kernels/tests \
    2>&1 | tee "$OUT/tests.log" | grep -vE "^(PASSED|\.)" | tail -40
[ -n "$SWEEP" ] && timeout ${SWEEP_S:-120} python3 kernels/benchmarks/sweep_feedback.py 2>&1 | tee "$OUT/sweep.log"
timeout ${BENCH_S:-300} python3 kernels/benchmarks/bench_sessa_layer.py --json "$OUT/bench.json" "$@" \
    2>&1 | tee "$OUT/bench.log" | grep -v '^{'
