"""Smoke test of benchmarks/device_mode.py: a tiny run writes a complete result file."""

import json
import sys

import pytest

pytest.importorskip("diffusers")
sys.path.insert(0, __file__.rsplit("/", 1)[0])

import device_mode  # noqa: E402


def test_device_mode_benchmark_smoke(tmp_path):
    out = tmp_path / "device-mode.json"
    result = device_mode.main(["--quick", "--reps", "1", "--steps", "5", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["same_decisions"] is True and result["same_decisions"] is True
    assert {r["system"] for r in saved["table"]} == {"host", "device", "device-where", "diffusers-fbc", "host+compile", "device+compile"}
    assert all(len(saved["raw"][n]) == 1 and len(saved["raw"][n][0]["times_s"]) == 5 for n in saved["raw"])
    assert saved["torch"] and saved["cpu"] and saved["date"]
    assert "| device |" in device_mode.table(saved)


def test_flops_comparison_smoke(tmp_path):
    out = tmp_path / "flops.json"
    result = device_mode.main(["--flops", "--quick", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and rows == result["rows"]
    for r in rows:
        assert r["same_decisions"] is True
        assert r["device_flops_sub_batch"] == pytest.approx(r["host_sub_batch"], rel=1e-12)
        assert r["device_where_mix"] >= r["host_sub_batch"]
