#!/usr/bin/env bash
# slurm/sweep.sh - submit a matched-budget recipe family as one Slurm job array: one array task
# per (recipe, seed), each running slurm/pretrain.sh's launch (srun + torchrun, stop/requeue).
#
# Usage (on a login node, from the repository root; this script submits, it is not a job):
#   slurm/sweep.sh [options] RECIPE_DIR [key=value ...] [-- sbatch options ...]
# Options:
#   --seeds LIST        comma-separated run.seed values (default: 0)
#   --max-parallel K    at most K array tasks run at once (sbatch --array=...%K)
#   --out DIR           sweep directory (default: runs/sweep-<family>-<YYYYmmdd-HHMMSS>)
#   --dry-run           write the plan and print the sbatch command without submitting
# e.g.
#   slurm/sweep.sh --seeds 0,1,2 recipes/matched_125m train.steps=20000 -- --nodes=2 --time=2-00:00:00
#   slurm/sweep.sh recipes/tiny -- --gpus-per-node=0 --cpus-per-task=2 --time=30
#
# RECIPE_DIR holds the family: every *.yaml / *.yml in it (not recursive), sorted by name, except
# files that another recipe names as its `base:` (the family's shared settings); the recipes are
# expected to share one training budget (tokens, schedule), so only the model differs.
# The key=value overrides apply to every task; run.dir and run.seed are set per task and may not
# be given. Writes DIR/plan.tsv (line i+1 = array task i: recipe, seed, run dir
# DIR/<recipe>-seed<seed>) and submits slurm/pretrain.sh as an array with SESSA_SWEEP_PLAN=plan;
# task logs go to DIR/logs/<job name>-<array job id>_<task>.out. A preempted task requeues and
# resumes on its own like any pretrain.sh job. Each run keeps its own mlflow store under its run
# dir unless you pass tracking.uri=<server> for all of them (a team server is the way to compare
# a sweep in one UI; one shared SQLite file is not safe for concurrent writers).
# Prints the array job id on stdout (the only stdout line when submitting).
set -euo pipefail
SCRIPT=sweep.sh
USAGE="slurm/sweep.sh [--seeds 0,1] [--max-parallel K] [--out DIR] [--dry-run] RECIPE_DIR [key=value ...] [-- sbatch options ...]"
SESSA_ROOT=${SESSA_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=lib/common.sh
source "$SESSA_ROOT/slurm/lib/common.sh"

seeds=0 max_parallel="" out="" dry_run=0
while [ $# -gt 0 ]; do
  case $1 in
    --seeds) [ $# -ge 2 ] || die "--seeds needs a value"; seeds=$2; shift 2 ;;
    --max-parallel) [ $# -ge 2 ] || die "--max-parallel needs a value"; max_parallel=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a value"; out=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) die "missing RECIPE_DIR before '--'. Usage: $USAGE" ;;
    -*) die "unknown option '$1'. Usage: $USAGE" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "missing RECIPE_DIR. Usage: $USAGE"
recipe_dir=$1
shift
[ -d "$recipe_dir" ] || die "RECIPE_DIR '$recipe_dir' is not a directory (a sweep runs a family: a directory of recipes; for one recipe use slurm/pretrain.sh)"
[[ $seeds =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--seeds must be comma-separated integers, got '$seeds'"
[ -z "$max_parallel" ] || [[ $max_parallel =~ ^[1-9][0-9]*$ ]] || die "--max-parallel must be a positive integer, got '$max_parallel'"

overrides=() sbatch_opts=()
while [ $# -gt 0 ]; do
  if [ "$1" = -- ]; then shift; sbatch_opts=("$@"); break; fi
  [[ $1 == ?*=* ]] || die "expected a key=value override or '--', got '$1'. Usage: $USAGE"
  case $1 in run.dir=*|run.seed=*) die "'$1': run.dir and run.seed are set per array task by the sweep" ;; esac
  overrides+=("$1")
  shift
done

mapfile -t candidates < <(find "$recipe_dir" -maxdepth 1 -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
# A file that another recipe names as its `base:` is the family's shared base, not a member.
bases=" "
for recipe in "${candidates[@]}"; do
  base=$(sed -n 's/^base:[[:space:]]*["'"'"']\{0,1\}\([^"'"'"' #]*\).*/\1/p' "$recipe" | head -n1)
  [ -z "$base" ] || bases+="$(cd "$(dirname "$recipe")" && realpath -m "$base") "
done
recipes=()
for recipe in "${candidates[@]}"; do
  [[ $bases == *" $(realpath -m "$recipe") "* ]] || recipes+=("$recipe")
done
[ ${#recipes[@]} -ge 1 ] || die "no *.yaml recipes in '$recipe_dir' (other than shared bases)"
family=$(basename "$(cd "$recipe_dir" && pwd)")
out=${out:-runs/sweep-$family-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
plan=$out/plan.tsv
[ ! -e "$plan" ] || die "'$plan' already exists: pick a new --out (or delete the old sweep)"

IFS=, read -r -a seed_list <<<"$seeds"
: >"$plan"
for recipe in "${recipes[@]}"; do
  abs=$(cd "$(dirname "$recipe")" && pwd)/$(basename "$recipe")
  name=$(basename "$recipe"); name=${name%.yaml}; name=${name%.yml}
  for seed in "${seed_list[@]}"; do
    printf '%s\t%s\t%s\n' "$abs" "$seed" "$out/$name-seed$seed" >>"$plan"
  done
done
n=$(wc -l <"$plan")

array="0-$((n - 1))${max_parallel:+%$max_parallel}"
cmd=(sbatch --parsable --array="$array" --job-name="sweep-$family"
     --output="$out/logs/%x-%A_%a.out" "${sbatch_opts[@]}"
     "$SESSA_ROOT/slurm/pretrain.sh" "${overrides[@]}")
echo "$SCRIPT: $n tasks (${#recipes[@]} recipes x ${#seed_list[@]} seeds), plan $plan" >&2
if [ "$dry_run" = 1 ]; then
  echo "$SCRIPT: dry run; would submit: SESSA_SWEEP_PLAN=$plan ${cmd[*]}" >&2
  cat "$plan" >&2
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a machine with the Slurm client"
# sbatch exports the environment to the job (--export=ALL): the tasks find the plan and the checkout.
jobid=$(SESSA_SWEEP_PLAN=$plan SESSA_ROOT=$SESSA_ROOT "${cmd[@]}")
jobid=${jobid%%;*}   # --parsable prints "id" or "id;cluster"
echo "$jobid" >"$out/array_job_id"
echo "$SCRIPT: submitted array job $jobid; watch with: squeue -j $jobid; runs under $out" >&2
echo "$jobid"
