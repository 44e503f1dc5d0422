"""tools/gpu_check.sh on CPU: the dry run (plan, every command and file exists), the
benchmark flags it passes exist, and summary.json is written when no step can run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = ["build", "import", "cuda-tests", "memcheck", "racecheck", "bench-ops", "e2e-xl2", "e2e-video"]


def _run(tmp_path, *args, **env):
    full_env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_plans_every_step_and_finds_everything(tmp_path):
    proc = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planned = [line.split()[0] for line in proc.stdout.splitlines()
               if line.split() and line.split()[0] in STEPS]
    assert planned == STEPS
    assert "MISSING" not in proc.stdout
    assert "dry run ok" in proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_benchmark_flags_exist(tmp_path):
    plan = _run(tmp_path, "--dry-run").stdout
    for script in ("benchmarks/bench_ops.py", "benchmarks/gpu_e2e.py"):
        used = set()
        for line in plan.splitlines():
            if script in line:
                used |= set(re.findall(r"\s(--[a-z][a-z0-9-]*)", line.split(script, 1)[1]))
        assert used, script
        help_text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES="")).stdout
        missing = sorted(flag for flag in used if flag not in help_text)
        assert not missing, f"{script} does not take {missing}"


def test_summary_written_when_the_budget_is_spent(tmp_path):
    proc = _run(tmp_path, GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert {s["status"] for s in summary["steps"]} == {"skipped"}
    for key in ("date", "torch", "cuda", "device", "triton", "budget_s"):
        assert key in summary, key
