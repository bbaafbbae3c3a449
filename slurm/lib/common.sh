# shellcheck shell=bash
# slurm/lib/common.sh - helpers shared by slurm/pretrain.sh, slurm/eval.sh and slurm/sweep.sh.
# Sourced, not executed. Expects SESSA_ROOT (the sessa_pt checkout) and SCRIPT (the name used in
# messages) to be set by the caller.

# die MESSAGE...: print "SCRIPT: error: MESSAGE" on stderr and exit 2 (usage/setup errors).
die() { echo "$SCRIPT: error: $*" >&2; exit 2; }

# log MESSAGE...: timestamped progress line on stdout (ends up in the job's log).
log() { echo "$SCRIPT: [$(date '+%F %T')] $*"; }

# require_slurm USAGE: fail clearly when not inside a Slurm job.
require_slurm() {
  [ -n "${SLURM_JOB_ID:-}" ] || die "not running inside a Slurm job (SLURM_JOB_ID is unset).
  Submit it with sbatch:  $1
  Without Slurm, run the underlying command directly (see the comment at the top of this script)."
}

# find_python: set PYTHON to the interpreter that has sessa_pt installed: $SESSA_PYTHON if set,
# else the checkout's .venv, else an active virtualenv, else python3 on PATH.
find_python() {
  if [ -n "${SESSA_PYTHON:-}" ]; then
    PYTHON=$SESSA_PYTHON
  elif [ -x "$SESSA_ROOT/.venv/bin/python" ]; then
    PYTHON=$SESSA_ROOT/.venv/bin/python
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PYTHON=$VIRTUAL_ENV/bin/python
  else
    PYTHON=$(command -v python3 || true)
  fi
  if [ -z "$PYTHON" ] || [ ! -x "$PYTHON" ]; then
    die "no Python interpreter found; set SESSA_PYTHON=/path/to/python"
  fi
}

# require_module MODULE: fail clearly when PYTHON cannot import MODULE (checked without importing
# it, so it is cheap even for torch-heavy modules).
require_module() {
  "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$1" \
    2>/dev/null || die "Python module '$1' is not importable with $PYTHON.
  Install sessa_pt into that environment (./quickstart.sh --install-only), or point SESSA_PYTHON at one that has it."
}
