#!/usr/bin/env bash
# Installs the Debian SLURM packages the SLURM tests start (tests/slurm_fixture.py), when
# it can: as root with apt-get. Otherwise it says why and exits 0: those tests then skip,
# naming the reason. Idempotent and instant once installed (no apt-get call then).
set -uo pipefail
PACKAGES=(slurmctld slurmd slurm-client)
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-slurm: not root or no apt-get; the SLURM tests will skip" \
       "(as root: apt-get install --no-install-recommends ${PACKAGES[*]})" >&2
  exit 0
fi
log=$(mktemp)
# apt does not start the daemons on these machines; the fixture starts its own.
if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${PACKAGES[@]}"; } >"$log" 2>&1; then
  echo "install-slurm: apt-get failed (the SLURM tests will skip); its output:" >&2
  tail -n 20 "$log" >&2
fi
rm -f "$log"
exit 0
