#!/usr/bin/env bash
# One GPU call of a tuned comparison on one H200: every run of the phase trains side by side on
# GPU 0, capped so that the whole call ends within about 8 minutes, and the results come back in
# at most 8 files directly under $OUT.
#
#   sessa_pt/experiments/gpu_call.sh EXPERIMENT PHASE [extra options of the experiment]
#     EXPERIMENT: symbolsoup | symbolsoup2048 | mqar | lm
#     PHASE:      sweep (lr sweep, choice on the validation split) | seeds (final runs) |
#                 all (the sweep on a short budget, then the seeds at its choice: one call
#                 per experiment; choice.json is copied to $OUT as soon as the sweep ends)
#                 mqar's budgets (2500 + 4000 steps) need two calls: sweep, then seeds
#
# Environment (all optional):
#   TRAIN_MINUTES  per-run training cap (default 4.0, 3.5 with PHASE=all; the trainer stops at
#                  it and the results mark the run "stopped")
#   SWEEP_MINUTES  per-run cap of the sweep runs (default TRAIN_MINUTES, 1.5 with PHASE=all)
#   VARIANTS       comma-separated models of this call (default: all of the experiment), e.g.
#                  VARIANTS=sessa to give one model's three seeds a whole call
#   RUNS_PER_GPU   runs side by side (default: the models x their rates, at least 3 seeds:
#                  every run of the phase at once); set it when --lrs or --seeds change the count.
#                  A run that runs the GPU out of memory beside others starts again when one
#                  ends, with one slot fewer (sessa_pt/experiments/runner.py)
#   SESSA_GIT_COMMIT  the commit of the tree (the GPU machine has no .git to ask)
#   WORK           where the runs live on the GPU machine (default /tmp/exp)
#   WHEELS=0       skip the wheel install (a CPU check of this script with --smoke)
# The seeds phase reads the sweep's choice from results/<name>/choice.json (commit the
# choice.json that the sweep call brought back there first), or takes --lr VARIANT=LR options.
#
# Needs on the GPU machine: .whl/ (kernels/benchmarks/gpu_wheels.sh) and, for lm, data/lm_table2/raw.tar.xz
# and data/lm_table2/tok/ (prepared on the CPU machine: sessa_pt/experiments/lm.py says how).
# Files under $OUT (at most 8 come back): choice.json (sweep), summary.json + RESULTS.md
# (seeds), runs.tar.gz (every log, eval/memory-tail JSON, run summary, the comparison report
# with its PNGs and the mlflow stores) and call.txt (wall times of the call's steps).
set -uo pipefail
exp=${1:?usage: gpu_call.sh EXPERIMENT PHASE [options]}
phase=${2:?usage: gpu_call.sh EXPERIMENT PHASE [options]}
shift 2
case $exp in
  symbolsoup) name=symbolsoup600 ;;
  symbolsoup2048) name=symbolsoup2048 ;;
  mqar) name=mqar_diffuse ;;
  lm) name=lm_table2 ;;
  *) echo "unknown experiment $exp: symbolsoup | symbolsoup2048 | mqar | lm" >&2; exit 2 ;;
esac
case $phase in sweep|seeds|all) ;; *) echo "PHASE must be sweep, seeds or all, got $phase" >&2; exit 2 ;; esac
: "${OUT:?set OUT to the folder whose files come back}"
t0=$(date +%s)
stamp() { echo "$1 $(( $(date +%s) - t0 )) s" | tee -a "$OUT/call.txt"; }

PY=${PYTHON:-python3}
if [[ ${WHEELS:-1} != 0 ]]; then
  S=$(mktemp -d)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$S" .whl/*.whl || { echo "wheel install failed: is .whl/ carried?" >&2; exit 1; }
  export PYTHONPATH=$S:$PWD:$PWD/kernels:$PWD/data_prep
else
  export PYTHONPATH=$PWD:$PWD/kernels:$PWD/data_prep${PYTHONPATH:+:$PYTHONPATH}
fi
export OMP_NUM_THREADS=1 MLFLOW_ALLOW_FILE_STORE=true MLFLOW_DISABLE_TELEMETRY=true
# The image sets TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's op builder cannot parse.
export TORCH_CUDA_ARCH_LIST=9.0
stamp "installed wheels:"

work=${WORK:-/tmp/exp}
if [[ $phase == all ]]; then : "${TRAIN_MINUTES:=3.5}" "${SWEEP_MINUTES:=1.5}"; fi
: "${TRAIN_MINUTES:=4.0}" "${SWEEP_MINUTES:=$TRAIN_MINUTES}"
args=(--gpus 0 --out $work/$name --minutes "$TRAIN_MINUTES" --sweep-minutes "$SWEEP_MINUTES")
[[ -n ${VARIANTS:-} ]] && args+=(--variants "$VARIANTS")
n_runs=$($PY - "$exp" "${VARIANTS:-}" <<'EOF'
import sys
from sessa_pt.experiments.__main__ import EXPERIMENTS
e = EXPERIMENTS[sys.argv[1]]()
n = len(sys.argv[2].split(",")) if sys.argv[2] else len(e.variants)
print(n * max(len(e.lrs), 3))
EOF
)
# every run of the phase gets its own slot on GPU 0: each rate of the sweep, or 3 seeds per model
args+=(--runs-per-gpu "${RUNS_PER_GPU:-$n_runs}")
if [[ $phase == seeds && -f results/$name/choice.json ]]; then
  args+=(--choice "results/$name/choice.json")
fi
d=$work/$name
if [[ $phase == all ]]; then
  # the two phases one after the other, the sweep's choice copied out between them: a call cut
  # by its time limit during the seeds still brings the choice back
  $PY -m sessa_pt.experiments "$exp" sweep "${args[@]}" "$@" > "$OUT/driver.log" 2>&1
  code=$?
  stamp "phase sweep (exit $code):"
  cp "$d/sweep/choice.json" "$OUT/" 2>/dev/null
  if [[ $code == 0 ]]; then
    $PY -m sessa_pt.experiments "$exp" seeds "${args[@]}" --choice "$d/sweep/choice.json" \
      "$@" >> "$OUT/driver.log" 2>&1
    code=$?
    stamp "phase seeds (exit $code):"
  fi
else
  $PY -m sessa_pt.experiments "$exp" "$phase" "${args[@]}" "$@" > "$OUT/driver.log" 2>&1
  code=$?
  stamp "phase $phase (exit $code):"
fi

[[ $phase != seeds ]] && cp "$d/sweep/choice.json" "$OUT/" 2>/dev/null
if [[ $phase != sweep ]]; then
  cp "$d/seeds/summary.json" "$d/seeds/RESULTS.md" "$OUT/" 2>/dev/null
fi
# Everything else (logs, JSONs, run summaries, mlflow stores; no checkpoints, no data) in one
# tarball.
if [[ -d $d/sweep || -d $d/seeds ]]; then
  mv "$OUT/driver.log" "$d/"
  tar -C "$d" -czf "$OUT/runs.tar.gz" --exclude='checkpoints' --exclude='*.pt' \
    --exclude='./data' --exclude='*.safetensors' driver.log $(cd "$d" && ls -d sweep seeds 2>/dev/null)
  log=$d/driver.log
else
  log=$OUT/driver.log     # no phase started: its log is what comes back
fi
stamp "packed:"
ls -la "$OUT"
tail -n 40 "$log"
exit $code
