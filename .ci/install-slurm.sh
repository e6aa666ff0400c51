#!/usr/bin/env bash
# Install what tests/cluster/test_slurm.py needs to run a throw-away local Slurm cluster:
# slurmctld + slurmd + the client tools (sbatch, srun, scontrol, ...) + munge.
#
# Debian 12 ships Slurm 22.05. The packages' postinst scripts try to start the
# daemons through systemd/init; there is no init in CI containers, so that part
# is a no-op and tests/slurm_cluster.py starts munged, slurmctld and slurmd by
# hand. Idempotent: does nothing when everything is already installed.
#
# Usage: .ci/install-slurm.sh            (as root, or with sudo available)
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch scontrol munged unshare; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "install-slurm: already installed ($(slurmd -V))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install-slurm: need root (or sudo) to apt-get install; the Slurm tests will skip" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# `update` only when the package lists are missing (fresh containers): it is
# the slow part, and the install works from a populated cache.
if ! apt-cache show slurmctld >/dev/null 2>&1; then
    $SUDO apt-get update -qq
fi
# util-linux provides unshare (per-node hostnames); it is Essential on Debian
# but listed so a slimmed image still gets it.
$SUDO apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge util-linux
echo "install-slurm: installed $(slurmd -V)"
