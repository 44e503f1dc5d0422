#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv, torch (an installed torch
# is used as it is, never upgraded), the dependencies, and omnicache built in place.
#
#   bash tools/bootstrap.sh          # idempotent; rebuilds only when csrc/ or setup changed
#
# OMNICACHE_TORCH: the torch requirement to install when none is importable
# (default torch==2.13.0, the CPU build these machines carry).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # System site-packages: a torch that the machine already has (a CUDA build on a GPU
  # machine) is the one used, so no second torch is ever pulled.
  "$PYTHON" -m venv --system-site-packages .venv
fi
PY=.venv/bin/python

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "omnicache: installing ${OMNICACHE_TORCH:-torch==2.13.0}"
  "$PY" -m pip install -q "${OMNICACHE_TORCH:-torch==2.13.0}"
fi

stamp=.venv/.omnicache-build
want=$(cat setup.py pyproject.toml csrc/*.cpp csrc/*.h csrc/*/* 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import omnicache.ops" 2>/dev/null; then
  echo "omnicache: building (torch stays outside build isolation)"
  "$PY" -m pip install -q setuptools wheel ninja pybind11
  # Build output (e.g. "building without CUDA kernels (...)") goes to the log.
  if ! "$PY" -m pip install --no-build-isolation -v -e ".[test,diffusers]" > .venv/build.log 2>&1; then
    tail -40 .venv/build.log
    echo "omnicache: build failed; full log in .venv/build.log" >&2
    exit 1
  fi
  grep -h -m1 "omnicache: building without" .venv/build.log | sed "s/^ *//" || true
  echo "$want" > "$stamp"
fi
"$PY" -c "import omnicache.ops as o, torch; print('omnicache: ready; torch', torch.__version__, '| backends:', ', '.join(o.available_backends()))"
