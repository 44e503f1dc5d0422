"""The GPU end-to-end benchmark script on CPU (tiny model), and the measured backend table.

``benchmarks/gpu_e2e.py --device cpu --model tiny`` must run end to end on a CPU-only
machine and write the result file with the keys the GPU run writes;
``omnicache.backend_table.choose`` reads ``omnicache/data/auto_backend.json`` (written by
``benchmarks/auto_backend.py`` on a GPU) and refuses a malformed file by field.
"""

import json
import math
import os
import pathlib
import pickle
import re
import subprocess
import sys

import pytest

from omnicache import backend_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_e2e.py"
KEYS = ("policy", "compute_fraction", "ideal_speedup", "measured_speedup", "host_syncs_per_step",
        "cuda_graphs", "peak_mem_GB", "cache_mem_GB")


@pytest.fixture(scope="module")
def e2e_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "tiny", "--steps", "4",
           "--policies", "nocache", "fora", "taylorseer", "omnicache", "l2c", "fbc", "--repeats", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_e2e_header(e2e_result):
    doc, stdout = e2e_result
    for key in ("device", "model", "tokens", "batch", "steps", "results", "torch", "date", "command"):
        assert key in doc, key
    assert doc["model"] == "tiny" and doc["steps"] == 4 and doc["batch"] == 2
    assert doc["tokens"] == 16  # 8x8 latent, patch 2
    assert "written to" in stdout


def test_e2e_results(e2e_result):
    doc, _ = e2e_result
    by = {r["policy"]: r for r in doc["results"]}
    assert set(by) == {"NoCache", "FORA", "TaylorSeer", "OmniCache", "L2C", "FirstBlockCache"}
    for r in doc["results"]:
        for key in KEYS:
            assert key in r, (r["policy"], key)
        assert "error" not in r, r
        assert r["cuda_graphs"] is None and r["peak_mem_GB"] is None  # not applicable on CPU
        assert 0 < r["compute_fraction"] <= 1
        assert math.isclose(r["ideal_speedup"], 1 / r["compute_fraction"])
        assert r["measured_speedup"] > 0 and r["median_s"] > 0 and len(r["runs_s"]) == 2
        assert r["cache_mem_GB"] >= 0 and r["finite"]
        assert r["max_abs_diff_vs_reference"] == 0.0  # the timed loop computes what CacheExecutor.run does
    assert by["NoCache"]["compute_fraction"] == 1 and by["NoCache"]["measured_speedup"] == 1
    assert by["NoCache"]["cache_mem_GB"] == 0
    for name in ("FORA", "TaylorSeer", "OmniCache", "L2C"):  # static plans: no read-backs at all
        assert by[name]["host_syncs_per_step"] == 0, name
        assert by[name]["compute_fraction"] < 1 and by[name]["cache_mem_GB"] > 0
    # The dynamic policy reads its decision back once per step after the first: a real count.
    assert by["FirstBlockCache"]["host_syncs_per_step"] == pytest.approx(3 / 4)
    assert by["L2C"]["standin"] is True and 0.3 < by["L2C"]["branches_removed"] <= 0.5


def test_l2c_standin_plan():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_e2e
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    plan = gpu_e2e.l2c_standin_plan(50, 28, 0.45)
    assert plan.granularity == "branch"
    removed = sum(not v for row in plan.compute for pair in row for v in pair) / (50 * 28 * 2)
    assert removed == pytest.approx(0.45, abs=0.02) and plan.meta["branches_removed"] == removed
    assert all(all(all(pair) for pair in plan.compute[i]) for i in range(0, 50, 2))  # full steps


# ------------------------------------------------------------------ backend_table
def _table(**over):
    t = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13", "triton": "3.9", "date": "2026-01-01",
         "choices": {"rel_l1": [[1024, "triton"], [1 << 20, "cuda"], [None, "triton"]],
                     "apply_residual_": [[4096, "cuda"], [65536, "triton"]]}}
    t.update(over)
    return t


def _write(tmp_path, obj, name="auto_backend.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    backend_table.clear_cache()
    return p


def test_choose_present(tmp_path):
    p = _write(tmp_path, _table())
    dev = "NVIDIA H100 80GB HBM3"
    assert backend_table.choose("rel_l1", 1, dev, path=p) == "triton"
    assert backend_table.choose("rel_l1", 1024, dev, path=p) == "triton"
    assert backend_table.choose("rel_l1", 1025, dev, path=p) == "cuda"
    assert backend_table.choose("rel_l1", 1 << 20, dev, path=p) == "cuda"
    assert backend_table.choose("rel_l1", 1 << 30, dev, path=p) == "triton"  # null bound: any size
    assert backend_table.choose("apply_residual_", 10**9, dev, path=p) == "triton"  # beyond last: last
    assert backend_table.choose("trajectory_stats", 100, dev, path=p) is None  # op not measured
    assert backend_table.choose("rel_l1", 100, "NVIDIA H200", path=p) is None  # another device


def test_choose_absent(tmp_path):
    backend_table.clear_cache()
    assert backend_table.choose("rel_l1", 100, "NVIDIA H100 80GB HBM3", path=tmp_path / "nope.json") is None
    if not backend_table.DEFAULT_PATH.exists():
        assert backend_table.choose("rel_l1", 100, "NVIDIA H100 80GB HBM3") is None


@pytest.mark.parametrize("change, field", [
    (dict(device=""), "device"),
    (dict(torch=3), "torch"),
    (dict(triton=1.0), "triton"),
    (dict(choices=[]), "choices"),
    (dict(choices={"nope": [[1, "cuda"]]}), "choices.nope"),
    (dict(choices={"rel_l1": []}), "choices.rel_l1"),
    (dict(choices={"rel_l1": [[1, "cuda", 3]]}), "choices.rel_l1[0]"),
    (dict(choices={"rel_l1": [[0, "cuda"]]}), "choices.rel_l1[0][0]"),
    (dict(choices={"rel_l1": [[8, "cuda"], [8, "triton"]]}), "choices.rel_l1[1][0]"),
    (dict(choices={"rel_l1": [[True, "cuda"]]}), "choices.rel_l1[0][0]"),
    (dict(choices={"rel_l1": [[None, "cuda"], [8, "triton"]]}), "choices.rel_l1[0][0]"),
    (dict(choices={"rel_l1": [[8, "torch"]]}), "choices.rel_l1[0][1]"),
    (dict(extra=1), "extra"),
])
def test_choose_malformed_names_field(tmp_path, change, field):
    p = _write(tmp_path, _table(**change))
    with pytest.raises(ValueError, match=re.escape(f"{p}: {field}:")):
        backend_table.choose("rel_l1", 100, "NVIDIA H100 80GB HBM3", path=p)


def test_choose_missing_field(tmp_path):
    t = _table()
    del t["date"]
    p = _write(tmp_path, t)
    with pytest.raises(ValueError, match=r": date: missing"):
        backend_table.choose("rel_l1", 100, "x", path=p)


def test_choose_never_unpickles(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    p = tmp_path / "auto_backend.json"
    p.write_bytes(pickle.dumps(_table(), protocol=4))
    backend_table.clear_cache()
    with pytest.raises(ValueError, match="never a pickle|not valid JSON"):
        backend_table.choose("rel_l1", 100, "NVIDIA H100 80GB HBM3", path=p)
    p.write_text("{not json")
    backend_table.clear_cache()
    with pytest.raises(ValueError, match="not valid JSON"):
        backend_table.choose("rel_l1", 100, "NVIDIA H100 80GB HBM3", path=p)
    p.write_text("[1, 2]")
    backend_table.clear_cache()
    with pytest.raises(ValueError, match="top level must be a JSON object"):
        backend_table.choose("rel_l1", 100, "NVIDIA H100 80GB HBM3", path=p)


def test_table_from_timings_roundtrip(tmp_path):
    timings = {"rel_l1": {4096: {"cuda": 2e-6, "triton": 1e-6}, 65536: {"cuda": 3e-6, "triton": 2e-6},
                          1 << 20: {"cuda": 5e-6, "triton": 9e-6}, 1 << 24: {"cuda": 5e-5, "triton": float("nan")}},
               "store_residual_": {4096: {"cuda": 1e-6, "triton": 2e-6}}}
    t = backend_table.table_from_timings(timings, device="dev", torch_version="2", triton_version=None,
                                         date="2026-01-01")
    assert t["choices"]["rel_l1"] == [[65536, "triton"], [None, "cuda"]]
    assert t["choices"]["store_residual_"] == [[None, "cuda"]]
    p = _write(tmp_path, t)
    assert backend_table.choose("rel_l1", 65536, "dev", path=p) == "triton"
    assert backend_table.choose("rel_l1", 65537, "dev", path=p) == "cuda"
