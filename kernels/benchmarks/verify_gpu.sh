#!/usr/bin/env bash
# One device call (about 9 minutes on one H200) that checks the GPU paths end to end: the GPU
# tests of the feedback custom ops and compiled Sessa (session4_gpu.sh's "tests" part) and of the
# Triton SSD, the fused CE and compiled m125 blocks (bench_baselines_gpu.sh's "tests" part), run
# side by side since they check correctness only; then recipes/m125 tokens/s at T=2048, one run
# at a time: compiled Sessa (with a kernel profile), the compiled gated Transformer, eager Sessa
# (session4_gpu.sh's "train" part), and compiled Mamba2 on the Triton SSD.
# From the repo root, with .whl/ filled by kernels/benchmarks/gpu_wheels.sh and carried along:
#   bash kernels/benchmarks/verify_gpu.sh [OUT_DIR]     (default $OUT; logs in OUT_DIR/verify.tgz)
set -u
OUT_DIR=${1:-${OUT:-/tmp/verify_out}}
T0=$(date +%s); W=/tmp/verify; mkdir -p "$W" "$OUT_DIR"
S=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$S" .whl/*.whl || exit 1
export PYTHONPATH=$S:$PWD:$PWD/kernels:$PWD/data_prep PYTHONUNBUFFERED=1
at() { echo "=== $1 at $(( $(date +%s) - T0 )) s"; }
at "packages installed"
( PARTS=tests TESTS_S=170 bash kernels/benchmarks/session4_gpu.sh "$W/s4t" >"$W/s4_tests.txt" 2>&1 ) &
( PARTS=tests TEST_S=170 RUNS=$W/blruns bash sessa_pt/train/bench_baselines_gpu.sh "$W/blt" \
    >"$W/bl_tests.txt" 2>&1 ) &
( python3 -m sessa_data.cli symbolsoup --out "$W/soup2048" --min-len 2040 --max-len 2048 \
    --seq-len 2048 --train 1024 --valid 4 --test 0 --workers 8 >"$W/soup.log" 2>&1 ) &
wait
at "tests done"; tail -25 "$W/s4_tests.txt"; tail -25 "$W/bl_tests.txt"
PARTS=train TRAIN_S=${TRAIN_S:-245} RUN_S=78 STEPS=10 bash kernels/benchmarks/session4_gpu.sh \
    "$W/s4" >"$W/s4_train.txt" 2>&1
at "Sessa / Transformer runs done"; tail -45 "$W/s4_train.txt"
n=m2_triton_mb16
timeout 85 torchrun --standalone --nproc_per_node 1 -m sessa_pt.train recipes/m125/mamba2.yaml \
    data.train="$W/soup2048/train/manifest.json" data.valid="$W/soup2048/valid/manifest.json" \
    data.seq_len=2048 data.num_workers=2 model.vocab_size=32768 train.steps=10 \
    train.micro_batch_size=16 train.global_batch_size=16 train.compile=true train.log_every=1 \
    optim.warmup_steps=2 eval.every=0 checkpoint.every=0 tracking.enabled=false \
    run.dir="$W/m2runs/$n" run.name=$n >"$W/$n.log" 2>&1
echo "$n exit $?"; grep -h "SSD path" "$W/$n.log" | head -1
python3 -m sessa_pt.train.bench --skip 4 "$W"/m2runs/* "$W"/s4/runs2048/* 2>&1 | tee "$W/all_2k.md"
at "done"
rm -rf "$W/soup2048" "$W"/s4/soup2048 "$W"/s4/runs2048/*/checkpoints "$W"/m2runs/*/checkpoints
find "$W" \( -name '*.pt' -o -name '*.safetensors' -o -name 'mlflow*' \) -prune -exec rm -rf {} +
tar czf "$OUT_DIR/verify.tgz" -C "$W" . && ls -la "$OUT_DIR"
