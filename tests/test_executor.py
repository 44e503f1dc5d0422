"""The cache executor against plain-torch references: bitwise when nothing is reused,
a slow reference executor for every granularity, per-sample dynamic decisions, FLOPs."""

import dataclasses
import math
import random

import pytest
import torch

from omnicache.plan import CachePlan
from omnicache.policies import (
    DeltaDiTConfig,
    FirstBlockCacheConfig,
    FORAConfig,
    NoCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from omnicache.runtime import DiT, DiTConfig, sample
from omnicache.runtime.executor import CacheExecutor
from omnicache.runtime.samplers import cfg_batch, cfg_combine, cfg_labels, make_sampler

from compile_helpers import only_cond_reads

DEPTH = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=DEPTH, num_heads=2,
                      num_classes=10))
    with torch.no_grad():  # adaLN-Zero starts as the identity: randomise so blocks do something
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


LABELS = torch.tensor([3, 1, 4, 5])


@torch.no_grad()
def reference_run(model, labels, plan, steps, guidance, seed=0, sampler="flow"):
    """Straightforward cached sampling: lists of past values, plain torch, no omnicache.ops.

    A reused unit gets ``F + gamma*(F - F') + gamma2*((F - F') - (F' - F''))`` from its last
    three computed values (zeros before any exist), added to ``h`` (gated for branches)."""
    sampler = make_sampler(sampler, steps)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = sampler.init_noise((len(labels), cfg.in_channels, cfg.input_size, cfg.input_size), generator=g)
    use_cfg = guidance != 1.0
    y = cfg_labels(labels, cfg.num_classes) if use_cfg else labels
    history = {}

    def forecast(unit, i):
        f0, f1, f2 = history[unit][-1], history[unit][-2], history[unit][-3]
        return f0 + plan.gamma[i] * (f0 - f1) + plan.gamma2[i] * ((f0 - f1) - (f1 - f2))

    def remember(unit, value):
        history.setdefault(unit, [torch.zeros_like(value)] * 3).append(value)

    for i in range(steps):
        xm, t = sampler.model_input(i, x)
        if use_cfg:
            xm, t = cfg_batch(xm), cfg_batch(t)
        h, c = model.embed(xm, t, y)
        for b, blk in enumerate(model.blocks):
            if plan.granularity == "branch":
                mod = blk.modulation(c)
                for k, (branch, gate) in enumerate([(blk.attn_branch, mod[2]), (blk.mlp_branch, mod[5])]):
                    if plan.compute[i][b][k]:
                        out = branch(h, mod)
                        remember((b, k), out)
                    else:
                        out = forecast((b, k), i)
                    h = h + gate[:, None] * out
            else:
                unit = 0 if plan.granularity == "step" else b
                first = plan.granularity == "block" or b == 0
                last = plan.granularity == "block" or b == DEPTH - 1
                if plan.compute[i][b][0]:
                    if first:
                        inp = h
                    h = blk(h, c)
                    if last:
                        remember(unit, h - inp)
                elif last:  # the whole unit at once, after skipping its blocks
                    h = h + forecast(unit, i)
        out = model.final(h, c)
        if use_cfg:
            out = cfg_combine(out, guidance)
        x = sampler.step(i, x, out)
    return x


def run(model, policy, labels=LABELS, steps=8, guidance=3.0, **kw):
    return CacheExecutor(model, labels, policy, steps=steps, guidance=guidance, **kw).run(0)


# ------------------------------------------------------------------ nothing reused
@pytest.mark.parametrize("granularity", ["step", "block", "branch"])
@pytest.mark.parametrize("sampler, guidance", [("flow", 3.0), ("ddim", 3.0), ("flow", 1.0)])
def test_full_plan_is_bitwise_the_reference(model, granularity, sampler, guidance):
    expected = sample(model, LABELS, 6, sampler=sampler, guidance=guidance, seed=0)
    plan = CachePlan.full(6, DEPTH, granularity)
    x_plan, summary = run(model, plan, steps=6, guidance=guidance, sampler=sampler)
    x_nocache, _ = run(model, NoCacheConfig(), steps=6, guidance=guidance, sampler=sampler,
                       granularity=granularity)
    assert torch.equal(x_plan, expected) and torch.equal(x_nocache, expected)
    assert summary.compute_fraction == 1.0 and summary.cache_bytes == 0
    assert summary.decisions.eq(1).all()


# ------------------------------------------------------------- reuse vs reference
def random_plan(granularity, steps, seed):
    rnd = random.Random(seed)
    compute = []
    for i in range(steps):
        if granularity == "step":
            v = i == 0 or rnd.random() < 0.4
            compute.append([[v, v]] * DEPTH)
        elif granularity == "block":
            compute.append([[v, v] for v in (i == 0 or rnd.random() < 0.4 for _ in range(DEPTH))])
        else:
            compute.append([[i == 0 or rnd.random() < 0.4 for _ in range(2)] for _ in range(DEPTH)])
    reuse = [not all(v for row in compute[i] for v in row) for i in range(steps)]
    gamma = [rnd.uniform(-0.5, 1.0) if r else 0.0 for r in reuse]
    gamma2 = [rnd.uniform(-0.3, 0.3) if r else 0.0 for r in reuse]
    return CachePlan(steps, DEPTH, granularity, compute, gamma, gamma2)


PLANS = {
    "fora": lambda g: FORAConfig(interval=3, granularity=g).plan(10, DEPTH),
    "taylor1": lambda g: TaylorSeerConfig(interval=3, order=1, warmup=1, granularity=g).plan(10, DEPTH),
    "taylor2": lambda g: TaylorSeerConfig(interval=2, order=2, warmup=2, granularity=g).plan(10, DEPTH),
    "random_reuse": lambda g: dict_replace(random_plan(g, 10, seed=1), gamma=None, gamma2=None),
    "random_forecast": lambda g: random_plan(g, 10, seed=2),
}


def dict_replace(plan, **kw):
    return CachePlan(**{**plan.to_dict(), **kw})


@pytest.mark.parametrize("granularity", ["step", "block", "branch"])
@pytest.mark.parametrize("name", list(PLANS))
def test_reuse_matches_reference_executor(model, granularity, name):
    plan = PLANS[name](granularity)
    expected = reference_run(model, LABELS, plan, 10, 3.0)
    got, summary = run(model, plan, steps=10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert summary.granularity == granularity
    assert torch.equal(summary.decisions, plan.compute_tensor().float())


def test_delta_dit_matches_reference(model):
    plan = DeltaDiTConfig(interval=2, group_size=2).plan(10, DEPTH)
    torch.testing.assert_close(run(model, plan, steps=10)[0], reference_run(model, LABELS, plan, 10, 3.0),
                               rtol=1e-5, atol=1e-5)


def test_cache_buffers_and_bytes(model):
    rows_elems = 2 * len(LABELS) * 16 * 32 * 4  # rows * T * D * float32
    assert run(model, FORAConfig(interval=2))[1].cache_bytes == 2 * DEPTH * rows_elems
    assert run(model, FORAConfig(interval=2, granularity="step"))[1].cache_bytes == rows_elems
    taylor = TaylorSeerConfig(interval=2, order=2, warmup=1, granularity="block")
    assert run(model, taylor)[1].cache_bytes == 3 * DEPTH * rows_elems  # F, D1, D2 per block
    delta = DeltaDiTConfig(interval=2, group_size=1, boundary=1.0)  # only the last block is ever reused
    assert run(model, delta)[1].cache_bytes == rows_elems


# ------------------------------------------------------------- dynamic, per sample
def pick_threshold(model, config_of, step):
    """A threshold halfway between two samples' signals at ``step``, the first step that may
    reuse (everything before computed, as in the probe run), so decisions differ there."""
    summary = run(model, config_of(0.0))[1]
    rel = sorted(summary.stats[step]["signal_rel_l1"])
    return (rel[1] + rel[2]) / 2


@pytest.mark.parametrize("config_of, first", [
    (lambda t: TeaCacheConfig(threshold=t), 1),
    (lambda t: FirstBlockCacheConfig(threshold=t, first_blocks=1), 1),
    (lambda t: FirstBlockCacheConfig(threshold=t, first_blocks=2, warmup=2), 2),
], ids=["teacache", "fbcache1", "fbcache2"])
def test_dynamic_decisions_per_sample_equal_running_alone(model, config_of, first):
    policy = config_of(pick_threshold(model, config_of, first))
    ex = CacheExecutor(model, LABELS, policy, steps=8, guidance=3.0)
    noise = ex.init_noise(0)
    x, summary = ex.run(x=noise)
    batch_decisions = [d["compute"] for d in summary.stats]
    assert any(0 < sum(d) < len(LABELS) for d in batch_decisions), "no step mixed computing and reusing samples"
    assert any(not all(d) for d in batch_decisions[1:])
    for s in range(len(LABELS)):
        alone = CacheExecutor(model, LABELS[s:s + 1], policy, steps=8, guidance=3.0)
        x_s, summary_s = alone.run(x=noise[s:s + 1])
        assert [d["compute"][0] for d in summary_s.stats] == [d[s] for d in batch_decisions]
        torch.testing.assert_close(x_s, x[s:s + 1], rtol=1e-5, atol=1e-5)


def test_teacache_first_and_last_steps_compute(model):
    stats = run(model, TeaCacheConfig(threshold=1e9), steps=6)[1].stats
    assert [all(d["compute"]) for d in stats] == [True, False, False, False, False, True]


# ----------------------------------------------------------------------- FLOPs
def test_flop_accounting(model):
    f = model.flops_per_sample()
    assert run(model, None)[1].compute_fraction == 1.0
    steps = 20
    full = math.ceil(steps / 3)  # FORA refreshes at 0, 3, ..., 18
    summary = run(model, FORAConfig(interval=3), steps=steps)[1]
    block = f["block_attn"] + f["block_mlp"]
    expected = (steps * (f["embed"] + f["final"] + DEPTH * f["block_modulation"]) + full * DEPTH * block) \
        / (steps * f["total"])
    assert summary.compute_fraction == pytest.approx(expected, rel=1e-12)
    assert summary.flops_uncached == steps * 2 * len(LABELS) * f["total"]
    assert summary.decisions[::3].eq(1).all() and summary.decisions[1::3].eq(0).all()


def test_dynamic_flop_accounting(model):
    f = model.flops_per_sample()
    block = f["block_attn"] + f["block_mlp"] + f["block_modulation"]
    summary = run(model, FirstBlockCacheConfig(threshold=0.05))[1]
    rows = 2 * len(LABELS)
    computed = sum(sum(d["compute"]) for d in summary.stats) * 2
    expected = 8 * rows * (f["embed"] + f["final"] + block) + computed * (DEPTH - 1) * block
    assert summary.flops == pytest.approx(expected, rel=1e-12)
    assert summary.decisions[:, 0].eq(1).all()
    assert summary.decisions[:, 1:].mean().item() == pytest.approx(computed / (8 * rows))


# ----------------------------------------------------------------------- the API
def test_generate(model):
    from omnicache.api import generate

    a = generate(model, [1, 2], policy=FORAConfig(), steps=6, guidance=2.0, seed=3)
    b = generate(model, torch.tensor([1, 2]), policy=FORAConfig().plan(6, DEPTH), steps=6, guidance=2.0, seed=3)
    assert torch.equal(a.samples, b.samples) and a.samples.shape == (2, 1, 8, 8)
    assert a.samples.min() >= 0 and a.samples.max() <= 1
    assert not torch.equal(generate(model, [1, 2], steps=6, guidance=2.0, seed=4).samples,
                           generate(model, [1, 2], steps=6, guidance=2.0, seed=3).samples)
    assert a.summary.policy == "FORA" and a.summary.compute_fraction < 1
    model.default_guidance = 2.0  # what guidance=None reads
    try:
        assert torch.equal(generate(model, [1, 2], policy=FORAConfig(), steps=6, seed=3).samples, a.samples)
    finally:
        del model.default_guidance
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        generate(model, [3, 10], steps=2)
    with pytest.raises(ValueError, match=r"CachePlan\.steps: plan has 6 steps but sampling runs 5"):
        generate(model, [1], policy=FORAConfig().plan(6, DEPTH), steps=5)
    with pytest.raises(TypeError, match="policy must be a CachePlan"):
        generate(model, [1], policy="fora", steps=2)


def test_dbcache_back_blocks_and_consecutive_cap(model):
    """DBCache: Fn front and Bn back blocks every step, the middle reused at most
    ``max_consecutive`` steps in a row; FLOPs counted for what ran; threshold 0 is uncached."""
    f = model.flops_per_sample()
    block = f["block_attn"] + f["block_mlp"] + f["block_modulation"]
    cfg = FirstBlockCacheConfig(threshold=1e9, first_blocks=1, last_blocks=1, max_consecutive=2)
    x, summary = run(model, cfg)
    assert [all(d["compute"]) for d in summary.stats] == [True, False, False, True, False, False, True, False]
    assert not any(any(d["compute"]) for d, full in zip(summary.stats, [1, 0, 0, 1, 0, 0, 1, 0]) if not full)
    assert summary.decisions[:, 0].eq(1).all() and summary.decisions[:, DEPTH - 1].eq(1).all()
    assert summary.decisions[[1, 2, 4, 5, 7], 1:DEPTH - 1].eq(0).all()
    rows = 2 * len(LABELS)
    expected = 8 * rows * (f["embed"] + f["final"] + 2 * block) + 3 * rows * (DEPTH - 2) * block
    assert summary.flops == pytest.approx(expected, rel=1e-12)
    ref, _ = run(model, None)
    exact, _ = run(model, dataclasses.replace(cfg, threshold=0.0))
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5)
    # the back block refines a reused state: not the same as caching it too
    fbc, _ = run(model, FirstBlockCacheConfig(threshold=1e9, max_consecutive=2))
    assert not torch.equal(fbc, x)
    with pytest.raises(ValueError, match="first_blocks \\+ last_blocks"):
        run(model, FirstBlockCacheConfig(first_blocks=2, last_blocks=2))
    with pytest.raises(ValueError, match="max_consecutive"):
        FirstBlockCacheConfig(max_consecutive=0)


def test_dbcache_device_mode_equals_host_mode(model):
    """DBCache's back blocks and cap with ``mode="device"``: the host mode's decisions and output."""
    probe = run(model, FirstBlockCacheConfig(threshold=0.0, last_blocks=1))[1]
    rel = sorted(probe.stats[1]["signal_rel_l1"])
    cfg = FirstBlockCacheConfig(threshold=(rel[1] + rel[2]) / 2, last_blocks=1, max_consecutive=2)
    x_host, s_host = run(model, cfg)
    ex = CacheExecutor(model, LABELS, dataclasses.replace(cfg, mode="device"), steps=8, guidance=3.0)
    with only_cond_reads() as conds:
        x_dev, _ = ex.run(0, summary=False)
    assert len(conds) == 8  # one torch.cond per step
    s_dev = ex.summary()
    assert [d["compute"] for d in s_dev.stats] == [d["compute"] for d in s_host.stats]
    assert any(0 < sum(d["compute"]) < len(LABELS) for d in s_host.stats)
    torch.testing.assert_close(x_dev, x_host, rtol=1e-5, atol=1e-5)
    assert s_dev.flops_sub_batch == pytest.approx(s_host.flops, rel=1e-9)
