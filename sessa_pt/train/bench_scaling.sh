#!/usr/bin/env bash
# Several GPUs of one host: the GPU tests on every visible GPU, data/tensor/pipeline-parallel
# throughput scaling of recipes/m125 at T=2048, and a two-"node" c10d rendezvous that trains,
# checkpoints and resumes on another data-parallel size. Prints the tables last.
#
#   bash sessa_pt/train/bench_scaling.sh DATA_DIR OUT_DIR
#
# DATA_DIR holds train/ and valid/ shards tokenized at seq_len 2048 with a vocabulary of at most
# 32768 (`sessa-data tokenize ... --seq-len 2048`). Run from the repository root with the
# packages importable (on the device machine: .whl installed, PYTHONPATH=<repo>:<repo>/kernels:<repo>/data_prep).
# PARTS (default tests,scaling,rendezvous) picks parts; a row that needs more GPUs than are
# visible is printed as skipped, so on one GPU this is a dry run of the 1-GPU rows. Each part
# and each run has its own time limit (RUN_S, TEST_S seconds), so one hang loses one row.
# With no GPU at all, the rendezvous part runs on CPU processes (gloo) with a tiny model.
set -u
DATA=$1; OUT=$2
RUNS=${RUNS:-/tmp/scaling_runs}; PARTS=${PARTS:-tests,scaling,rendezvous}
: "${RUN_S:=150}" "${TEST_S:=420}" "${STEPS:=14}" "${MICRO:=8}"
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export MLFLOW_ALLOW_FILE_STORE=true MLFLOW_DISABLE_TELEMETRY=true
# NVLink multicast stays off on these machines (NCCL NVLS, torch symmetric memory).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
T0=$(date +%s)
: >"$OUT/status.txt"
echo "visible GPUs: $NGPU" | tee "$OUT/gpu.txt"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
DATA_ARGS=(data.train=$DATA/train/manifest.json data.valid=$DATA/valid/manifest.json
  data.seq_len=2048 data.num_workers=2 eval.every=0 checkpoint.every=0 tracking.enabled=false
  train.log_every=1 optim.warmup_steps=2)

train() {  # train NAME NPROC GPU_LIST recipe overrides...: one torchrun under its time limit
  local name=$1 nproc=$2 gpus=$3; shift 3
  echo "--- $name: $nproc process(es) on GPUs [$gpus] (at $(( $(date +%s) - T0 )) s)"
  CUDA_VISIBLE_DEVICES=$gpus timeout --kill-after=10 "$RUN_S" \
    torchrun --standalone --nproc_per_node "$nproc" -m sessa_pt.train "$@" \
    run.dir="$RUNS/$name" run.name="$name" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc" >>"$OUT/status.txt"
  [ $rc = 0 ] || { echo "$name FAILED (exit $rc)"; grep -v '^{' "$OUT/$name.log" | tail -15; }
}

if has tests; then
  echo "=== GPU tests on $NGPU GPU(s)"
  timeout --kill-after=10 "$TEST_S" python3 -m pytest -m gpu tests/gpu -q -rfE \
    -p no:cacheprovider >"$OUT/tests.log" 2>&1
  echo "tests $?" >>"$OUT/status.txt"; tail -15 "$OUT/tests.log"
fi

if has scaling && [ "$NGPU" -ge 1 ]; then
  echo "=== scaling: recipes/m125, T=2048, micro batch $MICRO per GPU (global = micro x DP)"
  rows=()
  for mixer in sessa transformer mamba2; do
    for dp in 1 2 4; do
      [ "$dp" -le "$NGPU" ] || { echo "skip ${mixer}_dp$dp (needs $dp GPUs)"; continue; }
      gpus=$(seq -s, 0 $((dp - 1)))
      train "${mixer}_dp$dp" "$dp" "$gpus" "recipes/m125/$mixer.yaml" "${DATA_ARGS[@]}" \
        train.steps="$STEPS" train.micro_batch_size="$MICRO" \
        train.global_batch_size=$((MICRO * dp)) parallel.zero_stage=1 train.compile=true
      rows+=("$RUNS/${mixer}_dp$dp")
    done
  done
  # Model parallel layouts of Sessa: the same global batch as sessa_dp1 (one data replica).
  for lay in "tp2 2 parallel.tp=2" "pp2 2 parallel.pp=2" "tp2pp2 4 parallel.tp=2 parallel.pp=2"; do
    set -- $lay
    name=sessa_$1 n=$2; shift 2
    [ "$n" -le "$NGPU" ] || { echo "skip $name (needs $n GPUs)"; continue; }
    train "$name" "$n" "$(seq -s, 0 $((n - 1)))" recipes/m125/sessa.yaml "${DATA_ARGS[@]}" \
      train.steps="$STEPS" train.micro_batch_size="$MICRO" train.global_batch_size="$MICRO" \
      parallel.zero_stage=1 train.compile=true "$@"
    rows+=("$RUNS/$name")
  done
  ok=(); for r in "${rows[@]}"; do [ -s "$r/train_log.jsonl" ] && ok+=("$r"); done
  if [ ${#ok[@]} -gt 0 ]; then
    python3 -m sessa_pt.train.bench --skip 5 --speedup-vs _dp1 "${ok[@]}" | tee "$OUT/scaling.md"
  fi
fi

if has rendezvous; then
  # Two torchrun "nodes" on this host joined through c10d (as slurm/pretrain.sh joins nodes),
  # one process per GPU; then the run resumes as one process (another DP size).
  if [ "$NGPU" -ge 2 ]; then
    node_gpu=(0 1); model=(recipes/m125/sessa.yaml); steps=8; more=12
  else
    node_gpu=("" ""); model=(recipes/tiny/sessa.yaml model.vocab_size=32768)
    steps=4; more=6
    echo "(fewer than 2 GPUs: the rendezvous runs on CPU processes with gloo)"
  fi
  echo "=== rendezvous: 2 nodes x 1 process, c10d on 127.0.0.1"
  port=$((29400 + RANDOM % 1000)); rd="$RUNS/rdzv"
  args=(-m sessa_pt.train "${model[@]}" "${DATA_ARGS[@]}" train.micro_batch_size=2
    train.global_batch_size=4 parallel.zero_stage=1 checkpoint.every=4 run.dir="$rd"
    run.name=rdzv)
  for node in 0 1; do
    CUDA_VISIBLE_DEVICES=${node_gpu[$node]} timeout --kill-after=10 "$RUN_S" \
      torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d \
      --rdzv_endpoint "127.0.0.1:$port" --rdzv_id "rdzv$port" "${args[@]}" \
      train.steps=$steps >"$OUT/rdzv_node$node.log" 2>&1 &
  done
  wait
  CUDA_VISIBLE_DEVICES=${node_gpu[0]} timeout --kill-after=10 "$RUN_S" \
    torchrun --standalone --nproc_per_node 1 "${args[@]}" train.steps=$more \
    >"$OUT/rdzv_resume.log" 2>&1
  echo "rendezvous_resume $?" >>"$OUT/status.txt"
  python3 - "$rd" "$steps" "$more" "$OUT/rdzv_resume.log" <<'EOF' | tee "$OUT/rendezvous.md"
import json, pathlib, sys
rd, steps, more = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
log = [json.loads(x) for x in (rd / "train_log.jsonl").read_text().splitlines()]
state = json.loads((rd / "status.json").read_text()).get("state")
seen = [r["step"] for r in log]
resumed = [ln for ln in pathlib.Path(sys.argv[4]).read_text().splitlines() if "resumed" in ln]
ok = seen == list(range(1, more + 1)) and state == "finished" and resumed
print("| 2-node steps | resumed (1 process) | steps logged | status | result |")
print("|---|---|---|---|---|")
print(f"| 1..{steps} | {resumed[0].strip() if resumed else 'no resume line'} | "
      f"{seen[0] if seen else '-'}..{seen[-1] if seen else '-'} | {state} | "
      f"{'ok' if ok else 'FAILED'} |")
EOF
fi

echo "=== done in $(( $(date +%s) - T0 )) s; exit codes (124/137: time limit):"
cat "$OUT/status.txt"
