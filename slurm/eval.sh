#!/usr/bin/env bash
# slurm/eval.sh - evaluate a sessa_pt checkpoint as a Slurm job (one process, one GPU).
#
# Usage (from the repository root):
#   sbatch [sbatch options] slurm/eval.sh CHECKPOINT_OR_RUN_DIR EVAL_COMMAND [options ...]
# Runs `srun python -m sessa_pt.eval.cli EVAL_COMMAND [options ...] CHECKPOINT_OR_RUN_DIR`.
# EVAL_COMMAND is one of the eval CLI's subcommands (ppl, task, passkey, memory-tail; see
# `python -m sessa_pt.eval.cli --help`); a run directory means its newest complete checkpoint.
# e.g.
#   sbatch slurm/eval.sh runs/sessa-1234 ppl --data data/shards/valid/manifest.json --mlflow-run-id auto
#   sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/eval.sh runs/x/checkpoints/step_00000100 memory-tail
# (--mlflow-run-id auto logs the metrics into the mlflow run that trained the checkpoint.)
# Without Slurm run the python command directly.
#
# Checks first that the checkpoint is complete (it has the COMPLETE marker the trainer writes
# last) or, for a run directory, that it has a complete checkpoint, so a half-written checkpoint
# of a running or killed job is never evaluated.
# Environment: OMP_NUM_THREADS (default: the job's CPUs), SESSA_PYTHON, SESSA_ROOT (as in
# slurm/pretrain.sh). Logs: slurm/logs/<job name>-<job id>.out. Exit code: the eval CLI's; 2 for
# usage errors.
#
#SBATCH --job-name=sessa-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=slurm/logs/%x-%j.out

set -euo pipefail
SCRIPT=eval.sh
USAGE="sbatch [sbatch options] slurm/eval.sh CHECKPOINT_OR_RUN_DIR EVAL_COMMAND [options ...]"

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
[ $# -ge 2 ] || die "expected a checkpoint (or run) directory and an eval command. Usage: $USAGE"
CKPT=$1
EVAL_CMD=$2
shift 2
[ -d "$CKPT" ] || die "checkpoint directory '$CKPT' not found (relative paths are relative to $PWD)"
if [ ! -e "$CKPT/COMPLETE" ]; then
  if [ -d "$CKPT/checkpoints" ]; then   # a run directory: needs at least one complete checkpoint
    compgen -G "$CKPT/checkpoints/step_*/COMPLETE" >/dev/null \
      || die "run directory '$CKPT' has no complete checkpoint yet (no checkpoints/step_*/COMPLETE)"
  else
    die "'$CKPT' is not a complete checkpoint (no COMPLETE marker): it is still being written or its job died while saving; pick another step"
  fi
fi

find_python
require_module sessa_pt.eval.cli
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}}
export PYTHONUNBUFFERED=1

log "job $SLURM_JOB_ID on $(hostname -s): $EVAL_CMD on $CKPT"
srun_opts=(--ntasks=1)
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
rc=0
srun "${srun_opts[@]}" "$PYTHON" -m sessa_pt.eval.cli "$EVAL_CMD" "$@" "$CKPT" || rc=$?
if [ "$rc" -ne 0 ]; then
  log "evaluation FAILED (exit code $rc); the error is above"
fi
exit "$rc"
