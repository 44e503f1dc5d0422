#!/usr/bin/env bash
# The main job: set-up, then `omnicache demo` on the embedded default model: every
# policy at its default against uncached sampling, on this machine's CPU (or GPU with
# --device cuda). Writes out/demo/samples.png and out/demo/demo.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/omnicache demo "$@"
