#!/usr/bin/env bash
# Prepares one TPU VM worker to run scone_jax; idempotent, run on every worker before each
# sweep point (`python -m scone_jax.sweeps --backend=tpu` copies it to ~/tpu_bootstrap.sh).
#
#   bash tpu_bootstrap.sh REPO REF DIR
#
# REPO: git URL (cloned once, then fetched and checked out at REF each time) or a gs://
#       folder holding the repo (rsynced each time). DIR: checkout dir, relative to $HOME.
# The pinned requirements are installed into DIR/.venv once per requirements content:
# a marker file named after their hash guards the install, so a retried (preempted) point
# costs only the code sync. JAX_TPU_SPEC overrides the TPU jax wheel
# (default: jax[tpu] at the version pinned in requirements.txt). PYTHON picks the
# interpreter (default: the first of python3, python3.13, python3.12, python3.11 that is at
# least MIN_PYTHON, pyproject.toml's requires-python); an older VM image fails here, first.
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: bash tpu_bootstrap.sh REPO REF DIR (REPO: git URL or gs:// folder)" >&2
  exit 2
fi

MIN_PYTHON=3.11
py_ok() {
  "$1" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" \
    2>/dev/null
}
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && py_ok "$candidate"; then PYTHON=$candidate; break; fi
  done
fi
if [[ -z "${PYTHON:-}" ]] || ! py_ok "$PYTHON"; then
  found=$("${PYTHON:-python3}" --version 2>&1 || echo 'no python3')
  echo "error: scone_jax needs Python >= $MIN_PYTHON on the TPU VM; found: $found." >&2
  echo "fix: install it (e.g. sudo apt-get install -y python$MIN_PYTHON python$MIN_PYTHON-venv)" \
    "or use a newer TPU VM image, then rerun; PYTHON=/path/to/python3.x picks one." >&2
  exit 3
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
# The interpreter's version is part of the hash: a new Python gets a fresh venv.
REQ_HASH=$({ cat requirements.txt pyproject.toml; "$PYTHON" --version; } | sha256sum | cut -c1-16)
MARKER=".venv/.scone_installed-$REQ_HASH"
if [[ ! -f "$MARKER" ]]; then
  rm -rf .venv
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  JAX_VERSION=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)
  .venv/bin/python -m pip install -q "${JAX_TPU_SPEC:-jax[tpu]==$JAX_VERSION}" \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$MARKER"
fi
echo "bootstrap ok: $(git rev-parse --short HEAD 2>/dev/null || echo "$REPO") in $HOME/$DIR"
