#!/usr/bin/env bash
# The GPU check: what a session with an H100/H200 runs once, within 8 minutes.
#
#   bash tools/gpu_check.sh              # run every step, results under $OUT (default ./out/gpu)
#   bash tools/gpu_check.sh --dry-run    # print the plan, check that every command and file exists (CPU ok)
#
# Steps, in order of importance, each with its own timeout, all inside one overall budget
# (GPU_CHECK_BUDGET_S, default 460 s: a step never runs past what is left of it); a failed
# or timed-out step is recorded and the next one runs:
#
#   build      pip install --no-build-isolation --no-deps -e .  (the machine's CUDA torch;
#              setup.py finds the toolkit and builds sm_80, sm_90a and compute_90 PTX)
#   import     import omnicache.ops in a subprocess; the cuda backend must be available
#   cuda-tests pytest -m cuda tests        (CUDA and Triton backends vs reference, opcheck,
#                                          compile, CUDA-graph capture and replay, incl. a whole
#                                          dynamic mode="device" step with torch.cond as CUDA
#                                          conditional nodes: tests/test_device_mode.py,
#                                          tests/test_diffusers_device.py)
#   memcheck   compute-sanitizer --tool memcheck  pytest tests/ops/test_cuda.py (kernel tests)
#   racecheck  compute-sanitizer --tool racecheck pytest tests/ops/test_cuda.py (kernel tests)
#              (skipped, and recorded so, when compute-sanitizer is not installed)
#   bench-ops  python benchmarks/bench_ops.py (16M elements, bf16 and fp32)
#   e2e-xl2    python benchmarks/gpu_e2e.py --model xl2 (eager and CUDA graphs)
#   e2e-video  python benchmarks/gpu_e2e.py --model video (eager, 10 steps, NoCache and OmniCache)
#
# Every log and result file goes under $OUT; $OUT/summary.json holds the device name,
# the torch/triton/CUDA versions, the date, and per step its command, status (passed,
# failed, timeout, skipped), exit code and wall time. Exit status: 0 when every step that
# ran passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
# Python must not put the checkout's root on sys.path: its kernels/ folder (installed as
# omnicache.kernels) would shadow the `kernels` package transformers >= 5 imports.
export PYTHONSAFEPATH=1
ROOT=$PWD
OUT=${OUT:-$ROOT/out/gpu}
PY=${PYTHON:-python3}  # the machine's python with its CUDA torch
BUDGET=${GPU_CHECK_BUDGET_S:-460}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash tools/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
SANITIZER=$(command -v compute-sanitizer || true)
for dir in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  [ -z "$SANITIZER" ] && [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ] && SANITIZER=$dir/bin/compute-sanitizer
done
export PYTHONUNBUFFERED=1
STEPS_TSV=$OUT/steps.tsv
if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT"
  : > "$STEPS_TSV"
fi
t0=$(date +%s)
missing=0

# step NAME TIMEOUT_S NEEDS -- CMD...: NEEDS is a comma list of files/commands that must
# exist (a missing one fails the step; "sanitizer" skips it when compute-sanitizer is absent).
step() {
  local name=$1 limit=$2 needs=$3; shift 4
  local cmd="$*" need status rc start wall left
  if [ "$DRY" = 1 ]; then
    local ok=ok
    for need in ${needs//,/ }; do
      if [ "$need" = sanitizer ]; then
        [ -n "$SANITIZER" ] || ok="would skip: no compute-sanitizer"
      elif [ ! -e "$need" ] && ! command -v "$need" > /dev/null 2>&1; then
        ok="MISSING $need"; missing=1
      fi
    done
    printf '%-10s %4ss  %s  [%s]\n' "$name" "$limit" "$cmd" "$ok"
    return 0
  fi
  left=$(( BUDGET - ($(date +%s) - t0) ))
  [ "$limit" -gt "$left" ] && limit=$left
  for need in ${needs//,/ }; do
    if [ "$need" = sanitizer ] && [ -z "$SANITIZER" ]; then
      printf '%s\tskipped\t\t0\t%s\tno compute-sanitizer on PATH or in CUDA_HOME/bin\n' "$name" "$cmd" >> "$STEPS_TSV"
      echo "gpu check: $name: skipped (no compute-sanitizer)"; return 0
    fi
  done
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t\t0\t%s\tthe overall budget (%s s) is spent\n' "$name" "$cmd" "$BUDGET" >> "$STEPS_TSV"
    echo "gpu check: $name: skipped (budget spent)"; return 0
  fi
  echo "gpu check: $name (timeout ${limit} s): $cmd"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  wall=$(( $(date +%s) - start ))
  case $rc in
    0) status=passed ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$wall" "$cmd" "$name.log" >> "$STEPS_TSV"
  echo "gpu check: $name: $status (exit $rc, ${wall} s); log $OUT/$name.log"
  [ "$status" = passed ] || tail -5 "$OUT/$name.log" | sed 's/^/    /'
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
CHECK_IMPORT='import omnicache.ops as o, torch; b = o.available_backends(); print(torch.cuda.get_device_name(0), b); assert "cuda" in b and "triton" in b, b'

echo "gpu check: python $PY, results in $OUT, budget ${BUDGET} s"
[ "$DRY" = 1 ] && echo "gpu check: plan (--dry-run: nothing runs)"
step build      240 "$PY,setup.py,pyproject.toml" -- "$PY" -m pip install --no-build-isolation --no-deps -v -e .
step import      60 "$PY"                         -- "$PY" -c "$CHECK_IMPORT"
step cuda-tests 150 "$PY,tests"                   -- "${PYTEST[@]}" -m cuda tests --junitxml="$OUT/cuda-tests.xml"
# The kernels under the sanitizers: every op, shape, dtype and backend vs reference,
# the repeat and CUDA-graph tests (not opcheck/compile: slow under the tools, no new
# kernel paths). memcheck without torch's caching allocator, so that an access past a
# tensor's end is past an allocation's end.
SANITIZED=(-x tests/ops/test_cuda.py -k "match_reference or bitwise_on_repeat or graph_capture")
step memcheck    75 "sanitizer,tests/ops/test_cuda.py" -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  "${SANITIZER:-compute-sanitizer}" --tool memcheck --error-exitcode 99 \
  --log-file "$OUT/memcheck.sanitizer.log" "${PYTEST[@]}" "${SANITIZED[@]}"
step racecheck   75 "sanitizer,tests/ops/test_cuda.py" -- "${SANITIZER:-compute-sanitizer}" --tool racecheck \
  --error-exitcode 99 --log-file "$OUT/racecheck.sanitizer.log" "${PYTEST[@]}" "${SANITIZED[@]}"
step bench-ops   90 "benchmarks/bench_ops.py"     -- "$PY" benchmarks/bench_ops.py --device cuda --numel 16777216 \
  --dtype bfloat16 float32 --out "$OUT/bench_ops.json"
step e2e-xl2     90 "benchmarks/gpu_e2e.py"       -- "$PY" benchmarks/gpu_e2e.py --device cuda --model xl2 \
  --cuda-graphs both --repeats 3 --out "$OUT/gpu_e2e-xl2.json"
# video: 32761 tokens x 30 blocks is ~0.5 s a step on an H200; 10 steps, two policies.
step e2e-video   90 "benchmarks/gpu_e2e.py"       -- "$PY" benchmarks/gpu_e2e.py --device cuda --model video \
  --cuda-graphs off --steps 10 --policies nocache omnicache --repeats 1 --out "$OUT/gpu_e2e-video.json"

if [ "$DRY" = 1 ]; then
  [ "$missing" = 0 ] && echo "gpu check: dry run ok (every command and file exists)" && exit 0
  echo "gpu check: dry run: something is missing" >&2; exit 1
fi

# summary.json: device, versions, date, the steps.
timeout 60 "$PY" - "$STEPS_TSV" "$OUT/summary.json" "$BUDGET" "$(( $(date +%s) - t0 ))" <<'EOF'
import datetime, json, platform, subprocess, sys
tsv, out, budget, wall = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(), "budget_s": budget, "wall_s": wall}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as exc:  # noqa: BLE001
    info["torch_error"] = repr(exc)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    info["triton_error"] = repr(exc)
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:  # noqa: BLE001
    info["driver"] = None
steps = []
for line in open(tsv):
    name, status, rc, wall_s, cmd, log = line.rstrip("\n").split("\t")
    steps.append({"name": name, "status": status, "exit": int(rc) if rc else None,
                  "wall_s": int(wall_s), "command": cmd,
                  **({"log": log} if log.endswith(".log") else {"reason": log})})
info["steps"] = steps
json.dump(info, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in info.items() if k != "steps"}))
EOF
echo "gpu check: finished in $(( $(date +%s) - t0 )) s; summary $OUT/summary.json"
cut -f1,2,4 "$STEPS_TSV" | awk -F'\t' '{printf "  %-10s %-8s %4s s\n", $1, $2, $3}'
! cut -f2 "$STEPS_TSV" | grep -qE 'failed|timeout'
