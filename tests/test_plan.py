"""CachePlan: JSON round trip, validation that names the bad field, fit to a model."""

import json

import pytest
import torch

from omnicache.plan import CachePlan
from omnicache.policies import FORAConfig, TaylorSeerConfig
from omnicache.runtime import make_dit


def plan_dict(**overrides):
    d = TaylorSeerConfig(interval=2, order=2, warmup=1).plan(6, 3).to_dict()
    d.update(overrides)
    return d


def write(tmp_path, d):
    path = tmp_path / "plan.json"
    path.write_text(d if isinstance(d, str) else json.dumps(d))
    return path


@pytest.mark.parametrize("granularity", ["step", "block", "branch"])
def test_round_trip(tmp_path, granularity):
    plan = TaylorSeerConfig(interval=3, order=2, warmup=2, granularity=granularity).plan(10, 4)
    plan.save(tmp_path / "p.json")
    loaded = CachePlan.load(tmp_path / "p.json")
    assert loaded == plan
    assert loaded.meta["policy"] == "TaylorSeer"
    text = (tmp_path / "p.json").read_text()
    assert text.count("\n") > 10  # human-readable: one step per line, not one long line


def test_tensor_compute_and_full():
    plan = FORAConfig(interval=2).plan(4, 2)
    again = CachePlan(4, 2, "branch", plan.compute_tensor())
    assert again.compute == plan.compute
    full = CachePlan.full(3, 2)
    assert full.compute_tensor().all() and full.gamma == [0.0] * 3


@pytest.mark.parametrize("overrides, field", [
    ({"version": 3}, "CachePlan.version"),
    ({"branches": ["attn", "oops"]}, "CachePlan.branches[1]"),
    ({"branches": ["attn", "self_attn"]}, "CachePlan.branches"),
    ({"branches": ["mlp", "mlp"]}, "CachePlan.branches"),
    ({"branches": ["self_attn", "cross_attn", "mlp"], "granularity": "branch"}, "CachePlan.compute[0][0]"),
    ({"granularity": "layer"}, "CachePlan.granularity"),
    ({"steps": 0}, "CachePlan.steps"),
    ({"blocks": 1.5}, "CachePlan.blocks"),
    ({"compute": [[[True, True]] * 3] * 5}, "CachePlan.compute"),
    ({"gamma": [0.0] * 5}, "CachePlan.gamma"),
    ({"gamma2": "zeros"}, "CachePlan.gamma2"),
    ({"meta": [1]}, "CachePlan.meta"),
    ({"extra": 1}, "CachePlan.extra"),
])
def test_bad_field_named(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        CachePlan.load(write(tmp_path, plan_dict(**overrides)))


def test_version_1_files_still_load(tmp_path):
    """Version-1 plans (no ``branches``: attention and MLP) load as version 2 with the default
    branches; a version-1 file that names branches is refused."""
    d = plan_dict()
    assert d["version"] == 2 and d["branches"] == ["attn", "mlp"]
    old = {k: v for k, v in d.items() if k != "branches"}
    old["version"] = 1
    plan = CachePlan.load(write(tmp_path, old))
    assert plan.version == 2 and plan.branches == ["attn", "mlp"] and plan.compute == d["compute"]
    with pytest.raises(ValueError, match=r"CachePlan\.branches"):
        CachePlan.load(write(tmp_path, dict(old, branches=["attn", "mlp"])))
    with pytest.raises(ValueError, match=r"CachePlan\.branches: missing"):
        CachePlan.load(write(tmp_path, {k: v for k, v in d.items() if k != "branches"}))


def test_named_branches_round_trip_and_projection(tmp_path):
    """A plan over named branches (PAB's units) saves and loads, and projects onto the
    branches a model has: our DiT's ``attn`` follows ``self_attn``; a model without
    cross-attention ignores ``cross_attn``; ``attn`` of a block with several attention kinds
    computes where any of them does."""
    names = ["self_attn", "cross_attn", "temporal_attn", "mlp"]
    row_full = [[True] * 4] * 2
    row_mix = [[False, True, True, True], [True, False, True, False]]
    plan = CachePlan(3, 2, "branch", [row_full, row_mix, row_mix], branches=names, meta={"policy": "PAB"})
    plan.save(tmp_path / "named.json")
    again = CachePlan.load(tmp_path / "named.json")
    assert again == plan and again.branches == names
    ours = plan.for_branches(("attn", "mlp"))
    assert ours.branches == ["attn", "mlp"]
    assert ours.compute[1] == [[False, True], [True, False]]  # attn <- self_attn, mlp <- mlp
    merged = plan.for_branches(("self_attn", "mlp"))
    assert merged.compute[2] == [[False, True], [True, False]]
    fused = CachePlan(3, 2, "branch", [row_full, row_mix, row_mix], branches=names).to_block()
    assert fused.compute[1] == [[True, True], [True, True]]  # a block computes where any branch does
    with pytest.raises(ValueError, match=r"CachePlan\.branches: named branches need granularity 'branch'"):
        CachePlan(3, 2, "block", [row_full] * 3, branches=names)


def test_ragged_and_non_bool_compute(tmp_path):
    d = plan_dict()
    d["compute"][3] = d["compute"][3][:2]
    with pytest.raises(ValueError, match=r"CachePlan\.compute\[3\]:"):
        CachePlan.load(write(tmp_path, d))
    d = plan_dict()
    d["compute"][3][2] = [True]
    with pytest.raises(ValueError, match=r"CachePlan\.compute\[3\]\[2\]:"):
        CachePlan.load(write(tmp_path, d))
    d = plan_dict()
    d["compute"][3][2][1] = 1
    with pytest.raises(ValueError, match=r"CachePlan\.compute\[3\]\[2\]\[1\]: must be true or false"):
        CachePlan.load(write(tmp_path, d))
    with pytest.raises(ValueError, match="CachePlan.compute: a tensor must have dtype torch.bool"):
        CachePlan(2, 1, "step", torch.ones(2, 1, 2))


def test_nan_gamma_named(tmp_path):
    d = plan_dict()
    text = json.dumps(d).replace('"gamma": [0.0', '"gamma": [NaN', 1)
    with pytest.raises(ValueError, match=r"CachePlan\.gamma\[0\]: must be a finite number"):
        CachePlan.load(write(tmp_path, text))


@pytest.mark.parametrize("key", ["version", "steps", "blocks", "granularity", "compute", "gamma", "gamma2", "meta"])
def test_missing_key_named(tmp_path, key):
    d = plan_dict()
    del d[key]
    with pytest.raises(ValueError, match=rf"CachePlan\.{key}: missing"):
        CachePlan.load(write(tmp_path, d))


def test_not_json(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        CachePlan.load(write(tmp_path, "{steps: 3"))
    with pytest.raises(ValueError, match="top level must be a JSON object"):
        CachePlan.load(write(tmp_path, "[1, 2]"))


def test_consistency_with_granularity():
    mixed = [[[True, True], [True, True]], [[False, False], [True, True]]]
    CachePlan(2, 2, "block", mixed)
    with pytest.raises(ValueError, match=r"CachePlan\.compute\[1\]\[1\]: granularity 'step'"):
        CachePlan(2, 2, "step", mixed)
    split = [[[True, True]], [[False, True]]]
    CachePlan(2, 1, "branch", split)
    with pytest.raises(ValueError, match=r"CachePlan\.compute\[1\]\[0\]: granularity 'block'"):
        CachePlan(2, 1, "block", split)
    with pytest.raises(ValueError, match=r"CachePlan\.compute\[0\]\[0\]\[1\]: reuses a cache that no earlier"):
        CachePlan(1, 1, "branch", [[[True, False]]])
    with pytest.raises(ValueError, match=r"CachePlan\.gamma\[0\]: must be 0 at a step that computes every"):
        CachePlan(1, 1, "step", [[[True, True]]], gamma=[0.5])


def test_check_matches_names_field():
    model = make_dit("tiny")
    plan = FORAConfig().plan(5, len(model.blocks))
    plan.check_matches(model, 5)
    with pytest.raises(ValueError, match=r"CachePlan\.steps: plan has 5 steps but sampling runs 6"):
        plan.check_matches(model, 6)
    with pytest.raises(ValueError, match=r"CachePlan\.blocks: plan has 3 blocks but the model has 2"):
        FORAConfig().plan(5, 3).check_matches(model, 5)


def test_compute_fraction_counts_flops():
    flops = {"embed": 10, "final": 10, "block_attn": 30, "block_mlp": 50, "block_modulation": 5}
    flops["total"] = 20 + 2 * 85
    assert CachePlan.full(4, 2).compute_fraction(flops) == 1.0
    plan = FORAConfig(interval=2).plan(4, 2)  # branch level: modulation every step
    assert plan.compute_fraction(flops) == pytest.approx((4 * 20 + 2 * 2 * 85 + 2 * 2 * 5) / (4 * 190))


# Issue 15.3 and 15.8: values float32 cannot hold, hostile files; each a ValueError that
# names the file and the field.


@pytest.mark.parametrize("field", ["gamma", "gamma2"])
@pytest.mark.parametrize("value", [1e308, -3.5e38])
def test_gamma_outside_float32_range_named(tmp_path, field, value):
    d = plan_dict()
    d[field][2] = value  # step 2 reuses (TaylorSeer interval 2, warm-up 1)
    path = write(tmp_path, d)
    with pytest.raises(ValueError, match=rf"plan\.json: CachePlan\.{field}\[2\]: must be within float32 range"):
        CachePlan.load(path)
    d[field][2] = 3e38  # float32 holds it
    CachePlan.load(write(tmp_path, d))


def test_version_must_be_the_int(tmp_path):
    path = write(tmp_path, plan_dict(version=1.0))
    with pytest.raises(ValueError, match=r"plan\.json: CachePlan\.version: must be 1 or 2, got 1\.0"):
        CachePlan.load(path)


def test_deep_nesting_named(tmp_path):
    path = write(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"CachePlan: .*plan\.json: not a plan \(JSON nested too deeply\)"):
        CachePlan.load(path)
    d = plan_dict()
    text = json.dumps(d).replace('"meta": {', '"meta": {"deep": ' + "[" * 100_000 + "]" * 100_000 + ', ', 1)
    with pytest.raises(ValueError, match=r"plan\.json: .*nested too deeply"):
        CachePlan.load(write(tmp_path, text))


def test_not_utf8_named(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(json.dumps(plan_dict()).encode().replace(b'"TaylorSeer"', b'"Taylor\xffSeer"'))
    with pytest.raises(ValueError, match=r"plan\.json: not UTF-8 text \(byte \d+"):
        CachePlan.load(path)


def test_folder_named(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path}: is a folder"):
        CachePlan.load(tmp_path)
