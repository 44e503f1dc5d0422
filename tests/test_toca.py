"""ToCa: token-wise caching on a diffusers transformer (tiny random Latte), through the
fused token ops."""

import pytest
import torch

from omnicache.policies import ToCaConfig

pytest.importorskip("diffusers")

import diffusers_models as dm  # noqa: E402

from omnicache.integrations import diffusers as od  # noqa: E402

STEPS = 6


def _run(model, shape, inputs, config):
    if config is not None:
        od.enable(model, config, steps=STEPS)
    try:
        outs = dm.sample(model, shape, inputs, STEPS)
        return outs, (od.summary(model) if config is not None else None)
    finally:
        if config is not None:
            od.disable(model)


def test_toca_recomputing_every_token_is_uncached_sampling():
    """ratio 0: every token recomputes at every step, gathered in order: the same bits."""
    model, shape, inputs = dm.make("Latte")
    ref, _ = _run(model, shape, inputs, None)
    outs, summary = _run(model, shape, inputs, ToCaConfig(interval=3, ratio=0.0))
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))
    assert summary.compute_fraction == pytest.approx(1.0)


def test_toca_partial_steps_spend_the_share_of_tokens():
    model, shape, inputs = dm.make("Latte")
    ref, _ = _run(model, shape, inputs, None)
    cfg = ToCaConfig(interval=2, ratio=0.5)
    outs, summary = _run(model, shape, inputs, cfg)
    full = cfg.full_steps(STEPS)
    assert full == [True, True, False, True, False, True]  # warm-up 1, then every 2nd step
    assert torch.equal(outs[1], ref[1])  # full steps before any partial one: uncached
    assert not torch.equal(outs[2], ref[2]) and torch.isfinite(outs[-1]).all()
    # 4 full steps, 2 that run half the tokens through every linear layer except cross-attention's
    # keys and values (text tokens): a little over (4 + 2 * 0.5) / 6
    assert 5 / 6 < summary.compute_fraction < 0.87
    again, _ = _run(model, shape, inputs, cfg)
    assert all(torch.equal(a, b) for a, b in zip(outs, again))  # deterministic selection


def test_toca_config_and_unsupported_blocks():
    for bad, field in [(dict(ratio=1.0), "ratio"), (dict(interval=0), "interval"), (dict(magnitude_weight=-1), "magnitude_weight")]:
        with pytest.raises(ValueError, match=f"ToCaConfig.{field}"):
            ToCaConfig(**bad)
    model, shape, inputs = dm.make("Flux")  # joint blocks return two streams
    with pytest.raises(TypeError, match="token-wise caching needs blocks that return hidden_states alone"):
        _run(model, shape, inputs, ToCaConfig(interval=2, ratio=0.5))


def test_toca_on_our_runtime():
    """Our DiT: ratio 0 is uncached sampling bit for bit; R = 0.5 spends what it should."""
    from omnicache.runtime.default import load_default
    from omnicache.runtime.executor import CacheExecutor

    model = load_default()
    labels = torch.tensor([0, 1, 2])
    ref = CacheExecutor(model, labels, None, steps=12).run(seed=1)[0]
    same, summary0 = CacheExecutor(model, labels, ToCaConfig(interval=3, ratio=0.0), steps=12).run(seed=1)
    assert torch.equal(same, ref) and summary0.compute_fraction == pytest.approx(1.0)
    cfg = ToCaConfig(interval=3, ratio=0.5)
    out, summary = CacheExecutor(model, labels, cfg, steps=12).run(seed=1)
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    partial = cfg.full_steps(12).count(False)
    assert 1 - partial / 12 * 0.5 - 0.05 < summary.compute_fraction < 1 - partial / 12 * 0.5 + 0.01
    again = CacheExecutor(model, labels, cfg, steps=12).run(seed=1)[0]
    assert torch.equal(out, again)
