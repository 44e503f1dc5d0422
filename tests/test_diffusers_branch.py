"""omnicache.integrations.diffusers: branch-level caching (``granularity="branch"``) and
per-sample dynamic decisions (``enable(..., per_sample=True)``), on tiny random diffusers
transformers (CPU)."""

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install omnicache[diffusers])")

import diffusers_models as dm  # noqa: E402

from omnicache.integrations import diffusers as od  # noqa: E402
from omnicache.plan import CachePlan  # noqa: E402
from omnicache.policies import FirstBlockCacheConfig, FORAConfig, L2CConfig, TeaCacheConfig  # noqa: E402

STEPS = 6
# the models whose every block class declares its attention/MLP branches and batched arguments
# (models.BlockIO attn/mlp/batched); the others project branch plans to blocks and refuse
# per_sample (tested in test_blocks_without_branches_project_branch_plans)
MODELS = ["DiT", "PixArt", "Flux", "SD3", "Wan", "CogVideoX", "Latte"]
# per-sample decisions also need dim 0 of every block input to be the batch: not Latte's
# (batch x frames or batch x tokens), where per_sample is refused with an error naming the input
PER_SAMPLE_MODELS = [n for n in MODELS if n != "Latte"]


def _max_err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _n_blocks(m):
    return sum(len(getattr(m, name)) for name in od.MODELS[type(m).__name__].blocks)


def _l2c_like_plan(steps, blocks):
    """Branch-level, shaped like Learning-to-Cache's: full steps alternate; at the steps between,
    some attention and some MLP branches reuse, with a first-order correction (gamma)."""
    compute = [[[i % 2 == 0 or (b + i) % 3 == 0, i % 2 == 0 or (b + i) % 2 == 1] for b in range(blocks)]
               for i in range(steps)]
    gamma = [0.0 if i % 2 == 0 or i < 3 else 0.5 for i in range(steps)]
    return CachePlan(steps, blocks, "branch", compute, gamma, meta={"policy": "L2C"})


def _snapshot(m):
    return dict(vars(m)), [dict(vars(b)) for b in m.modules()]


def _same_attrs(before, after):
    return before[0].keys() == after[0].keys() and all(a.keys() == b.keys() for a, b in zip(before[1], after[1]))


# ------------------------------------------------------------------------------ branch plans
@pytest.mark.parametrize("name", MODELS)
def test_full_branch_plan_equals_unpatched_and_disable_restores(name):
    m, shape, inputs = dm.make(name)
    ref = dm.sample(m, shape, inputs, STEPS)
    before = _snapshot(m)
    od.enable(m, CachePlan.full(STEPS, _n_blocks(m), "branch"), steps=STEPS)
    rt = od.adapter_of(m)[1]
    assert rt.granularity == "branch"
    assert any("forward" in vars(sub) for bb in rt.bound for _, _, sub in bb.branches())
    out = dm.sample(m, shape, inputs, STEPS)
    od.disable(m)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert _same_attrs(before, _snapshot(m))
    assert all(torch.equal(a, b) for a, b in zip(ref, dm.sample(m, shape, inputs, STEPS)))


@pytest.mark.parametrize("name", ["Flux", "PixArt", "Wan"])
def test_branch_reuse_returns_the_pre_gate_output_forecast(name):
    """At a reuse step each branch submodule returns its stored pre-gate output plus the plan's
    forecast, ``F + γ1 D1 + γ2 D2`` from its last computed outputs; the block applies the gate."""
    m, shape, inputs = dm.make(name)
    n = _n_blocks(m)
    reuse = (3, 5)  # attention reuses at both; the MLP of odd blocks too
    compute = [[[i not in reuse, i not in reuse or b % 2 == 0] for b in range(n)] for i in range(STEPS)]
    gamma, gamma2 = [0, 0, 0, 0.5, 0, 0.7], [0, 0, 0, 0.25, 0, 0.3]
    plan = CachePlan(STEPS, n, "branch", compute, gamma, gamma2)
    od.enable(m, plan, steps=STEPS)
    rt = od.adapter_of(m)[1]
    seen, handles = {}, []  # (block, kind, j) -> per step: the submodule's output (a tuple's tensors)
    for k, bb in enumerate(rt.bound):
        for kind, j, sub in bb.branches():
            def hook(module, args, out, key=(k, kind, j)):
                outs = (out,) if torch.is_tensor(out) else tuple(out)
                seen.setdefault(key, []).append([o.clone() if torch.is_tensor(o) else None for o in outs])
            handles.append(sub.register_forward_hook(hook))
    out = dm.sample(m, shape, inputs, STEPS)
    s = od.summary(m)
    for h in handles:
        h.remove()
    od.disable(m)
    assert s.granularity == "branch"
    assert s.contexts[None]["branch_trace"] == compute
    assert torch.equal(s.decisions, torch.tensor(compute, dtype=torch.float32))
    assert all(torch.isfinite(o).all() for o in out)
    checked = 0
    for (k, kind, j), per_step in seen.items():
        assert len(per_step) == STEPS
        computed = [i for i in range(STEPS) if compute[i][k][kind]]
        for i in range(STEPS):
            if compute[i][k][kind]:
                continue
            o = [per_step[c] for c in computed if c < i][-3:]  # the last three computed outputs
            for e, got in enumerate(per_step[i]):
                if got is None:
                    continue
                f0, f1, f2 = o[-1][e], o[-2][e], o[-3][e]
                d1, d1_old = f0 - f1, f1 - f2
                want = f0 + gamma[i] * d1 + gamma2[i] * (d1 - d1_old)
                assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item()), (k, kind, j, i, e)
                checked += 1
    assert checked >= 2 * n


def test_branch_plan_keeps_its_saving_and_summary_matches_plan_fraction(tmp_path):
    """L2C's branch plan on Flux (through ``L2CConfig(plan_path=...)``, as a trained router
    exports it) runs per branch; the summary's compute fraction (linear FLOPs counted) equals the
    plan's branch-level fraction from the per-branch linear FLOPs within 0.02; projecting it to
    ``block`` spends more."""
    m, shape, inputs = dm.make("Flux")
    n = _n_blocks(m)
    plan = _l2c_like_plan(STEPS, n)
    path = tmp_path / "l2c.json"
    plan.save(path)
    od.enable(m, L2CConfig(plan_path=str(path)), steps=STEPS)
    rt = od.adapter_of(m)[1]
    dm.sample(m, shape, inputs, STEPS)
    s = od.summary(m)
    costs = next(iter(rt.session.costs.values()))  # the linear FLOPs measured per block and branch
    part, outside = [list(p) for p in costs.parts], costs.outside
    od.disable(m)
    assert s.granularity == "branch" and s.contexts[None]["branch_trace"] == plan.compute
    assert all(p[0] > 0 and p[1] > 0 and p[2] > 0 for p in part) and outside > 0
    # the plan's branch-level fraction from the measured per-branch linear FLOPs
    spent = sum(outside + sum(p[2] + a * p[0] + mlp * p[1] for p, (a, mlp) in zip(part, row))
                for row in plan.compute)
    fraction = spent / (STEPS * (outside + sum(map(sum, part))))
    assert abs(s.compute_fraction - fraction) < 0.02
    assert abs(s.contexts[None]["plan_compute_fraction"] - fraction) < 1e-9
    od.enable(m, plan, steps=STEPS, granularity="block")
    dm.sample(m, shape, inputs, STEPS)
    block = od.summary(m)
    od.disable(m)
    assert block.granularity == "block"
    assert s.compute_fraction < block.compute_fraction - 0.02  # 0.79 vs 0.84 here


def test_blocks_without_branches_project_branch_plans(monkeypatch):
    """A block class that declares no branches: branch policies run per block (the fallback);
    asking for ``granularity="branch"`` is refused, naming the missing declaration."""
    io = od.BLOCKS["WanTransformerBlock"]
    monkeypatch.setitem(od.BLOCKS, "WanTransformerBlock", dataclasses.replace(io, attn=(), mlp=()))
    m, shape, inputs = dm.make("Wan")
    n = _n_blocks(m)
    for config in (FORAConfig(), _l2c_like_plan(STEPS, n)):
        od.enable(m, config, steps=STEPS)
        assert od.adapter_of(m)[1].granularity == "block"
        dm.sample(m, shape, inputs, STEPS)
        assert od.summary(m).granularity == "block"
        od.disable(m)
    with pytest.raises(ValueError, match="granularity 'step', 'block' on WanTransformer3DModel"):
        od.enable(m, FORAConfig(), steps=STEPS, granularity="branch")
    assert not hasattr(m, od._ATTR)


def test_branch_compile_fullgraph_no_recompile():
    """A branch plan on Flux with different actions per branch within a step (tuple attention
    outputs, a Linear branch, STORE / REUSE / COMPUTE, D1 and D2, per-step gamma device
    scalars): every step pattern compiles once with fullgraph=True, no recompile over two runs,
    equal to eager; the traced calls' compute fraction is the plan's."""
    import torch._dynamo

    torch._dynamo.reset()
    m, shape, inputs = dm.make("Flux")
    p = _l2c_like_plan(STEPS, _n_blocks(m))
    plan = CachePlan(STEPS, p.blocks, "branch", p.compute, p.gamma, [0.0] * (STEPS - 1) + [0.25])
    od.enable(m, plan, steps=STEPS)
    assert len(set(od.adapter_of(m)[1].session.actions)) >= 4
    eager = dm.sample(m, shape, inputs, STEPS)
    frac = od.summary(m).compute_fraction
    compiled = torch.compile(m, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # the second run only replays
            out = dm.sample(m, shape, inputs, STEPS, fn=compiled)
            assert _max_err(eager, out) < 5e-3
    s = od.summary(m)
    od.disable(m)
    torch._dynamo.reset()
    assert s.granularity == "branch" and frac < 1
    assert abs(s.compute_fraction - frac) < 1e-9
    assert abs(s.compute_fraction - s.contexts[None]["plan_compute_fraction"]) < 1e-9


# ----------------------------------------------------------------------- per-sample decisions
def _run(m, x, inputs, steps):
    outs = []
    for i in range(steps):
        t = torch.full((x.shape[0],), 999.0 * (1 - i / steps))
        with torch.no_grad():
            out = m(**inputs(x, t), return_dict=False)[0]
        outs.append(out)
        x = x - out[:, : x.shape[1]] / steps
    return outs


def _alone(inputs, s, batch=2):
    """Sample ``s``'s inputs alone (every tensor with a batch dimension sliced)."""
    return lambda x, t: {k: v[s:s + 1] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v
                         for k, v in inputs(x, t).items()}


@pytest.mark.parametrize("name", PER_SAMPLE_MODELS)
@pytest.mark.parametrize("config", [FirstBlockCacheConfig, TeaCacheConfig], ids=["fbc", "teacache"])
def test_per_sample_equals_each_sample_alone(name, config):
    """With two prompts in one call, each sample's decisions and outputs equal running it alone
    (whole-batch mode on a batch of one); at some steps one sample computes and the other reuses."""
    steps = 8
    m, shape, inputs = dm.make(name)
    x = torch.randn(shape, generator=dm._g(0))
    x[1] *= 2  # the samples move differently
    od.enable(m, config(threshold=0.0), steps=steps, per_sample=True)
    _run(m, x, inputs, steps)
    rels = sorted(r for d in od.summary(m).contexts[None]["stats"][1:] for r in d["signal_rel_l1"])
    od.disable(m)
    best = None  # the threshold (a midpoint between measured changes) with the most mixed steps
    for thr in [(a + b) / 2 for a, b in zip(rels, rels[1:])]:
        od.enable(m, config(threshold=thr), steps=steps, per_sample=True)
        rt = od.adapter_of(m)[1]
        outs = _run(m, x, inputs, steps)
        s = od.summary(m)
        od.disable(m)
        dec = [d["compute"] for d in s.contexts[None]["stats"]]
        mixed = sum(a != b for a, b in dec)
        if best is None or mixed > best[0]:
            best = (mixed, thr, dec, outs, s, rt)
    mixed, thr, dec, outs, s, rt = best
    assert mixed >= 1 and all(len(d) == 2 for d in dec)
    # the sub-batch's linear FLOPs: each remaining block at the fraction of samples that ran it
    costs = next(iter(rt.session.costs.values()))
    trace, cost, outside = s.contexts[None]["trace"], [sum(p) for p in costs.parts], costs.outside
    assert [row[-1] for row in trace] == [sum(d) / 2 for d in dec]
    spent = sum(outside + sum(w * c for w, c in zip(cost, row)) for row in trace)
    assert abs(s.compute_fraction - spent / (steps * (outside + sum(cost)))) < 1e-9
    assert s.compute_fraction < 1
    for smp in range(2):
        od.enable(m, config(threshold=thr), steps=steps)
        alone = _run(m, x[smp:smp + 1], _alone(inputs, smp), steps)
        stats = od.summary(m).contexts[None]["stats"]
        od.disable(m)
        assert [d["compute"] for d in stats] == [d[smp] for d in dec]
        assert _max_err([o[smp:smp + 1] for o in outs], alone) < 1e-4


def test_per_sample_needs_declared_batch_arguments(monkeypatch):
    m, shape, inputs = dm.make("Wan")
    od.enable(m, FirstBlockCacheConfig(threshold=0.1), steps=STEPS)  # the default: one decision per call
    dm.sample(m, shape, inputs, STEPS)
    assert all(isinstance(d["compute"], bool) for d in od.summary(m).contexts[None]["stats"])
    od.disable(m)
    io = od.BLOCKS["WanTransformerBlock"]
    monkeypatch.setitem(od.BLOCKS, "WanTransformerBlock", dataclasses.replace(io, batched=None))
    with pytest.raises(TypeError, match="per_sample: block class.* WanTransformerBlock declare no batched"):
        od.enable(m, FirstBlockCacheConfig(threshold=0.1), steps=STEPS, per_sample=True)
    assert not hasattr(m, od._ATTR)
