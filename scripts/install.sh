#!/usr/bin/env bash
# Install vlselect into ./.venv (or $VLSELECT_VENV) from the lock, idempotently.
#   1. every distribution at the exact version and hash of constraints/cpu.lock
#      (constraints/gpu.lock with GPU=1), with --no-deps: the lock is the whole set;
#   2. the project itself, editable, with no build isolation (its build backend is locked too).
# Re-run after the lock changes and it brings the venv to the new lock: packages the lock
# does not name are uninstalled (tests/test_lock.py compares the venv with its lock).
# Refresh the lock with `make lock` (scripts/lock.sh), never by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLSELECT_VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=constraints/cpu.lock
if [ "${GPU:-0}" = "1" ]; then LOCK=constraints/gpu.lock; fi

# The locks are for CPython 3.11 on x86_64 Linux; elsewhere say so before pip does, obscurely.
here=$("$PYTHON" -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]} {platform.system()} {platform.machine()}")')
if [ "$here" != "3.11 Linux x86_64" ]; then
  echo "install.sh: $LOCK is for CPython 3.11 on Linux x86_64; $PYTHON is $here." >&2
  echo "  Set PYTHON=python3.11 on such a machine, or install from the ranges of pyproject.toml" >&2
  echo "  into your own environment: pip install -e '.[dev]' (untested versions)." >&2
  exit 2
fi

# The stamp names the lock the venv was made from: tests/test_lock.py holds the venv to it.
stamp="$VENV/.vlselect-installed"
want="$(cat pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1) $LOCK"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0  # already installed from this lock
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
echo "install.sh: installing $LOCK into $VENV (a few minutes the first time)"
# This machine's pip.conf may name local indexes that hold a few packages; pip warns once per
# package it does not find there, which says nothing about the install: those lines go.
unlisted='/is ignored: it is neither a file nor a directory/d'
$PIP install -q --require-hashes --no-deps -r "$LOCK" 2>&1 | sed "$unlisted"
# setuptools warns at every editable install of a multi-package layout that a folder named
# like a package can shadow it; here those folders are the package.
PYTHONWARNINGS="ignore:Editable installation" \
  $PIP install -q --no-deps --no-build-isolation -e . 2>&1 | sed "$unlisted"
# Packages the lock does not name (left from an older lock, or installed by hand) go.
extra=$("$VENV/bin/python" scripts/lock_diff.py "$LOCK" --extra-only)
if [ -n "$extra" ]; then
  echo "install.sh: removing packages the lock does not name: $extra"
  # shellcheck disable=SC2086
  $PIP uninstall -q -y $extra
fi
"$VENV/bin/python" scripts/lock_diff.py "$LOCK"
"$VENV/bin/python" -c "import torch, torchvision, ray; print('vlselect env: torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__)"
echo "$want" > "$stamp"
