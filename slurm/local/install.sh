#!/usr/bin/env bash
# slurm/local/install.sh - install Debian's Slurm daemons and client (and munge) if missing.
#
# Usage: slurm/local/install.sh            (as root, on Debian/Ubuntu; needs network to the
#                                           package mirror)
# Env:   SLURM_INSTALL_TIMEOUT=300          seconds allowed for each apt-get call
#
# Installs slurmctld, slurmd, slurm-client and munge with --no-install-recommends (8 packages,
# ~13 MB). The packages' postinst would start the services through systemd; where there is no
# systemd (containers) policy-rc.d blocks that, which is what we want: start.sh runs the daemons
# by hand. Exit codes: 0 installed (or already there), 2 cannot install here (not root, no
# apt-get, apt failed or timed out) with the reason on stderr.
set -euo pipefail

need=(slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged munge)
missing=()
for cmd in "${need[@]}"; do
  PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "slurm/local/install.sh: Slurm and munge already installed"
  exit 0
fi

fail() { echo "slurm/local/install.sh: cannot install Slurm: $*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || fail "not root (missing: ${missing[*]}); run as root or install slurmctld slurmd slurm-client munge yourself"
command -v apt-get >/dev/null 2>&1 || fail "no apt-get on this machine (missing: ${missing[*]})"

limit=${SLURM_INSTALL_TIMEOUT:-300}
export DEBIAN_FRONTEND=noninteractive
echo "slurm/local/install.sh: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
timeout "$limit" apt-get update -qq || fail "apt-get update failed or took longer than ${limit}s"
timeout "$limit" apt-get install -y -qq --no-install-recommends \
  slurmctld slurmd slurm-client munge || fail "apt-get install failed or took longer than ${limit}s"
echo "slurm/local/install.sh: done"
