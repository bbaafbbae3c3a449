#!/usr/bin/env bash
# slurm/local/stop.sh - stop the single-node Slurm that start.sh started.
#
# Usage: slurm/local/stop.sh [BASE]   (BASE defaults to $SESSA_SLURM_BASE or /tmp/sessa-slurm)
#
# Cancels every job first (running job steps, i.e. slurmstepd and its tasks, survive a TERM to
# slurmd otherwise), then stops slurmd, slurmctld and, only if start.sh started it, munged, by
# the pids in their pid files (TERM, then KILL after 10 s). Safe to run when nothing runs.
set -uo pipefail   # no -e: keep stopping the rest when one step fails

BASE=${1:-${SESSA_SLURM_BASE:-/tmp/sessa-slurm}}
export PATH=$PATH:/usr/sbin:/sbin
export SLURM_CONF=$BASE/slurm.conf
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]; }   # zombies are dead

stop_pid_file() {   # stop_pid_file FILE NAME
  local file=$1 name=$2 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      echo "slurm/local/stop.sh: $name ($pid) ignored TERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  rm -f "$file"
}

if [ -s "$BASE/run/slurmctld.pid" ] && alive "$(cat "$BASE/run/slurmctld.pid")"; then
  jobs=$(squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086  # one job id per word
    scancel --full $jobs 2>/dev/null
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
stop_pid_file "$BASE/run/slurmd.pid" slurmd
stop_pid_file "$BASE/run/slurmctld.pid" slurmctld
if [ -s "$BASE/run/munged.owned" ]; then
  # munged removes its own /run/munge/munged.pid; we hold a copy of the pid we started.
  stop_pid_file "$BASE/run/munged.owned" munged
fi
echo "slurm/local/stop.sh: stopped (BASE=$BASE)"
