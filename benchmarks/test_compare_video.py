"""Smoke test of benchmarks/compare_video.py: its --quick mode on a few systems (PAB,
T-GATE, OmniCache, diffusers' PAB), nothing written.

    pytest benchmarks/test_compare_video.py
"""

import importlib.util
import math
import pathlib
import sys

import pytest

pytest.importorskip("diffusers")

HERE = pathlib.Path(__file__).resolve().parent


def _module():
    spec = importlib.util.spec_from_file_location("compare_video", HERE / "compare_video.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quick_smoke():
    cv = _module()
    only = ["PAB-slow", "ours: T-GATE", "OmniCache + correction", "diffusers: PyramidAttentionBroadcast"]
    report = cv.main(["--quick", "--no-compile", "--no-write", "--only", *only])
    block = report["per_steps"]["6"]
    rows = {(r["system"], r["target"]): r for r in block["rows"]}
    ref = rows[("uncached", None)]
    assert ref["compute_fraction"] == 1.0 and math.isinf(ref["psnr"]) and math.isinf(ref["motion_psnr"])
    assert 0.0 <= ref["class_acc"] <= 1.0
    pab = rows[("ours: PAB-slow", None)]  # a fixed setting: one row, no target
    assert 0.0 < pab["compute_fraction"] < 1.0 and pab["psnr"] > 10
    omni = rows[("ours: OmniCache + correction", 0.5)]
    assert abs(omni["compute_fraction"] - 0.5) <= 0.03 and omni["repeatable"]
    assert ("diffusers: PyramidAttentionBroadcast", 0.5) in rows
    assert "0.5" in block["targets_check"]
    assert "OmniCache-slow" in cv.format_table(block)
