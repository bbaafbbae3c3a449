#!/usr/bin/env bash
# slurm/pretrain.sh - pretrain a sessa_pt recipe on Slurm: one torchrun per node, started with
# srun, joined by a c10d rendezvous; preemption- and time-limit-safe (checkpoint, requeue,
# resume into the same run and the same mlflow run).
#
# Usage (from the repository root):
#   sbatch [sbatch options] slurm/pretrain.sh RECIPE.yaml [key=value ...]
# e.g.
#   sbatch --nodes=4 slurm/pretrain.sh recipes/tiny/sessa.yaml train.steps=20000 parallel.tp=2
#   sbatch --gpus-per-node=0 --cpus-per-task=2 --time=10 slurm/pretrain.sh recipes/tiny/sessa.yaml
# The #SBATCH lines below are defaults for an 8-GPU node; options given to sbatch override them.
# On CPU nodes pass --gpus-per-node=0 (2 processes per node then, gloo; see NPROC_PER_NODE).
# Without Slurm, run the same trainer directly:
#   torchrun --nproc_per_node 2 -m sessa_pt.train RECIPE.yaml [key=value ...]
#
# What it does
#   - Runs `python -m torch.distributed.run --nnodes $SLURM_JOB_NUM_NODES --nproc_per_node P
#     --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id $SLURM_JOB_ID -m sessa_pt.train
#     RECIPE [overrides] run.dir=RUN_DIR` once per node (srun --ntasks-per-node=1).
#     HOST is the first node of the allocation (its NodeAddr; override with RDZV_HOST);
#     PORT = 15000 + SLURM_JOB_ID % 20000, a per-job port so jobs sharing a node don't collide
#     (override with RDZV_PORT). torchrun is started through the environment's python, so it
#     is that environment's torch.
#   - Processes per node P: $NPROC_PER_NODE if set, else the GPUs Slurm gave the node
#     (SLURM_GPUS_ON_NODE / --gpus-per-node), else 2 (CPU; the trainer then uses gloo, NCCL on GPU).
#   - Environment: OMP_NUM_THREADS = CPUs of the task / P (at least 1) unless already set;
#     on GPU nodes also TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (fail fast on NCCL errors instead of
#     hanging), CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron-core sequence/tensor-parallel overlap),
#     NCCL_DEBUG=WARN; each only unless already set. Cluster-specific NCCL settings (NCCL_IB_*,
#     NCCL_SOCKET_IFNAME, ...) belong in the submitting environment: sbatch exports it.
#   - Run directory (config, checkpoints, train_log.jsonl, status.json and, by default, the
#     mlflow store <run.dir>/mlflow.db): the run.dir=PATH override if given, else $RUN_DIR if
#     set, else runs/<recipe name>-<SLURM_JOB_ID>. SLURM_JOB_ID is kept across requeues, so a
#     requeued job finds its own run directory and the trainer resumes from the newest complete
#     checkpoint into the same mlflow run. To continue a run in a new job, pass its run.dir=.
#   - Stop and requeue: on SIGUSR1 (sent by Slurm 120 s before the time limit, --signal=B:USR1@120,
#     or by hand: scancel --signal=USR1 --batch JOBID) or SIGTERM, the script touches
#     <run.dir>/STOP; the trainer then saves a checkpoint at the next step boundary, writes
#     status "stopped" and exits 0. If the run is not finished and a stop was requested, the
#     script requeues its own job (scontrol requeue, needs --requeue), and the requeued job
#     resumes. SIGTERM is best effort: Slurm also sends it to the training processes and kills
#     everything KillWait (default 30 s) later, so rely on the USR1 warning for time limits, and
#     raise its lead time (--signal=B:USR1@SECONDS) above one step plus one checkpoint save.
#   - Exit code: the training step's (non-zero on failure, with the trainer's error in the log);
#     0 when finished or requeued; 2 for usage errors (no recipe, bad override, outside Slurm);
#     3 when a stop was requested but the job could not requeue itself (resubmit with run.dir=).
#
# Environment knobs: NPROC_PER_NODE, RUN_DIR, RDZV_HOST, RDZV_PORT, OMP_NUM_THREADS,
# SESSA_PYTHON (the interpreter; default: <repo>/.venv/bin/python, else python3), SESSA_ROOT (the
# checkout; default: found from the submitted script's path), SESSA_TRAIN_MODULE (default
# sessa_pt.train; to debug the launcher with a stand-in), SESSA_SWEEP_PLAN (set by slurm/sweep.sh: array task i takes recipe,
# seed and run dir from line i+1 of that file; positional arguments are then overrides only).
#
# Logs: slurm/logs/<job name>-<job id>.out relative to the submission directory (the folder
# ships with the repository; Slurm does not create it: submitting from elsewhere needs
# --output=... or an existing slurm/logs/). --open-mode=append keeps every attempt of a
# requeued job in the same file.
#
#SBATCH --job-name=sessa-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

set -euo pipefail
SCRIPT=pretrain.sh
USAGE="sbatch [sbatch options] slurm/pretrain.sh RECIPE.yaml [key=value ...]"

# --- find the checkout (sbatch runs a spooled copy of this file, so BASH_SOURCE is not it) ---
# (This bootstrap is repeated in each sbatch script on purpose: it has to run before
#  slurm/lib/common.sh, the shared library, can be located.)
find_root() {
  local cmd=""
  if [ -n "${SESSA_ROOT:-}" ]; then echo "$SESSA_ROOT"; return; fi
  if [ -n "${SLURM_JOB_ID:-}" ]; then   # the submitted script's path is the job's Command=
    # (-m1: for an array job scontrol may list several tasks, all with the same Command)
    cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -m1 -o 'Command=[^ ]*' | cut -d= -f2- || true)
  fi
  [ -n "$cmd" ] && [ -f "$cmd" ] || cmd=${BASH_SOURCE[0]}
  (cd "$(dirname "$cmd")/.." 2>/dev/null && pwd) || true
}
SESSA_ROOT=$(find_root)
if [ ! -f "$SESSA_ROOT/slurm/lib/common.sh" ]; then
  echo "$SCRIPT: error: cannot find the sessa_pt checkout (looked in '$SESSA_ROOT'); set SESSA_ROOT=/path/to/sessa_pt" >&2
  exit 2
fi
# shellcheck source=lib/common.sh
source "$SESSA_ROOT/slurm/lib/common.sh"

require_slurm "$USAGE"

# --- what to run: RECIPE + overrides, or (job array of slurm/sweep.sh) one line of the plan ---
OVERRIDES=()
if [ -n "${SESSA_SWEEP_PLAN:-}" ]; then
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "SESSA_SWEEP_PLAN is set but this is not a job array task"
  [ -f "$SESSA_SWEEP_PLAN" ] || die "sweep plan '$SESSA_SWEEP_PLAN' not found"
  line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$SESSA_SWEEP_PLAN")
  [ -n "$line" ] || die "sweep plan '$SESSA_SWEEP_PLAN' has no line for array task $SLURM_ARRAY_TASK_ID"
  IFS=$'\t' read -r RECIPE plan_seed plan_dir <<<"$line"
  OVERRIDES+=("run.seed=$plan_seed" "run.dir=$plan_dir")
else
  [ $# -ge 1 ] || die "missing RECIPE argument. Usage: $USAGE"
  RECIPE=$1
  shift
fi
[ -f "$RECIPE" ] || die "recipe file '$RECIPE' not found (relative paths are relative to the submission directory $PWD)"
RECIPE=$(cd "$(dirname "$RECIPE")" && pwd)/$(basename "$RECIPE")
OVERRIDES+=("$@")

# Validate overrides and pull out run.dir (the script needs it for STOP and status.json).
RUN_DIR_ARG=""
TRAIN_ARGS=()
for kv in "${OVERRIDES[@]}"; do
  [[ $kv == ?*=* ]] || die "expected a key=value override, got '$kv'. Usage: $USAGE"
  if [[ $kv == run.dir=* ]]; then RUN_DIR_ARG=${kv#run.dir=}; else TRAIN_ARGS+=("$kv"); fi
done
recipe_name=$(basename "$RECIPE"); recipe_name=${recipe_name%.yaml}; recipe_name=${recipe_name%.yml}
if [ -n "$RUN_DIR_ARG" ]; then
  RUN_DIR=$RUN_DIR_ARG
elif [ -z "${RUN_DIR:-}" ]; then   # (else: $RUN_DIR from the environment)
  RUN_DIR=runs/$recipe_name-$SLURM_JOB_ID
  # A job's first attempt must not find its derived run dir in use: that is another job with the
  # same id (ids repeat when a cluster's state is reset), and resuming it would mix two runs.
  if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ] && [ -e "$RUN_DIR/status.json" ]; then
    die "run directory '$RUN_DIR' already holds a run of an earlier job with id $SLURM_JOB_ID; pass run.dir=$RUN_DIR to continue that run, or another run.dir=..."
  fi
fi
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
TRAIN_ARGS+=("run.dir=$RUN_DIR")

find_python
TRAIN_MODULE=${SESSA_TRAIN_MODULE:-sessa_pt.train}
require_module "$TRAIN_MODULE"

# --- layout: nodes, processes per node, rendezvous ---
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ ${#NODES[@]} -ge 1 ] || die "could not expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
NNODES=${SLURM_JOB_NUM_NODES:-${#NODES[@]}}
# The rendezvous store lives on the first node; use its address as Slurm knows it (NodeAddr,
# which equals the node name unless the cluster maps names to addresses), or RDZV_HOST.
if [ -z "${RDZV_HOST:-}" ]; then
  RDZV_HOST=$(scontrol show node -o "${NODES[0]}" 2>/dev/null | grep -m1 -o 'NodeAddr=[^ ]*' | cut -d= -f2- || true)
  RDZV_HOST=${RDZV_HOST:-${NODES[0]}}
fi
RDZV_PORT=${RDZV_PORT:-$((15000 + SLURM_JOB_ID % 20000))}

gpus=${SLURM_GPUS_ON_NODE:-}
if [ -z "$gpus" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
  gpus=${SLURM_GPUS_PER_NODE##*:}          # "8" or "h100:8" -> 8
fi
[[ $gpus =~ ^[0-9]+$ ]] || gpus=0
if [ -n "${NPROC_PER_NODE:-}" ]; then
  NPROC=$NPROC_PER_NODE
elif [ "$gpus" -gt 0 ]; then
  NPROC=$gpus
else
  NPROC=2
fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$NPROC'"

cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
threads=$((cpus / NPROC)); [ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
export PYTHONUNBUFFERED=1
if [ "$gpus" -gt 0 ]; then
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
fi

# --- stop protocol: a signal asks the trainer (via the STOP file) to checkpoint and exit ---
STOP_FILE=$RUN_DIR/STOP
STATUS_FILE=$RUN_DIR/status.json
if [ -e "$STOP_FILE" ]; then
  log "removing a stale $STOP_FILE left by an earlier attempt"
  rm -f "$STOP_FILE"
fi
STOP_REQUESTED=""
# shellcheck disable=SC2317  # called from the traps below
request_stop() {
  STOP_REQUESTED=$1
  log "got SIG$1: asking the trainer to checkpoint and stop (touch $STOP_FILE)"
  touch "$STOP_FILE"
}
trap 'request_stop USR1' USR1
trap 'request_stop TERM' TERM

run_state() {   # prints status.json's state, or "missing"
  [ -f "$STATUS_FILE" ] || { echo missing; return; }
  "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("state", "unknown"))' \
    "$STATUS_FILE" 2>/dev/null || echo unreadable
}

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${NNODES} node(s) [${NODES[*]}], $NPROC proc/node, gpus/node=$gpus, OMP_NUM_THREADS=$OMP_NUM_THREADS"
log "rendezvous $RDZV_HOST:$RDZV_PORT; recipe $RECIPE; run dir $RUN_DIR"
log "trainer args: ${TRAIN_ARGS[*]}"

# srun runs in the background and the script waits on it: bash only runs a trap after the
# foreground command ends, but `wait` returns as soon as a trapped signal arrives.
srun_opts=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
# Since Slurm 22.05 srun does not inherit --cpus-per-task from the batch job: pass it on.
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun "${srun_opts[@]}" \
  "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \
    --max_restarts 0 \
    -m "$TRAIN_MODULE" "$RECIPE" "${TRAIN_ARGS[@]}" &
SRUN_PID=$!
while :; do
  rc=0
  wait "$SRUN_PID" || rc=$?
  # rc > 128 with srun still alive: a trapped signal interrupted the wait; keep waiting.
  if [ "$rc" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  break
done

state=$(run_state)
log "training step exited with code $rc; run state: $state"
if [ "$rc" -ne 0 ]; then
  log "training FAILED (exit code $rc); the trainer's error is above. Run dir: $RUN_DIR"
  exit "$rc"
fi
case $state in
  finished)
    rm -f "$STOP_FILE"   # a stop that arrived after the last step is moot
    log "run finished: $RUN_DIR"
    exit 0 ;;
  stopped)
    if [ -n "$STOP_REQUESTED" ]; then
      log "checkpoint saved after SIG$STOP_REQUESTED; requeueing job $SLURM_JOB_ID to resume"
      if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0   # Slurm ends this attempt now and starts the job again later
      fi
      log "scontrol requeue failed (job cancelled, or submitted with --no-requeue); resume with: $USAGE run.dir=$RUN_DIR"
      exit 3
    fi
    log "trainer stopped on a STOP file not sent by this script; resume with: $USAGE run.dir=$RUN_DIR"
    exit 0 ;;
  *)
    log "error: the trainer exited 0 but $STATUS_FILE says state '$state'"
    exit 1 ;;
esac
