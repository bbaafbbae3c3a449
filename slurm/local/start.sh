#!/usr/bin/env bash
# slurm/local/start.sh - start a real single-node Slurm (munged, slurmctld, slurmd) on this
# machine without systemd, and wait until its node is idle.
#
# Usage:  slurm/local/start.sh [BASE]        (as root; BASE defaults to $SESSA_SLURM_BASE or
#                                             /tmp/sessa-slurm)
#         export SLURM_CONF=BASE/slurm.conf  (then sinfo, sbatch, srun, squeue ... use it)
#         slurm/local/stop.sh [BASE]         (cancels all jobs, stops what start.sh started)
# Env:    SESSA_SLURM_AUTH=munge|none        munge (default, as on real clusters) or none (no
#                                             munged at all; insecure, fine on a test box)
#
# Layout under BASE: slurm.conf (made from slurm.conf.in next to this script), cgroup.conf,
# gres.conf (only with GPUs), state/ (ctld
# state and slurmd spool), log/ (slurmctld.log, slurmd.log, jobcomp.txt: one line per finished
# job with its JobState and ExitCode, since there is no sacct), run/ (pid files, and
# munged.owned when this script started munged, so stop.sh only stops what we started).
# Install the packages first with slurm/local/install.sh.
#
# Idempotent: if this BASE's slurmctld is already running it only waits for the node. The
# controller starts with a clean state (-c), so job ids restart from 1 after each start.
# Slurm uses TCP ports 6817/6818: one such cluster per machine (network namespace).
set -euo pipefail
shopt -s extglob

BASE=${1:-${SESSA_SLURM_BASE:-/tmp/sessa-slurm}}
AUTH=${SESSA_SLURM_AUTH:-munge}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH=$PATH:/usr/sbin:/sbin
export SLURM_CONF=$BASE/slurm.conf

die() { echo "slurm/local/start.sh: $*" >&2; exit 1; }
# A pid is alive if it exists and is not a zombie (the daemons double-fork; their orphaned
# parents linger as zombies until PID 1 reaps them, and kill -0 would call them alive).
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]; }
pid_alive() { [ -s "$1" ] && alive "$(cat "$1")"; }

wait_idle() {
  local state=""
  for _ in $(seq 150); do
    state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
    [ "$state" = idle ] && return 0
    sleep 0.2
  done
  echo "slurm/local/start.sh: node not idle after 30 s (state '${state}'); logs in $BASE/log" >&2
  sinfo -R >&2 || true
  tail -n 20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2 || true
  return 1
}

case $AUTH in munge|none) ;; *) die "SESSA_SLURM_AUTH must be munge or none, not '$AUTH'" ;; esac
cmds=(slurmctld slurmd sinfo)
[ "$AUTH" != munge ] || cmds+=(munged)
for cmd in "${cmds[@]}"; do
  command -v "$cmd" >/dev/null || die "'$cmd' not found; run slurm/local/install.sh first"
done
[ "$(id -u)" -eq 0 ] || die "must run as root (SlurmUser=root in this configuration)"

if pid_alive "$BASE/run/slurmctld.pid"; then
  echo "slurm/local/start.sh: already running (BASE=$BASE)"
  wait_idle
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi
# Another Slurm controller on this machine would own port 6817.
if (exec 3<>/dev/tcp/127.0.0.1/6817) 2>/dev/null; then
  die "port 6817 is in use: another Slurm controller runs on this machine (stop it, or use it by exporting its SLURM_CONF)"
fi

HOST=$(hostname -s)
NODE=$(slurmd -C | head -1)     # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
[[ $NODE == NodeName=* ]] || die "unexpected 'slurmd -C' output: $NODE"
mkdir -p "$BASE/state/ctld" "$BASE/state/d" "$BASE/log" "$BASE/run"

# GPUs become generic resources ("gres") named gpu, one per /dev/nvidiaN.
GPUS=${SESSA_SLURM_GPUS:-auto}
if [ "$GPUS" = auto ]; then
  GPUS=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
fi
[[ $GPUS =~ ^[0-9]+$ ]] || die "SESSA_SLURM_GPUS must be a number or auto, not '$GPUS'"
NODE=${NODE// Gres=+([^ ])/}   # drop a Gres= slurmd -C may print; we set our own
GRESTYPES=""
rm -f "$BASE/gres.conf"
if [ "$GPUS" -gt 0 ]; then
  GRESTYPES="GresTypes=gpu"
  NODE="$NODE Gres=gpu:$GPUS"
  printf 'AutoDetect=off\nName=gpu File=/dev/nvidia[0-%d]\n' "$((GPUS - 1))" > "$BASE/gres.conf"
fi
# Slurm 22.05's slurmd loads a cgroup plugin even with proctrack/linuxproc and task/none. On a
# cgroup2 host "autodetect" picks cgroup/v2, which wants systemd (dbus) to create its scope and
# makes slurmd fail to start without it; cgroup/v1 loads fine and, unused, touches no cgroup.
echo "CgroupPlugin=cgroup/v1" > "$BASE/cgroup.conf"
sed -e "s|@BASE@|$BASE|g" -e "s|@HOST@|$HOST|g" -e "s|@AUTH@|$AUTH|g" -e "s|@NODE@|$NODE|" \
  -e "s|@GRESTYPES@|$GRESTYPES|" "$HERE/slurm.conf.in" > "$SLURM_CONF"

cd /   # daemons inherit the cwd; don't pin the caller's directory
if [ "$AUTH" = munge ]; then
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "slurm/local/start.sh: using the munged already running"
  else
    # systemd would create /run/munge (RuntimeDirectory=); without it munged refuses to start.
    install -d -o munge -g munge -m 0755 /run/munge
    [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
    runuser -u munge -- munged </dev/null >/dev/null 2>&1 || die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munged does not answer (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$BASE/run/munged.owned"
  fi
fi
# From here on a failure stops whatever this script started (stop.sh only touches our pids).
undo() { echo "slurm/local/start.sh: $*" >&2; "$HERE/stop.sh" "$BASE" >&2; exit 1; }
# Both fork into the background; their stdio goes to /dev/null, messages to $BASE/log.
slurmctld -c -i </dev/null >/dev/null 2>&1 || undo "slurmctld failed to start; see $BASE/log/slurmctld.log"
slurmd </dev/null >/dev/null 2>&1 || undo "slurmd failed to start; see $BASE/log/slurmd.log"
wait_idle || undo "giving up"
echo "slurm/local/start.sh: Slurm is up (node $HOST, $GPUS GPUs); now run: export SLURM_CONF=$SLURM_CONF"
