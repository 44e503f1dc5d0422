"""Every diffusers transformer class of the model table, on a tiny random config each
(tests/zoo): an all-compute plan is bitwise the uncached model; a reuse plan really skips
(the linear layers' own count) and the summary counts exactly what ran; FirstBlockCache
takes diffusers' own FirstBlockCache's decisions wherever diffusers runs it; ``disable``
restores the model; OmniCache calibrates on it; a branch plan's counted FLOPs are what ran
and what the plan says. One process, tiny configs, a few steps each."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install omnicache[diffusers])")

import zoo  # noqa: E402

from omnicache.integrations import diffusers as oc  # noqa: E402
from omnicache.integrations.diffusers.models import MODELS, model_blocks  # noqa: E402
from omnicache.plan import CachePlan  # noqa: E402
from omnicache.policies import FirstBlockCacheConfig, FORAConfig, OmniCacheConfig, TeaCacheConfig  # noqa: E402

STEPS = 6
NAMES = sorted(zoo.ZOO)

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearCount(TorchFunctionMode):
    """Calls and FLOPs of the linear layers that really compute (``F.linear`` calls: a layer
    whose output comes from a cache does not call it), ``2 · in · out`` per row; with
    ``inside``: only the calls made while one of those modules runs (DiT's final layer calls
    the first block's ``norm1.emb`` from outside the block)."""

    def __init__(self, model, inside=None):
        super().__init__()
        self.calls = self.flops = self.depth = 0
        self.inside, self.handles = inside, []
        for m in inside or ():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args):
        self.depth += 1

    def _leave(self, module, args, output):
        self.depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and (self.inside is None or self.depth):
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self.calls += 1
            self.flops += 2 * x.numel() * w.shape[0]
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


def _run(case, config, **kw):
    oc.enable(case.model, config, steps=STEPS, **kw)
    try:
        with LinearCount(case.model) as count:
            outs = zoo.sample(case, STEPS)
        return outs, oc.summary(case.model), count
    finally:
        oc.disable(case.model)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
def test_block_order_is_the_forward_order(name):
    """The entry's blocks (lists in turn, or interleaved) are the blocks forward calls, in its order."""
    case = zoo.make(name)
    order = [b.module for b in model_blocks(case.model)]
    called = []
    handles = [b.register_forward_pre_hook(lambda mod, args: called.append(id(mod))) for b in order]
    try:
        zoo.sample(case, 1)
    finally:
        for h in handles:
            h.remove()
    assert called == [id(b) for b in order]


@pytest.mark.parametrize("name", NAMES)
def test_all_compute_plan_is_bitwise_uncached_and_disable_restores(name):
    case = zoo.make(name)
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    ref = zoo.sample(case, STEPS)
    n = len(model_blocks(case.model))
    outs, s, _ = _run(case, CachePlan.full(STEPS, n, "block"))
    assert _equal(outs, ref) and s.compute_fraction == 1.0
    assert _equal(zoo.sample(case, STEPS), ref)  # disabled: as before
    assert all(torch.equal(v, state[k]) for k, v in case.model.state_dict().items())
    assert "forward" not in vars(case.model) and not any("forward" in vars(b) for b in case.model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_reuse_plan_skips_and_counts_what_ran(name):
    """FORA at block granularity: at its reuse steps no block's linear layer runs (counted by our
    own hooks); the summary's FLOPs are the linear FLOPs that ran."""
    case = zoo.make(name)
    blocks = model_blocks(case.model)
    with LinearCount(case.model, inside=[b.module for b in blocks]) as full:
        zoo.sample(case, STEPS)
    oc.enable(case.model, FORAConfig(interval=2, granularity="block"), steps=STEPS)
    try:
        with LinearCount(case.model, inside=[b.module for b in blocks]) as cached, \
                LinearCount(case.model) as every:
            zoo.sample(case, STEPS)
        s = oc.summary(case.model)
    finally:
        oc.disable(case.model)
    assert cached.calls * 2 == full.calls  # the reuse steps (1, 3, 5) ran no block's linear layer
    assert s.flops == pytest.approx(every.flops, rel=1e-9) and s.compute_fraction < 1


def _diffusers_fbc(case, threshold):
    """diffusers' own FirstBlockCache on ``case``: its per-step decisions, or the error it raises."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    decisions, orig = [], FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self, residual):
        decisions.append(orig(self, residual))
        return decisions[-1]

    apply_first_block_cache(case.model, DiffusersFBC(threshold=threshold))
    FBCHeadBlockHook._should_compute_remaining_blocks = spy
    try:
        if hasattr(case.model, "cache_context"):
            with case.model.cache_context("cond"):
                zoo.sample(case, STEPS)
        else:
            _set_cache_context(case.model, CacheContext("cond"))
            zoo.sample(case, STEPS)
    finally:
        FBCHeadBlockHook._should_compute_remaining_blocks = orig
    return decisions


@pytest.mark.parametrize("name", NAMES)
def test_first_block_cache_takes_diffusers_decisions(name):
    case = zoo.make(name)
    key = "cond" if hasattr(case.model, "cache_context") else None
    ctx = (lambda m: m.cache_context("cond")) if key else (lambda m: contextlib.nullcontext())
    oc.enable(case.model, FirstBlockCacheConfig(threshold=0.0), steps=STEPS)
    with ctx(case.model):
        zoo.sample(case, STEPS)
    rels = [d["signal_rel_l1"] for d in oc.summary(case.model).contexts[key]["stats"][1:]]
    oc.disable(case.model)
    threshold = sorted(rels)[len(rels) // 2] + 1e-6  # the median: some steps reuse, others compute
    oc.enable(case.model, FirstBlockCacheConfig(threshold=threshold), steps=STEPS)
    with ctx(case.model):
        zoo.sample(case, STEPS)
    ours = [d["compute"] for d in oc.summary(case.model).contexts[key]["stats"]]
    oc.disable(case.model)
    assert 0 < sum(ours) < STEPS
    theirs_case = zoo.make(name)
    try:
        theirs = _diffusers_fbc(theirs_case, threshold)
    except Exception as e:  # diffusers' own hooks do not run this class: nothing to compare with
        pytest.skip(f"diffusers' FirstBlockCache does not run {name}: {type(e).__name__}: {str(e)[:120]}")
    assert ours == theirs


@pytest.mark.parametrize("name", NAMES)
def test_omnicache_calibrates_on_it(name):
    case = zoo.make(name)
    plan = oc.calibrate(case.model, OmniCacheConfig(compute_fraction=0.5), run=lambda: zoo.sample(case, STEPS),
                        steps=STEPS, progress=False)
    assert plan.meta["model"]["class"] == name
    _, s, _ = _run(case, plan)
    # compute_fraction is the share of steps computed: the blocks'; the embedders and what
    # runs outside the blocks (Lumina2's refiners) run every step
    assert [c["block_fraction"] for c in s.contexts.values()] == [0.5] * len(s.contexts)
    assert 0.5 <= s.compute_fraction < 1


@pytest.mark.parametrize("name", NAMES)
def test_branch_plan_counts_what_ran(name):
    """Where every block class declares branches: a FORA branch plan skips them, the summary's FLOPs
    are the linear FLOPs that ran, and equal what the plan says at the measured costs."""
    case = zoo.make(name)
    if not all(b.io.has_branches for b in model_blocks(case.model)):
        pytest.skip(f"{name}: its block classes declare no attention / MLP branches (branch plans run per block)")
    outs, s, count = _run(case, FORAConfig(interval=2))
    assert s.granularity == "branch" and s.compute_fraction < 1
    assert s.flops == pytest.approx(count.flops, rel=1e-9)
    assert s.compute_fraction == pytest.approx(s.contexts[next(iter(s.contexts))]["plan_compute_fraction"], rel=1e-9)


def test_every_table_entry_has_a_tiny_config():
    assert sorted(MODELS) == NAMES


def _median_threshold(case, config, **kw):
    """A threshold at the median of the signal a probe run (threshold 0) sees: some steps reuse."""
    _, s, _ = _run(case, config(threshold=0.0), **kw)
    rel = [r for c in s.contexts.values() for d in c["stats"][1:]
           for r in (d["signal_rel_l1"] if isinstance(d["signal_rel_l1"], list) else [d["signal_rel_l1"]])]
    assert all(r > 0 for r in rel), rel  # the signal moves from step to step
    return sorted(rel)[len(rel) // 2] + 1e-7, sorted(rel)


@pytest.mark.parametrize("name", NAMES)
def test_teacache_signal(name):
    """Where the entry marks the TeaCache signal (block 0's modulated input): it moves from step to
    step, TeaCache reuses some steps at a median threshold, and counts what ran."""
    case = zoo.make(name)
    if MODELS[name].norm1 is None:
        with pytest.raises(TypeError, match="modulated input"):
            oc.enable(case.model, TeaCacheConfig(threshold=0.1), steps=STEPS)
        pytest.skip(f"{name}: no modulated input to measure ({MODELS[name].note or 'ModelSpec.norm1 is None'})")
    threshold, _ = _median_threshold(case, TeaCacheConfig)
    _, s, count = _run(case, TeaCacheConfig(threshold=threshold))
    computed = [d["compute"] for c in s.contexts.values() for d in c["stats"]]
    assert 0 < sum(computed) < len(computed)
    assert s.flops == pytest.approx(count.flops, rel=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_equals_each_sample_alone(name):
    """Where every block class names its batched arguments: FirstBlockCache with two samples in
    one call decides per sample, and each sample's decisions and outputs equal running it alone;
    at some step one sample computes and the other reuses."""
    case = zoo.make(name)
    if not MODELS[name].batch_first or not all(b.io.batched is not None for b in model_blocks(case.model)):
        with pytest.raises(TypeError, match="per_sample") as refused:
            oc.enable(case.model, FirstBlockCacheConfig(threshold=0.1), steps=STEPS, per_sample=True)
        pytest.skip(f"{name}: per-sample decisions refused at enable: {refused.value}")
    x = torch.randn(case.shape, generator=zoo.g(0))
    x[1] *= 2  # the samples move differently
    _, rels = _median_threshold(case, FirstBlockCacheConfig, per_sample=True)
    best = None  # of a few thresholds between measured changes: the one with the most mixed steps
    for thr in [(a + b) / 2 for a, b in zip(rels, rels[1:])][::max(1, len(rels) // 6)]:
        oc.enable(case.model, FirstBlockCacheConfig(threshold=thr), steps=STEPS, per_sample=True)
        try:
            outs = zoo.sample(case, STEPS, x=x)
            dec = [d["compute"] for d in oc.summary(case.model).contexts[next(iter(oc.summary(case.model).contexts))]
                   ["stats"]]
        finally:
            oc.disable(case.model)
        mixed = sum(a != b for a, b in dec)
        if best is None or mixed > best[0]:
            best = (mixed, thr, dec, outs)
    mixed, thr, dec, outs = best
    assert mixed >= 1, dec
    for smp in range(2):
        alone = case.alone(smp)
        oc.enable(case.model, FirstBlockCacheConfig(threshold=thr), steps=STEPS)
        try:
            ref = zoo.sample(alone, STEPS, x=x[smp:smp + 1])
            stats = next(iter(oc.summary(case.model).contexts.values()))["stats"]
        finally:
            oc.disable(case.model)
        assert [d["compute"] for d in stats] == [d[smp] for d in dec]
        assert max((a[smp:smp + 1] - b).abs().max().item() for a, b in zip(outs, ref)) < 1e-4
