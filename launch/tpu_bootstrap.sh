#!/usr/bin/env bash
# Prepares one TPU VM worker to run scone_jax; idempotent, run on every worker before each
# sweep point (launch/sweep.py --backend=tpu copies it to ~/tpu_bootstrap.sh).
#
#   bash tpu_bootstrap.sh REPO REF DIR
#
# REPO: git URL (cloned once, then fetched and checked out at REF each time) or a gs://
#       folder holding the repo (rsynced each time). DIR: checkout dir, relative to $HOME.
# The pinned requirements are installed into DIR/.venv once per requirements content:
# a marker file named after their hash guards the install, so a retried (preempted) point
# costs only the code sync. JAX_TPU_SPEC overrides the TPU jax wheel
# (default: jax[tpu] at the version pinned in requirements.txt).
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: bash tpu_bootstrap.sh REPO REF DIR (REPO: git URL or gs:// folder)" >&2
  exit 2
fi
REPO="$1"; REF="$2"; DIR="$3"
cd "$HOME"

# Several ssh sessions may reach one worker (a retried point): serialize them.
exec 9>"$HOME/.scone_bootstrap.lock"
flock 9

if [[ "$REPO" == gs://* ]]; then
  mkdir -p "$DIR"
  gcloud storage rsync --recursive --delete-unmatched-destination-objects \
    --exclude='^\.venv/|^runs/' "$REPO" "$DIR"
elif [[ -d "$DIR/.git" ]]; then
  git -C "$DIR" fetch --quiet origin "$REF"
  git -C "$DIR" checkout --quiet --force FETCH_HEAD
else
  git clone --quiet "$REPO" "$DIR"
  git -C "$DIR" checkout --quiet "$REF"
fi

cd "$DIR"
REQ_HASH=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
MARKER=".venv/.scone_installed-$REQ_HASH"
if [[ ! -f "$MARKER" ]]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  JAX_VERSION=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)
  .venv/bin/python -m pip install -q "${JAX_TPU_SPEC:-jax[tpu]==$JAX_VERSION}" \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$MARKER"
fi
echo "bootstrap ok: $(git rev-parse --short HEAD 2>/dev/null || echo "$REPO") in $HOME/$DIR"
