#!/usr/bin/env bash
# sessa_pt quick start.
#   ./quickstart.sh                 set up .venv, fetch the small real corpus, train a tokenizer,
#                                   write shards, train a small Sessa LM with torchrun (2 procs, CPU)
#   ./quickstart.sh --install-only  only set up .venv (what .ci/run uses)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

install_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local pip="$VENV/bin/python -m pip"
  $pip install -q --upgrade pip
  # torch first, from the exact version (on the CI/CPU machine this is the local CPU wheel);
  # later installs see it satisfied and never pull a CUDA build.
  $pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  # DeepSpeed compiles no ops at install (they are JIT-built when used, or not at all on CPU).
  DS_BUILD_OPS=0 $pip install -q --no-build-isolation "deepspeed==0.19.8"
  $pip install -q -e ".[dev,kernels,hf]"
  "$VENV/bin/python" -c "import torch, deepspeed, megatron.core, webdataset, sentencepiece, mlflow; print('sessa_pt env ok: torch', torch.__version__)"
}

install_env
if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
exec "$VENV/bin/python" -m sessa_pt.quickstart "$@"
