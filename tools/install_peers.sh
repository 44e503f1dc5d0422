#!/usr/bin/env bash
# The optional peers of benchmarks/compare_diffusers.py, into the project's .venv, without
# letting them replace torch, diffusers or transformers:
#
#   bash tools/install_peers.sh            # after tools/bootstrap.sh
#
# cache-dit is installed with --no-deps: its declared requirements (torch>=2.7.1,
# diffusers>=0.36, transformers>=4.55.2) are already met by the environment and must not be
# upgraded. What `import cache_dit` needs beyond them (found by importing it, python -X
# importtime): pyyaml and packaging. The version pin is the one in pyproject.toml's [peers].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CACHE_DIT=${CACHE_DIT:-cache-dit==1.5.3}

"$PY" -c "import torch, diffusers, transformers" || {
  echo "install_peers: torch, diffusers and transformers must be installed first (tools/bootstrap.sh)" >&2; exit 1; }
before=$("$PY" -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)")
"$PY" -m pip install -q --no-deps "$CACHE_DIT"
"$PY" -c "import yaml, packaging" 2>/dev/null || "$PY" -m pip install -q pyyaml packaging
after=$("$PY" -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)")
if [ "$before" != "$after" ]; then
  echo "install_peers: torch/diffusers/transformers changed ($before -> $after)" >&2; exit 1
fi
"$PY" -c "import cache_dit; print('peers: cache-dit', cache_dit.__version__, '| torch, diffusers, transformers:', '$after')"
