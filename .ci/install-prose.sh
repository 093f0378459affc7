#!/usr/bin/env bash
# Installs the Debian packages the natural-language study corpora come from (bible-kjv,
# fortunes; scone_jax/corpus/prose.py), when it can: as root with apt-get. Otherwise it says
# what to install and exits 1 (`make study-prose` cannot run without them). Instant once
# installed.
set -uo pipefail
PACKAGES=(bible-kjv fortunes)
if command -v bible >/dev/null && [ -d /usr/share/games/fortunes ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-prose: not root or no apt-get; install ${PACKAGES[*]} (Debian/Ubuntu:" \
       "sudo apt-get install ${PACKAGES[*]}) or build the corpora elsewhere and pass" \
       "PROSE_DIR=... to make" >&2
  exit 1
fi
log=$(mktemp)
if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${PACKAGES[@]}"; } >"$log" 2>&1; then
  echo "install-prose: apt-get failed; its output:" >&2
  tail -n 20 "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
