"""MagCache: the magnitude-ratio rule as a static step plan, its ratios measured on the model
(our runtime and diffusers), and equality with diffusers' own MagCache hook."""

import contextlib
import copy
import io
import json

import pytest
import torch

from omnicache.policies import MagCacheConfig
from omnicache.runtime import RuntimeEngine
from omnicache.policies.magcache import magcache_schedule, mag_ratios_from_residuals
from omnicache.runtime.executor import CacheExecutor

STEPS = 12


def _rule(ratios, threshold, k, retention):
    """diffusers' MagCacheHeadHook logic, written out step by step (its reference)."""
    out, acc, n, err = [], 1.0, 0, 0.0
    for t, g in enumerate(ratios):
        compute = True
        if t >= int(retention * len(ratios) + 0.5):
            acc *= g
            n += 1
            err += abs(1.0 - acc)
            if t > 0 and err <= threshold and n <= k:
                compute = False
            else:
                acc, n, err = 1.0, 0, 0.0
        out.append(compute)
    return out


@pytest.mark.parametrize("threshold, k, retention", [(0.06, 3, 0.2), (0.2, 2, 0.0), (0.0, 3, 0.2), (1.0, 5, 0.5)])
def test_schedule_follows_the_rule(threshold, k, retention):
    g = torch.Generator().manual_seed(0)
    ratios = [1.0] + (1 + 0.05 * torch.randn(STEPS - 1, generator=g)).tolist()
    assert magcache_schedule(ratios, STEPS, threshold, k, retention) == _rule(ratios, threshold, k, retention)
    plan = MagCacheConfig(threshold, k, retention, mag_ratios=ratios).plan(STEPS, 4)
    assert [c[0][0] for c in plan.compute] == _rule(ratios, threshold, k, retention)
    assert plan.meta["policy"] == "MagCache"


def test_ratios_resampled_by_nearest_index():
    pytest.importorskip("diffusers")
    ratios = [1.0, 0.9, 0.8, 0.7]
    assert magcache_schedule(ratios, 7, 10.0, 100, 0.0) == [True] + [False] * 6
    # 7 steps from 4 ratios: index round(i * 3 / 6), ties to even: 0 0 1 2 2 2 3 (diffusers' nearest_interp)
    resampled = [1.0, 1.0, 0.9, 0.8, 0.8, 0.8, 0.7]
    assert magcache_schedule(ratios, 7, 0.15, 100, 0.0) == _rule(resampled, 0.15, 100, 0.0)
    from diffusers.hooks.mag_cache import nearest_interp  # the reference, where installed
    assert nearest_interp(torch.tensor(ratios), 7).tolist() == pytest.approx(resampled)


def test_config_is_validated():
    with pytest.raises(ValueError, match=r"MagCacheConfig\.mag_ratios is None"):
        MagCacheConfig().plan(STEPS, 4)
    with pytest.raises(ValueError, match=r"MagCacheConfig\.mag_ratios must be positive"):
        MagCacheConfig(mag_ratios=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"MagCacheConfig\.mag_ratios must be a sequence"):
        MagCacheConfig(mag_ratios=["a"])
    with pytest.raises(ValueError, match=r"MagCacheConfig\.retention_ratio"):
        MagCacheConfig(retention_ratio=1.5)
    with pytest.raises(ValueError, match=r"MagCacheConfig\.max_skip_steps"):
        MagCacheConfig(max_skip_steps=-1)


def test_ratios_from_residuals():
    r0 = torch.ones(2, 3, 4)
    r1 = torch.cat([2 * torch.ones(2, 1, 4), torch.ones(2, 2, 4)], 1)  # one token in three doubles
    assert mag_ratios_from_residuals([r0, r1]) == pytest.approx((1.0, 4 / 3), rel=1e-6)


def test_on_our_runtime(tiny_dit):
    labels = torch.tensor([1, 4])
    ratios = MagCacheConfig().calibrate(RuntimeEngine(tiny_dit, labels, steps=STEPS, guidance=2.0)).mag_ratios
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    cfg = MagCacheConfig(threshold=0.3, retention_ratio=0.1, mag_ratios=ratios)
    ref, _ = CacheExecutor(tiny_dit, labels, None, steps=STEPS, guidance=2.0).run(0)
    x, s = CacheExecutor(tiny_dit, labels, cfg, steps=STEPS, guidance=2.0).run(0)
    plan = cfg.plan(STEPS, len(tiny_dit.blocks))
    skipped = sum(not c[0][0] for c in plan.compute)
    assert skipped > 0 and s.compute_fraction < 1.0
    assert s.decisions[:, :, 0].all(dim=1).tolist() == [c[0][0] for c in plan.compute]
    assert torch.isfinite(x).all() and not torch.equal(x, ref)


# ------------------------------------------------------------------ diffusers
def _diffusers():
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install omnicache[diffusers])")
    import diffusers_models as dm
    from omnicache.integrations import diffusers as oc
    return dm, oc


def test_fit_magcache_equals_diffusers_calibration():
    """Our ratios on tiny Flux equal those diffusers' MagCacheConfig(calibrate=True) prints."""
    dm, oc = _diffusers()
    from diffusers.hooks import MagCacheConfig as DMag, apply_mag_cache

    m, shape, inputs = dm.make("Flux")
    run = lambda: dm.sample(m, shape, inputs, STEPS)  # noqa: E731
    cfg = oc.calibrate(m, MagCacheConfig(), run=run, steps=STEPS, progress=False)
    m2 = copy.deepcopy(m)
    apply_mag_cache(m2, DMag(calibrate=True, num_inference_steps=STEPS))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dm.sample(m2, shape, inputs, STEPS)
    theirs = next(json.loads(line) for line in buf.getvalue().splitlines()
                  if line.startswith("[") and line.endswith("]"))
    assert cfg.mag_ratios == pytest.approx(theirs, rel=1e-4, abs=1e-6)


def test_plan_equals_diffusers_magcache():
    """Same ratios and settings: our static plan gives diffusers' MagCache output (its decisions)."""
    dm, oc = _diffusers()
    from diffusers.hooks import MagCacheConfig as DMag, apply_mag_cache

    m, shape, inputs = dm.make("Flux")
    ratios = oc.calibrate(m, MagCacheConfig(), run=lambda: dm.sample(m, shape, inputs, STEPS), steps=STEPS,
                             progress=False).mag_ratios
    cfg = MagCacheConfig(threshold=0.25, max_skip_steps=2, retention_ratio=0.2, mag_ratios=ratios)
    assert not all(c[0][0] for c in cfg.plan(STEPS, 4).compute), "nothing skipped: pick another threshold"
    theirs_m = copy.deepcopy(m)
    apply_mag_cache(theirs_m, DMag(threshold=0.25, max_skip_steps=2, retention_ratio=0.2,
                                  num_inference_steps=STEPS, mag_ratios=list(ratios)))
    theirs = dm.sample(theirs_m, shape, inputs, STEPS)
    oc.enable(m, cfg, steps=STEPS)
    ours = dm.sample(m, shape, inputs, STEPS)
    s = oc.summary(m)
    oc.disable(m)
    assert s.compute_fraction < 1.0
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) < 1e-5
