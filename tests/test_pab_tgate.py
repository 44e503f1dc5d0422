"""PAB and T-GATE: static plans over named branches (CachePlan version 2), on a tiny random
Latte (spatial self-attention, cross-attention, temporal attention, MLP) and on our DiT."""

import pytest
import torch

from omnicache.plan import CachePlan
from omnicache.policies import PABConfig, TGATEConfig
from omnicache.policies.pab import NAMED_BRANCHES, broadcast_steps

STEPS = 10


def test_broadcast_schedule_and_validation():
    # inside the window (steps 3..8) the first step computes, then every 3rd; outside, every step
    got = broadcast_steps(10, 3, (0.2, 0.7))
    assert got == [True, True, True, True, False, False, True, False, False, True]
    slow, fast = PABConfig.slow().plan(50, 3), PABConfig.fast().plan(50, 3)
    n = lambda p: sum(not v for row in p.compute for flags in row for v in flags)  # noqa: E731
    assert n(fast) > n(slow) > 0  # fast broadcasts more
    assert slow.branches == list(NAMED_BRANCHES) and slow.granularity == "branch"
    for bad, field in [(dict(spatial_range=0), "spatial_range"), (dict(cross_window=(0.5, 0.2)), "cross_window"),
                       (dict(granularity="block"), "granularity")]:
        with pytest.raises(ValueError, match=f"PABConfig.{field}"):
            PABConfig(**bad)
    with pytest.raises(ValueError, match="TGATEConfig.gate"):
        TGATEConfig(gate=1.5)
    plan = TGATEConfig(gate=0.5, self_interval=2, warmup=1).plan(STEPS, 2)
    cross = [row[0][1] for row in plan.compute]
    assert cross == [True] * 5 + [False] * 5  # cached from the gate step on
    selfa = [row[0][0] for row in plan.compute]
    assert selfa == [True, True, False, True, False] + [True] * 5


def test_pab_on_our_runtime_broadcasts_the_self_attention():
    """Our DiT has self-attention and an MLP: PAB's spatial ranges act on its attention,
    cross/temporal entries have nothing to act on."""
    from omnicache.runtime.default import load_default
    from omnicache.runtime.executor import CacheExecutor

    model = load_default()
    depth = len(model.blocks)
    labels = torch.tensor([0, 1])
    plan = PABConfig.slow().plan(STEPS, depth)
    out = CacheExecutor(model, labels, plan, steps=STEPS).run(seed=1)[0]
    ref = CacheExecutor(model, labels, None, steps=STEPS).run(seed=1)[0]
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    projected = plan.for_branches(("attn", "mlp"))
    assert [row[0][0] for row in projected.compute] == [row[0][0] for row in plan.compute]
    assert all(row[0][1] for row in projected.compute)  # the MLP (mlp_range 1) always computes
    # T-GATE acts on cross-attention only (self_interval 1): nothing to do on our DiT
    tg = CacheExecutor(model, labels, TGATEConfig(gate=0.3).plan(STEPS, depth), steps=STEPS).run(seed=1)[0]
    assert torch.equal(tg, ref)


def _latte_run(model, shape, inputs, config, steps):
    """Outputs per step, and per attention submodule the outputs of every call, with
    ``config`` enabled (None: uncached)."""
    import diffusers_models as dm

    from omnicache.integrations import diffusers as od

    seen = {}
    handles = []
    for li, name in ((0, "transformer_blocks"), (1, "temporal_transformer_blocks")):
        for b, blk in enumerate(getattr(model, name)):
            for attr in ("attn1", "attn2"):
                sub = getattr(blk, attr, None)
                if sub is not None:
                    key = (name, b, attr)
                    handles.append(sub.register_forward_hook(
                        lambda m, a, o, key=key: seen.setdefault(key, []).append(o.detach().clone())))
    if config is not None:
        od.enable(model, config, steps=steps)
    try:
        outs = dm.sample(model, shape, inputs, steps)
        summary = od.summary(model) if config is not None else None
    finally:
        if config is not None:
            od.disable(model)
        for h in handles:
            h.remove()
    return outs, seen, summary


def test_pab_on_latte_broadcasts_each_attention_kind_on_its_own_schedule():
    """Each named branch of a Latte block broadcasts on its own steps: spatial self-attention
    (spatial blocks' attn1), cross-attention (their attn2) and temporal attention (the temporal
    blocks' attn1) return their last computed output exactly where the plan reuses them."""
    pytest.importorskip("diffusers")
    import diffusers_models as dm

    model, shape, inputs = dm.make("Latte")
    cfg = PABConfig(spatial_range=2, temporal_range=3, cross_range=4, spatial_window=(0.0, 0.9),
                    temporal_window=(0.0, 0.9), cross_window=(0.0, 0.9))
    plan = cfg.plan(STEPS, 4)
    ref, seen_ref, _ = _latte_run(model, shape, inputs, None, STEPS)
    outs, seen, summary = _latte_run(model, shape, inputs, cfg, STEPS)
    assert not torch.equal(outs[-1], ref[-1])
    kinds = {("transformer_blocks", "attn1"): 0, ("transformer_blocks", "attn2"): 1,
             ("temporal_transformer_blocks", "attn1"): 2}
    for (name, b, attr), calls in seen.items():
        k = kinds[(name, attr)]
        col = [row[0][k] for row in plan.compute]
        assert len(calls) == STEPS and 0 < col.count(False) < STEPS
        last = None
        for i, computed in enumerate(col):
            if computed:
                last = calls[i]
                assert i == 0 or not torch.equal(calls[i], calls[i - 1])
            else:
                assert torch.equal(calls[i], last), (name, b, attr, i)
    # the FLOPs count what ran: less than uncached, more than the MLPs alone
    frac = summary.compute_fraction
    assert 0.3 < frac < 1.0
    assert summary.contexts[None]["plan_compute_fraction"] == pytest.approx(frac, rel=1e-6)


def test_tgate_on_latte_caches_cross_attention_after_the_gate():
    pytest.importorskip("diffusers")
    import diffusers_models as dm

    model, shape, inputs = dm.make("Latte")
    outs, seen, summary = _latte_run(model, shape, inputs, TGATEConfig(gate=0.5, warmup=0), STEPS)
    gate = round(0.5 * STEPS)
    for (name, b, attr), calls in seen.items():
        if attr == "attn2":
            assert all(torch.equal(calls[i], calls[gate - 1]) for i in range(gate, STEPS))
        else:  # self-attention (spatial and temporal) runs every step
            assert not torch.equal(calls[-1], calls[-2])
    assert summary.compute_fraction < 1.0
