"""AdaCache (+ MoReg): the codebook rule, and runs in both engines."""

import math

import pytest
import torch

from omnicache.policies import AdaCacheConfig


def test_codebook_rule_reuses_longer_when_the_features_change_slowly():
    dec = AdaCacheConfig(codebook=((0.1, 3), (math.inf, 1)), warmup=1).decider(20, 4)
    dec.start(2)
    assert dec.decide(0, None) == [True, True]
    # step 1: sample 0 changed slowly (rate 0.05 < 0.1: reuse 3 steps), sample 1 fast (every step)
    assert dec.decide(1, [0.05, 0.5]) == [True, True]
    assert dec.next == [4, 2]
    assert dec.decide(2, [9.0, 0.5]) == [False, True]  # no decision between computations
    assert dec.decide(3, [9.0, 0.5]) == [False, True]
    # step 4: rate = rel / distance (0.33 / 3 = 0.11: not below 0.1)
    assert dec.decide(4, [0.33, 0.01]) == [True, True]
    assert dec.next == [5, 4 + 3]
    scaled = AdaCacheConfig(codebook=((0.1, 3), (math.inf, 1)), scale=2.0).decider(20, 4)
    assert scaled.skip(0.15) == 3 and dec.skip(0.15) == 1


def test_moreg_caches_less_when_the_motion_grows():
    dec = AdaCacheConfig(codebook=((0.1, 4), (math.inf, 1)), warmup=1, moreg=True).decider(20, 4)
    dec.start(1)
    dec.observe_motion([1.0])
    dec.decide(0, None)
    dec.observe_motion([1.0])
    dec.decide(1, [0.08])
    assert dec.next == [5]  # motion unchanged: the plain rate (0.08) reuses 4 steps
    dec.observe_motion([1.5])
    dec.decide(5, [0.2])  # rate 0.05, x (1.5 + 0.5) / 1.0 = 0.1: no longer below 0.1
    assert dec.next == [6]


def test_bad_config_names_the_field():
    for bad, field in [(dict(codebook="medium"), "codebook"), (dict(codebook=((0.1, 2),)), "codebook"),
                       (dict(scale=-1.0), "scale"), (dict(mode="device"), "mode"), (dict(moreg=1), "moreg")]:
        with pytest.raises(ValueError, match=f"AdaCacheConfig.{field}"):
            AdaCacheConfig(**bad)


def test_adacache_on_our_runtime_and_moreg_refused_there():
    from omnicache.runtime.default import load_default
    from omnicache.runtime.executor import CacheExecutor

    model = load_default()
    labels = torch.tensor([0, 1, 2])
    out, summary = CacheExecutor(model, labels, AdaCacheConfig(), steps=20).run(seed=1)
    ref = CacheExecutor(model, labels, None, steps=20).run(seed=1)[0]
    assert 0.2 < summary.compute_fraction < 0.95 and torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    with pytest.raises(ValueError, match="AdaCacheConfig.moreg"):
        CacheExecutor(model, labels, AdaCacheConfig(moreg=True), steps=20)


def test_adacache_with_moreg_on_latte():
    pytest.importorskip("diffusers")
    import diffusers_models as dm

    from omnicache.integrations import diffusers as od

    model, shape, inputs = dm.make("Latte")
    fracs = {}
    for moreg in (False, True):
        od.enable(model, AdaCacheConfig(codebook=((0.5, 3), (math.inf, 1)), moreg=moreg), steps=8)
        try:
            outs = dm.sample(model, shape, inputs, 8)
            fracs[moreg] = od.summary(model).compute_fraction
        finally:
            od.disable(model)
        assert torch.isfinite(outs[-1]).all()
    assert fracs[False] < 1.0 and fracs[True] <= 1.0
    model2, _, _ = dm.make("Flux")
    with pytest.raises(ValueError, match="AdaCacheConfig.moreg"):
        od.enable(model2, AdaCacheConfig(moreg=True), steps=8)
