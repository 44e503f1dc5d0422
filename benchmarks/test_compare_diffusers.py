"""Smoke test of benchmarks/compare_diffusers.py: its --quick mode on a few systems (ours,
diffusers' own hooks, cache-dit when installed), nothing written.

    pytest benchmarks/test_compare_diffusers.py
"""

import importlib.util
import math
import pathlib
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' FluxPipeline imports it

HERE = pathlib.Path(__file__).resolve().parent
HAVE_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


def _module():
    spec = importlib.util.spec_from_file_location("compare_diffusers", HERE / "compare_diffusers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_quick_smoke():
    cd = _module()
    only = ["ours: FORA", "ours: FirstBlockCache", "diffusers: FirstBlockCache", "DBCache F1B0"]
    report = cd.main(["--quick", "--no-compile", "--no-write", "--only", *only])
    block = report["per_steps"]["8"]
    rows = {r["system"]: r for r in block["rows"]}
    assert rows["uncached"]["compute_fraction"] == 1.0 and math.isinf(rows["uncached"]["psnr"])
    for name in ("ours: FORA", "ours: FirstBlockCache", "diffusers: FirstBlockCache"):
        r = rows[name]
        assert 0.0 < r["compute_fraction"] < 1.0, name  # something was reused
        assert r["psnr"] > 10 and 0.0 <= r["class_acc"] <= 1.0 and r["repeatable"], name
    # the same decisions cost the same FLOPs in ours and diffusers' FirstBlockCache
    assert block["cached_step_cost"]["same_flops"]
    if HAVE_CACHE_DIT:
        assert "cache-dit: DBCache F1B0" in rows  # runs (8 steps stay inside its 8 warm-up steps)
    else:
        assert any(s["system"].startswith("cache-dit") for s in report["skipped"])


@pytest.mark.parametrize("bounded", [False, True])
def test_tuner_widens_only_unbounded_float_knobs(bounded):
    """The shared search widens a threshold past its first bracket, and keeps a bounded knob
    (ToCa's reused share R) within its range, returning the nearest point it reached."""
    cd = _module()
    knob = ("x", "float", 0.0, 1.0, True) if bounded else ("x", "float", 0.0, 1.0)
    system = cd.System("fake", "ours", None, knob)
    tuner = cd.Tuner(system, ctx=None, ref_flops=1.0, bisect=8)
    tuner.fraction = lambda k, target: tuner.memo.setdefault(k, 1.0 / (1.0 + k))  # falls as the knob grows
    best = tuner.tune(0.4)  # reached at x = 1.5, beyond the first bracket
    if bounded:
        assert max(tuner.memo) <= 1.0 and best == 1.0
    else:
        assert max(tuner.memo) > 1.0 and abs(1.0 / (1.0 + best) - 0.4) <= cd.TOLERANCE
