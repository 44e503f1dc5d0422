#!/usr/bin/env bash
# CUDA build track (DESIGN.md "Testing on machines without a GPU", track 4), run by
# .ci/run after `bash tools/test.sh`:
#
#   bash tools/cuda_build_track.sh
#
# 1. a second venv (.venv-cuda, no system site-packages) with the CUDA build of torch
#    that this machine's pip offers (OMNICACHE_CUDA_TORCH, default torch==2.14.1: cu130);
# 2. nvcc of the same CUDA major version: CUDA_HOME/CUDA_PATH, the nvcc on PATH or
#    /usr/local/cuda (setup.py resolves wrapper scripts and symlinks), else the
#    nvidia-cuda-nvcc/-cccl/-crt/-runtime and nvidia-nvvm wheels of torch's CUDA version;
# 3. the whole extension (CPU + CUDA kernels) built from a copy of the tree in
#    build/cuda-track/src (the in-place build of .venv stays untouched);
# 4. `import omnicache.ops` in a subprocess: a CPU/CUDA kernel signature mismatch aborts
#    the process at load time, which only a CUDA torch shows; the `cuda` backend must be
#    reported as built but not available (no GPU here);
# 5. tests/ops (and the signature test) on CPU against that build.
#
# When no CUDA torch or no matching nvcc can be had, it prints
# "CUDA build track: SKIPPED: <reason>" and exits 0 (exit 1 instead with
# OMNICACHE_REQUIRE_CUDA_TRACK=1); any other failure exits 1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${OMNICACHE_CUDA_VENV:-$ROOT/.venv-cuda}
TORCH_REQ=${OMNICACHE_CUDA_TORCH:-torch==2.14.1}
WORK=$ROOT/build/cuda-track
SRC=$WORK/src
PY=$VENV/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$WORK"
t0=$(date +%s)
phase_start=$t0
times=""
phase() {  # phase NAME: record the time since the previous phase
  local now; now=$(date +%s)
  times="$times $1 $((now - phase_start)) s,"
  phase_start=$now
}
skip() {
  echo "CUDA build track: SKIPPED: $*"
  [ "${OMNICACHE_REQUIRE_CUDA_TRACK:-0}" = 1 ] && exit 1
  exit 0
}
fail() {
  echo "CUDA build track: FAILED: $*" >&2
  exit 1
}

# ---------------------------------------------------------------- 1. venv, CUDA torch
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV" || skip "cannot create the venv $VENV"
fi
if ! "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "CUDA build track: installing $TORCH_REQ into $VENV (a CUDA build, several GB)"
  if ! "$PY" -m pip install -q "$TORCH_REQ" > "$WORK/pip-torch.log" 2>&1; then
    skip "pip cannot install $TORCH_REQ: $(grep -m1 -E 'ERROR' "$WORK/pip-torch.log" || tail -1 "$WORK/pip-torch.log")"
  fi
fi
TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
[ -n "$TORCH_CUDA" ] || skip "$TORCH_REQ in $VENV is not a CUDA build of torch"
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null)
MAJOR=${TORCH_CUDA%%.*}
"$PY" -m pip install -q setuptools wheel ninja numpy > "$WORK/pip-tools.log" 2>&1 \
  || fail "pip cannot install setuptools/wheel/ninja/numpy (see $WORK/pip-tools.log)"
phase "venv"

# --------------------------------------------------------------------- 2. nvcc
# The toolkit setup.py will pick (same search), and its CUDA major version.
toolkit() {
  (cd "$ROOT" && "$PY" - <<'EOF'
import re, sys
src = open("setup.py").read().split("\nsetup(\n")[0]
ns = {"__name__": "omnicache_setup_probe"}
exec(compile(src, "setup.py", "exec"), ns)
root, source = ns["find_cuda_home"]()
if root is None:
    sys.exit(source)
print(root, ns["nvcc_version"](root), sep="\t")
EOF
  )
}
found=$(toolkit 2>"$WORK/toolkit.log") || found=$(tail -1 "$WORK/toolkit.log")
root=${found%%$'\t'*}
nvcc_ver=${found#*$'\t'}
if [ "$found" = "$root" ] || [ "${nvcc_ver%%.*}" != "$MAJOR" ]; then
  why=$([ "$found" = "$root" ] && echo "$found" || echo "nvcc $nvcc_ver in $root")
  echo "CUDA build track: no CUDA $MAJOR toolkit ($why); trying the nvidia-cuda-nvcc wheels"
  wheels="nvidia-cuda-nvcc==$TORCH_CUDA.* nvidia-cuda-cccl==$TORCH_CUDA.* nvidia-cuda-crt==$TORCH_CUDA.* nvidia-cuda-runtime==$TORCH_CUDA.* nvidia-nvvm==$TORCH_CUDA.*"
  # shellcheck disable=SC2086
  if ! "$PY" -m pip install -q $wheels > "$WORK/pip-nvcc.log" 2>&1; then
    skip "no CUDA $MAJOR nvcc ($why) and pip cannot install the CUDA $TORCH_CUDA nvcc wheels: $(grep -m1 ERROR "$WORK/pip-nvcc.log")"
  fi
  root=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu$MAJOR'))")
  [ -x "$root/bin/nvcc" ] || skip "the nvidia-cuda-nvcc wheels have no bin/nvcc under $root"
  export CUDA_HOME=$root
  found=$(toolkit 2>"$WORK/toolkit.log") \
    || skip "the nvidia-cuda-nvcc wheels in $root do not form a toolkit: $(tail -1 "$WORK/toolkit.log")"
  nvcc_ver=${found#*$'\t'}
fi
export CUDA_HOME=$root
echo "CUDA build track: torch $TORCH_VERSION (CUDA $TORCH_CUDA), nvcc $nvcc_ver in $CUDA_HOME"
phase "nvcc"

# ------------------------------------------------------------- 3. build from a copy
# A copy of the tree (tracked and untracked-but-not-ignored files): the in-place build
# of .venv (CPU torch) must not be overwritten by a library linked against CUDA torch.
# (pip builds an editable install in a temporary folder: nothing to reuse, so a fresh copy.)
rm -rf "$SRC"
mkdir -p "$SRC"
(git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$SRC") \
  || fail "cannot copy the tree to $SRC"
echo "CUDA build track: building in $SRC (log: $WORK/build.log)"
if ! (cd "$SRC" && MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --no-build-isolation -v -e ".[test]" \
      > "$WORK/build.log" 2>&1); then
  tail -30 "$WORK/build.log"
  fail "the build failed (log: $WORK/build.log)"
fi
grep -q "omnicache: CUDA toolkit" "$WORK/build.log" \
  || fail "setup.py built without CUDA kernels: $(grep -m1 'building without CUDA' "$WORK/build.log")"
grep -h -m2 "omnicache: CUDA" "$WORK/build.log" | sed 's/^ */CUDA build track: /'
phase "build"

# ----------------------------------------------------- 4. import, in a subprocess
(cd "$SRC" && "$PY" - > "$WORK/import.log" 2>&1 <<'EOF'
import omnicache.ops as ops
import torch

assert ops.cuda_kernels_built(), "omnicache._C has no CUDA kernels registered"
assert "cuda" not in ops.available_backends(), ops.available_backends()
try:
    ops.set_backend("cuda")
except RuntimeError as exc:
    reason = str(exc)
    # built, so the reason is the missing device, not a missing build
    assert "'cuda'" in reason and "no CUDA device" in reason, reason
else:
    raise AssertionError("set_backend('cuda') succeeded without a GPU")
for op in ("apply_residual_", "store_residual_", "trajectory_stats", "rel_l1", "token_update_",
           "gather_tokens"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"omnicache::{op}", key), (op, key)
print("import ok: cuda built, not available (" + reason.split(": ", 1)[-1] + "); backends:",
      ", ".join(ops.available_backends()))
EOF
)
rc=$?
cat "$WORK/import.log"
if [ "$rc" -ne 0 ]; then
  [ "$rc" -gt 128 ] && fail "import omnicache.ops aborted the process (exit $rc: signal $((rc - 128)));" \
    "a CPU/CUDA kernel signature mismatch does this"
  fail "import omnicache.ops (exit $rc)"
fi
phase "import"

# ------------------------------------------------------------------- 5. tests/ops
(cd "$SRC" && "$PY" -m pytest -q -p no:cacheprovider tests/ops tests/test_kernel_signatures.py) \
  > "$WORK/pytest.log" 2>&1
rc=$?
tail -15 "$WORK/pytest.log"
phase "tests"
[ "$rc" -eq 0 ] || fail "tests/ops against the CUDA build (pytest exit $rc; log: $WORK/pytest.log)"
times=${times%,}
echo "CUDA build track: PASSED in $(( $(date +%s) - t0 )) s (${times# })"
