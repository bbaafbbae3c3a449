#!/usr/bin/env bash
# The baselines at their best, on one H200: the Mamba2 / loss / RoPE GPU tests, then tokens/s of
# recipes/m125 side by side (Mamba2 on each available SSD path vs the compiled gated Transformer,
# at T=2048 and T=16384), and the MFU of the attention + SwiGLU Transformer (the 110M setting of
# BENCHMARKS.md and recipes/m125/transformer_mlp) at T=2048. Prints the tables last.
#
#   bash sessa_pt/train/bench_baselines_gpu.sh OUT_DIR [DATA_2048 [DATA_16384]]
#
# Run from the repository root with the packages importable (on the device machine: the project
# wheels installed, PYTHONPATH=<repo>:<repo>/kernels:<repo>/data_prep). DATA_* hold train/ and valid/ shards at
# that seq_len (vocabulary <= 32768); without them SymbolSoup shards are generated here in
# seconds (throughput does not depend on which tokens are read).
# PARTS picks parts (default tests,t2k,t16k,mfu). Rough durations on one H200: tests ~2 min,
# t2k ~4 min, t16k ~2.5 min, mfu ~3 min; a device call is limited to 10 minutes, so run e.g.
# PARTS=tests,t2k and then PARTS=t16k,mfu. Each run has its own time limit (RUN_S), so a hang
# loses one row. PARTS=compile_all compiles one block of every recipe (tests/gpu, ~24 cases).
# M2_TORCH=1 adds the plain-PyTorch SSD row at T=2048 (the slow reference, for comparison).
set -u
OUT=${1:-/tmp/baselines}; D2K=${2:-}; D16K=${3:-}
RUNS=${RUNS:-/tmp/baseline_runs}; PARTS=${PARTS:-tests,t2k,t16k,mfu}
: "${RUN_S:=110}" "${TEST_S:=240}" "${STEPS:=10}" "${SKIP:=4}"
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export MLFLOW_ALLOW_FILE_STORE=true MLFLOW_DISABLE_TELEMETRY=true
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
: >"$OUT/status.txt"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)
from sessa_pt.models.mamba2 import resolve_ssd_impl
print('mamba2 impl=auto runs', resolve_ssd_impl('auto', 'cuda'))" | tee -a "$OUT/gpu.txt"

soup() {  # soup SEQ_LEN N_TRAIN: SymbolSoup shards under $RUNS/soupSEQ_LEN (made once)
  local dir=$RUNS/soup$1
  [ -f "$dir/train/manifest.json" ] || python3 -m sessa_data.cli symbolsoup --out "$dir" \
    --min-len $(( $1 * 15 / 16 )) --max-len "$1" --seq-len "$1" --train "$2" --valid 4 \
    --test 0 --workers 4 >"$OUT/soup$1.log" 2>&1
  echo "$dir"
}

train() {  # train NAME DATA_DIR SEQ_LEN MICRO RECIPE overrides...: one run under its time limit
  local name=$1 data=$2 T=$3 mb=$4 recipe=$5; shift 5
  echo "--- $name: $recipe T=$T micro batch $mb $* (at $(( $(date +%s) - T0 )) s)"
  timeout --kill-after=10 "$RUN_S" torchrun --standalone --nproc_per_node 1 -m sessa_pt.train \
    "$recipe" data.train="$data/train/manifest.json" data.valid="$data/valid/manifest.json" \
    data.seq_len="$T" data.num_workers=2 model.vocab_size=32768 train.steps="$STEPS" \
    train.micro_batch_size="$mb" train.global_batch_size="$mb" train.compile=true \
    train.log_every=1 optim.warmup_steps=2 eval.every=0 checkpoint.every=0 \
    tracking.enabled=false "$@" run.dir="$RUNS/$name" run.name="$name" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc" >>"$OUT/status.txt"
  grep -h "mamba2 SSD path" "$OUT/$name.log" | head -1
  [ $rc = 0 ] || { echo "$name FAILED (exit $rc)"; grep -v '^{' "$OUT/$name.log" | tail -12; }
}

table() {  # table TITLE RUN...: the throughput table of the runs that logged steps
  local title=$1; shift
  local have=()
  for r in "$@"; do [ -s "$RUNS/$r/train_log.jsonl" ] && have+=("$RUNS/$r"); done
  [ ${#have[@]} -gt 0 ] || { echo "($title: no run logged a step)"; return; }
  echo; echo "## $title"
  python3 -m sessa_pt.train.bench --skip "$SKIP" "${have[@]}" | tee -a "$OUT/tables.md"
}

ratio() {  # ratio A B: tokens/s of run A over run B
  python3 - "$RUNS/$1" "$RUNS/$2" <<'EOF' | tee -a "$OUT/tables.md"
import pathlib, sys
from sessa_pt.train.bench import summarise
a, b = (pathlib.Path(p) for p in sys.argv[1:])
if (a / "train_log.jsonl").exists() and (b / "train_log.jsonl").exists():
    ra, rb = summarise(a, 4), summarise(b, 4)
    print(f"{a.name} / {b.name}: {ra['tokens/s'] / rb['tokens/s']:.2f}x tokens/s")
EOF
}

if has tests; then
  echo "=== GPU tests (Triton SSD, CE kernel, Mamba2 mixer, compiled m125 blocks)"
  G=tests/gpu/test_mamba2_gpu.py
  timeout --kill-after=10 "$TEST_S" python3 -m pytest -q -rfE -p no:cacheprovider \
    kernels/tests/test_ssd_triton.py kernels/tests/test_ce_triton.py \
    $G::test_fast_mixer_matches_reference_bf16 $G::test_in_proj_output_rows_are_aligned \
    $G::test_prefill_then_decode_matches_parallel_forward \
    $G::test_compiled_m125_mamba2_block_each_path \
    "$G::test_compiled_block_of_every_recipe[recipes/m125/transformer.yaml]" \
    "$G::test_compiled_block_of_every_recipe[recipes/m125/transformer_mlp.yaml]" \
    >"$OUT/tests.log" 2>&1
  echo "tests $?" >>"$OUT/status.txt"; tail -15 "$OUT/tests.log"
fi
if has compile_all; then
  echo "=== torch.compile of one block of every recipe"
  timeout --kill-after=10 "$TEST_S" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
    tests/gpu/test_mamba2_gpu.py -k compiled_block >"$OUT/compile_all.log" 2>&1
  echo "compile_all $?" >>"$OUT/status.txt"; tail -15 "$OUT/compile_all.log"
fi
if has t2k; then
  echo "=== recipes/m125 at T=2048, micro batch 16"
  D=${D2K:-$(soup 2048 700)}
  train m2_triton_2k "$D" 2048 16 recipes/m125/mamba2.yaml model.mamba2.impl=triton
  train m2_triton_shifts_2k "$D" 2048 16 recipes/m125/mamba2.yaml model.mamba2.impl=triton \
    model.mamba2.conv_impl=shifts
  [ "${M2_TORCH:-0}" = 1 ] && train m2_torch_2k "$D" 2048 16 recipes/m125/mamba2.yaml \
    model.mamba2.impl=chunked
  train tf_gated_2k "$D" 2048 16 recipes/m125/transformer.yaml
fi
if has t16k; then
  echo "=== recipes/m125 at T=16384, micro batch 1"
  D=${D16K:-$(soup 16384 24)}
  train m2_triton_16k "$D" 16384 1 recipes/m125/mamba2.yaml model.mamba2.impl=triton
  train tf_gated_16k "$D" 16384 1 recipes/m125/transformer.yaml
fi
if has mfu; then
  echo "=== attention + SwiGLU Transformer at T=2048: MFU"
  D=${D2K:-$(soup 2048 700)}
  # the 110M setting of BENCHMARKS.md (12 x (attention + SwiGLU), d 768, 12 heads)
  train tf110m_mb64 "$D" 2048 64 recipes/tiny/base.yaml model.mixer=attention \
    model.block=transformer model.d_model=768 model.n_heads=12 model.n_layers=12
  train tfmlp_m125_mb32 "$D" 2048 32 recipes/m125/transformer_mlp.yaml
  train tfmlp_m125_mb64 "$D" 2048 64 recipes/m125/transformer_mlp.yaml
fi

echo; echo "=== tables (median over the steps after the first $SKIP)" | tee -a "$OUT/tables.md"
table "m125, T=2048" m2_triton_2k m2_triton_shifts_2k m2_torch_2k tf_gated_2k
ratio m2_triton_2k tf_gated_2k
ratio m2_triton_shifts_2k tf_gated_2k
table "m125, T=16384" m2_triton_16k tf_gated_16k
ratio m2_triton_16k tf_gated_16k
table "attention + SwiGLU, T=2048" tf110m_mb64 tfmlp_m125_mb32 tfmlp_m125_mb64
echo "done in $(( $(date +%s) - T0 )) s; exit codes:"; cat "$OUT/status.txt"
