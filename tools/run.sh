#!/usr/bin/env bash
# The main job: set-up, then the op benchmark on this machine's device (CUDA if
# present, else CPU), which writes its JSON to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/python benchmarks/bench_ops.py "$@"
