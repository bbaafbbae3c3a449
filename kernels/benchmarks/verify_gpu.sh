#!/usr/bin/env bash
# One device call (about 8 minutes on one H200) that checks the GPU paths end to end and times
# recipes/m125 at T=2048. First, side by side (they check correctness only): the GPU tests of the
# feedback custom ops and compiled Sessa (session4_gpu.sh's "tests" part), the bf16 trainer tests
# (eager / compiled / compiled + activation checkpointing: its "tests_train" part) and the tests
# of the Triton SSD, the fused CE and the compiled m125 blocks (bench_baselines_gpu.sh's "tests"),
# and torch.compile of one block of every recipe (its "compile_all").
# Then one run at a time (session4_gpu.sh's "train" part): compiled Sessa at micro batch 32 and
# 16, the compiled gated Transformer, compiled Mamba2 on the Triton SSD, with kernel profiles of
# Sessa and Mamba2 (summarised by python -m sessa_pt.train.profile_summary).
# From the repo root, with .whl/ filled by kernels/benchmarks/gpu_wheels.sh and carried along:
#   bash kernels/benchmarks/verify_gpu.sh [OUT_DIR]     (default $OUT; logs in OUT_DIR/verify.tgz)
# TRAIN_ONLY (run names of session4_gpu.sh) replaces the four training runs; TESTS_K the -k
# filter of the feedback-op tests.
# The layer table (compiled attention, panel solve with 64- and 128-row chunks, T = 2048 to
# 32768) and the long-context rows are a second call (~9 minutes):
#   PARTS="layers train_long" ONLY="sessa_c_mb1 tf_c_mb1 m2_c_mb1" TRAIN_S=250 \
#       bash kernels/benchmarks/session4_gpu.sh OUT_DIR
set -u
OUT_DIR=${1:-${OUT:-/tmp/verify_out}}
T0=$(date +%s); W=/tmp/verify; mkdir -p "$W" "$OUT_DIR"
if [ "${WHEELS:-1}" != 0 ]; then     # WHEELS=0: the packages are installed already
    S=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$S" .whl/*.whl || exit 1
    export PYTHONPATH=$S:$PWD:$PWD/kernels:$PWD/data_prep
else
    export PYTHONPATH=$PWD:$PWD/kernels:$PWD/data_prep${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 WHEELS=0     # the parts below use this install
at() { echo "=== $1 at $(( $(date +%s) - T0 )) s"; }
B=kernels/benchmarks
at "packages installed"
# the feedback-op tests hit 220 s in run 7 with the four groups sharing the GPU: 280 s
( PARTS=tests TESTS_S=${TESTS_S:-280} bash $B/session4_gpu.sh "$W/s4t" >"$W/s4_tests.txt" 2>&1 ) &
( PARTS=tests_train TESTS_TRAIN_S=200 bash $B/session4_gpu.sh "$W/s4tt" >"$W/s4_tests_train.txt" 2>&1 ) &
( PARTS=tests TEST_S=200 RUNS=$W/blruns bash sessa_pt/train/bench_baselines_gpu.sh "$W/blt" \
    >"$W/bl_tests.txt" 2>&1 ) &
( PARTS=compile_all TEST_S=210 RUNS=$W/blruns2 bash sessa_pt/train/bench_baselines_gpu.sh \
    "$W/blc" >"$W/bl_compile_all.txt" 2>&1 ) &
wait
at "tests done"
grep -hE "passed|failed|FAILED|ERROR|TIME LIMIT" "$W/s4t/tests.log" "$W/s4tt/tests_train.log" \
    "$W/blt/tests.log" "$W/blc/compile_all.log" | tail -24
PARTS=train TRAIN_S=${TRAIN_S:-280} RUN_S=${RUN_S:-75} STEPS=10 \
    ONLY="${TRAIN_ONLY:-sessa_c_mb32 tf_c_mb32 m2_c_mb16 sessa_c_mb16}" \
    bash $B/session4_gpu.sh "$W/s4" >"$W/s4_train.txt" 2>&1
at "training runs done"
cat "$W/s4/train2048.md" 2>/dev/null
for f in "$W"/s4/profile_*_mb*.txt; do
    case $f in *gemms*) continue ;; esac
    [ -f "$f" ] && { echo "--- $f"; python3 -m sessa_pt.train.profile_summary "$f"; }
done
at "done"
rm -rf "$W"/s4/soup2048 "$W"/s4/runs2048/*/checkpoints "$W"/blruns "$W"/blruns2
find "$W" \( -name '*.pt' -o -name '*.safetensors' -o -name 'mlflow*' \) -prune -exec rm -rf {} +
tar czf "$OUT_DIR/verify.tgz" -C "$W" . && ls -la "$OUT_DIR"
