#!/usr/bin/env bash
# One device call for the panel variant of the solves (model.sessa.solve=panel): its GPU tests, then
# the feedback-branch sweep (queue vs panel) and the layer benchmark (attention, triton,
# triton_panel) at T = 2048, 8192, 32768. ~3 minutes on one H200. From the repo root:
#   OUT=/tmp/out bash kernels/benchmarks/panel_run.sh
export PYTHONPATH=$PWD:$PWD/kernels PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee "$OUT/gpu.txt"
timeout ${TEST_S:-150} python3 -m pytest -q -s -p no:cacheprovider -k panel \
    kernels/tests/test_triton_panel_interpret.py kernels/tests/test_triton_gpu.py \
    2>&1 | tee "$OUT/panel_tests.log" | grep -vE "^(PASSED|\.)" | tail -40
timeout ${SWEEP_S:-75} python3 kernels/benchmarks/sweep_feedback.py --seq 2048,8192,32768 \
    2>&1 | tee "$OUT/panel_sweep.log"
timeout ${BENCH_S:-120} python3 kernels/benchmarks/bench_sessa_layer.py --seq 2048,8192,32768 \
    --impls attention,triton,triton_panel --decode '' --json "$OUT/panel_bench.json" \
    2>&1 | tee "$OUT/panel_bench.log" | grep -v '^{'
