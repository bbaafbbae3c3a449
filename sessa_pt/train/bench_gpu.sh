#!/usr/bin/env bash
# GPU training benchmark (one device-tool call on an nvidia-h200-x2 machine):
#   ~125M Transformer (attention + SwiGLU) and ~125M Sessa LM at T=2048, bf16, one H200 each
#   (tokens/s, MFU), then DP=2 and PP=2 on two H200s with NCCL.
# Usage (repo root, deps on PYTHONPATH):  bash sessa_pt/train/bench_gpu.sh DATA_DIR OUT_DIR
# DATA_DIR holds train/ and valid/ shards tokenized at seq_len 2048 (sessa-data tokenize).
set -euo pipefail
D=$1; OUT=$2; RUNS=${RUNS:-/tmp/bench_runs}; mkdir -p "$OUT" "$RUNS"
export OMP_NUM_THREADS=4 MLFLOW_ALLOW_FILE_STORE=true MLFLOW_DISABLE_TELEMETRY=true
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
COMMON=(data.train=$D/train/manifest.json data.valid=$D/valid/manifest.json data.seq_len=2048
  data.num_workers=2 model.vocab_size=32768 model.d_model=768 model.n_heads=12
  train.micro_batch_size=8 train.log_every=5 optim.warmup_steps=5 eval.every=0
  eval.max_batches=2 checkpoint.every=0 checkpoint.keep_last=1 tracking.enabled=false)
TF=(model.mixer=attention model.block=transformer model.n_layers=12)
SESSA=(model.mixer=sessa model.block=gated model.n_layers=16 model.sessa.impl=triton)
run() {  # name nproc gpus overrides...
  local name=$1 nproc=$2 gpus=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpus torchrun --standalone --nproc_per_node "$nproc" -m sessa_pt.train \
    recipes/tiny/base.yaml "${COMMON[@]}" "$@" run.dir="$RUNS/$name" run.name="$name" \
    > "$OUT/$name.log" 2>&1 || { echo "$name FAILED"; tail -30 "$OUT/$name.log"; }
}
if [ "${BENCH:-layouts}" = mfu4 ]; then  # compiled loss (now part of train.compile), fused
  # AdamW, chunked loss, gradient accumulation; PART=a|b on GPU=<id> (two GPUs in parallel).
  # PART a profiles steps 8-9 (SESSA_PT_PROFILE) into the run directory's profile_rank0.txt.
  G=${GPU:-0}; MB=(train.micro_batch_size=64 train.compile=true)
  if [ "${PART:-a}" = a ]; then
    SESSA_PT_PROFILE=8:2 run tf_mb64_c_fused 1 "$G" "${TF[@]}" "${MB[@]}" train.steps=14 \
      train.global_batch_size=64 optim.fused=true
    cp "$RUNS/tf_mb64_c_fused/profile_rank0.txt" "$OUT/profile_tf_mb64.txt" || true
    run tf_mb64x2_c_fused 1 "$G" "${TF[@]}" "${MB[@]}" train.steps=10 \
      train.global_batch_size=128 optim.fused=true
  else
    run tf_mb64_c 1 "$G" "${TF[@]}" "${MB[@]}" train.steps=12 train.global_batch_size=64
    run tf_mb64_c_fused_chunk8k 1 "$G" "${TF[@]}" "${MB[@]}" train.steps=12 \
      train.global_batch_size=64 optim.fused=true train.loss_chunk_tokens=8192
  fi
  exit 0
fi
if [ "${BENCH:-layouts}" = mfu3 ]; then  # micro batch 64 (128k tokens per step)
  run tf125m_mb64_compile 1 0 "${TF[@]}" train.steps=12 train.micro_batch_size=64 \
    train.global_batch_size=64 train.compile=true
  python3 -m sessa_pt.train.bench --skip 5 "$RUNS/tf125m_mb64_compile" | tee "$OUT/table.md"
  exit 0
fi
if [ "${BENCH:-layouts}" = mfu2 ]; then  # the best settings of the "mfu" round, larger batch
  run tf125m_mb32_compile 1 0 "${TF[@]}" train.steps=16 train.micro_batch_size=32 \
    train.global_batch_size=32 train.compile=true
  run sessa125m_mb16_compile 1 0 "${SESSA[@]}" train.steps=12 train.micro_batch_size=16 \
    train.global_batch_size=16 train.compile=true
  python3 -m sessa_pt.train.bench --skip 6 $(ls -d "$RUNS"/*/ | sed 's#/$##') | tee "$OUT/table.md"
  exit 0
fi
if [ "${BENCH:-layouts}" = mfu ]; then   # throughput knobs of the 1-GPU Transformer baseline
  run tf125m_mb8_compile 1 0 "${TF[@]}" train.steps=25 train.global_batch_size=8 train.compile=true
  run tf125m_mb16 1 0 "${TF[@]}" train.steps=20 train.micro_batch_size=16 train.global_batch_size=16
  run tf125m_mb16_compile 1 0 "${TF[@]}" train.steps=20 train.micro_batch_size=16 \
    train.global_batch_size=16 train.compile=true
  run sessa125m_mb8_compile 1 0 "${SESSA[@]}" train.steps=15 train.global_batch_size=8 train.compile=true
  python3 -m sessa_pt.train.bench --skip 6 $(ls -d "$RUNS"/*/ | sed 's#/$##') | tee "$OUT/table.md"
  exit 0
fi
run transformer125m_1gpu 1 0 "${TF[@]}" train.steps=25 train.global_batch_size=8
run sessa125m_1gpu 1 0 "${SESSA[@]}" train.steps=15 train.global_batch_size=8
run transformer125m_dp2 2 0,1 "${TF[@]}" train.steps=15 train.global_batch_size=16
run sessa125m_pp2 2 0,1 "${SESSA[@]}" parallel.pp=2 train.steps=10 train.global_batch_size=16
python3 -m sessa_pt.train.bench --skip 4 $(ls -d "$RUNS"/*/ | sed 's#/$##') | tee "$OUT/table.md"
