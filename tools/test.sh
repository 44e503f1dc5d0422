#!/usr/bin/env bash
# The test command: set-up, then every track of DESIGN.md "Testing on machines without a GPU".
#
#   bash tools/test.sh
#
# 1. the main suite: CPU track (C++ kernels vs reference, opcheck, compile, bad input),
#    nvcc compile track, runtime tests, and the `cuda` tests (which skip without a GPU);
# 2. the Triton interpreter track, in its own process (TRITON_INTERPRET=1 must be set
#    before triton is imported);
# 3. one call of every benchmark, as a smoke test of the benchmark code (with the peers,
#    cache-dit, installed by tools/install_peers.sh, so the diffusers comparison runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# Python must not put the checkout's root on sys.path: its kernels/ folder (installed as
# omnicache.kernels) would shadow the `kernels` package transformers >= 5 imports.
export PYTHONSAFEPATH=1
bash tools/bootstrap.sh
PY=.venv/bin/python

echo "== main suite"
"$PY" -m pytest -q -p no:cacheprovider tests
echo "== Triton interpreter track"
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/ops tests/test_triton_interpret.py
echo "== peers for the comparison smoke run (cache-dit, --no-deps)"
bash tools/install_peers.sh
echo "== benchmark smoke run"
"$PY" -m pytest -q -p no:cacheprovider benchmarks --benchmark-disable
