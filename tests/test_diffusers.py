"""omnicache.integrations.diffusers on tiny random diffusers transformers (CPU; one cuda test)."""

import contextlib
import dataclasses
import types

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install omnicache[diffusers])")

import diffusers_models as dm  # noqa: E402

from omnicache.integrations import diffusers as od  # noqa: E402
from omnicache.integrations.diffusers.models import model_blocks  # noqa: E402
from omnicache.plan import CachePlan  # noqa: E402
from omnicache.policies import (FirstBlockCacheConfig, FORAConfig, NoCacheConfig, TaylorSeerConfig,  # noqa: E402
                                TeaCacheConfig)

STEPS = 6
MODELS = list(dm.MODELS)


def _max_err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _n_blocks(m):
    return sum(len(getattr(m, name)) for name in od.MODELS[type(m).__name__].blocks)


@pytest.mark.parametrize("name", MODELS)
def test_block_order_matches_forward(name):
    """The adapter's block order (MODELS: lists in turn, or interleaved) is the order forward calls them."""
    from omnicache.integrations.diffusers.models import model_blocks

    m, shape, inputs = dm.make(name)
    order = [b.module for b in model_blocks(m)]
    called = []
    handles = [b.register_forward_pre_hook(lambda mod, args: called.append(mod)) for b in order]
    dm.sample(m, shape, inputs, 1)
    for h in handles:
        h.remove()
    assert [id(b) for b in called] == [id(b) for b in order]


@pytest.mark.parametrize("name", MODELS)
def test_full_plan_equals_unpatched_and_disable_restores(name):
    m, shape, inputs = dm.make(name)
    ref = dm.sample(m, shape, inputs, STEPS)
    before = dict(vars(m)), [dict(vars(b)) for b in m.modules()]
    for config, gran in [(NoCacheConfig(), None), (CachePlan.full(STEPS, _n_blocks(m), "block"), None),
                         (FirstBlockCacheConfig(threshold=0.0), None)]:
        od.enable(m, config, steps=STEPS, granularity=gran)
        out = dm.sample(m, shape, inputs, STEPS)
        assert all(torch.equal(a, b) for a, b in zip(ref, out)), config
        od.disable(m)
    after = dict(vars(m)), [dict(vars(b)) for b in m.modules()]
    assert before[0].keys() == after[0].keys()
    assert all(a.keys() == b.keys() for a, b in zip(before[1], after[1]))
    out = dm.sample(m, shape, inputs, STEPS)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("config", [FORAConfig(), TaylorSeerConfig(order=2), FORAConfig(granularity="step"),
                                    TeaCacheConfig(threshold=0.1), FirstBlockCacheConfig(threshold=0.1)],
                         ids=["fora-branch", "taylorseer2", "fora-step", "teacache", "fbc"])
def test_policies_run_and_summary(name, config):
    m, shape, inputs = dm.make(name)
    ref = dm.sample(m, shape, inputs, STEPS)
    od.enable(m, config, steps=STEPS)
    out = dm.sample(m, shape, inputs, STEPS)
    s = od.summary(m)
    od.disable(m)
    ctx = s.contexts[None]
    assert len(ctx["trace"]) == STEPS and len(ctx["stats"]) == STEPS
    assert all(len(row) == _n_blocks(m) for row in ctx["trace"])
    assert all(ctx["trace"][0])  # the first step computes
    assert 0 < s.compute_fraction <= 1 and s.cache_bytes > 0
    if config.kind == "static":
        assert s.compute_fraction < 1  # these plans reuse
    assert all(torch.isfinite(o).all() for o in out)
    assert _max_err(ref, out) < 1.0


@pytest.mark.parametrize("config", [FORAConfig(granularity="step"), TaylorSeerConfig(order=2)],
                         ids=["fora-step", "taylorseer2"])
def test_latte_step_plans_run_per_block(config):
    """Latte reshapes between its interleaved spatial and temporal blocks, so a step plan's residual
    cannot span the stack: each block is its own unit, and the run equals the same plan at block
    granularity bitwise."""
    m, shape, inputs = dm.make("Latte")
    n = _n_blocks(m)
    step = config.plan(STEPS, n, granularity="step")
    block = CachePlan(STEPS, n, "block", step.compute, step.gamma, step.gamma2)
    outs = []
    for plan in (step, block):
        od.enable(m, plan, steps=STEPS)
        rt = od.adapter_of(m)[1]
        assert rt.units == [(b, b + 1) for b in range(n)]
        outs.append(dm.sample(m, shape, inputs, STEPS))
        s = od.summary(m)
        od.disable(m)
        assert s.compute_fraction < 1
    assert rt.granularity == "block" and all(torch.equal(a, b) for a, b in zip(*outs))


def test_hunyuan_video_token_replace_blocks():
    """HunyuanVideo image-to-video (image_condition_type="token_replace") has its own block classes:
    the full plan equals the unpatched model bitwise; step plans and FirstBlockCache reuse."""
    m, shape, inputs = dm.make("HunyuanVideoI2V")
    assert {type(b).__name__ for b in [*m.transformer_blocks, *m.single_transformer_blocks]} == {
        "HunyuanVideoTokenReplaceTransformerBlock", "HunyuanVideoTokenReplaceSingleTransformerBlock"}
    ref = dm.sample(m, shape, inputs, STEPS)
    for config in (CachePlan.full(STEPS, _n_blocks(m), "block"), FirstBlockCacheConfig(threshold=0.0)):
        od.enable(m, config, steps=STEPS)
        out = dm.sample(m, shape, inputs, STEPS)
        od.disable(m)
        assert all(torch.equal(a, b) for a, b in zip(ref, out)), config
    for config in (FORAConfig(granularity="step"), FirstBlockCacheConfig(threshold=0.5)):
        od.enable(m, config, steps=STEPS)
        out = dm.sample(m, shape, inputs, STEPS)
        s = od.summary(m)
        od.disable(m)
        assert s.compute_fraction < 1 and _max_err(ref, out) < 1.0, config


def test_errors():
    m, shape, inputs = dm.make("DiT")
    od.enable(m, FORAConfig(), steps=STEPS)
    with pytest.raises(RuntimeError, match="already enabled on this DiTTransformer2DModel"):
        od.enable(m, FORAConfig(), steps=STEPS)
    od.disable(m)
    with pytest.raises(RuntimeError, match="not enabled"):
        od.disable(m)
    with pytest.raises(TypeError, match=r"does not support Linear; supported: DiTTransformer2DModel, .*"
                                        r"FluxTransformer2DModel"):
        od.enable(torch.nn.Linear(2, 2), FORAConfig(), steps=STEPS)
    with pytest.raises(ValueError, match="CachePlan.steps"):
        od.enable(m, CachePlan.full(STEPS + 1, _n_blocks(m)), steps=STEPS)
    assert not hasattr(m, od._ATTR)
    with pytest.raises(ValueError, match="granularity"):
        od.enable(m, CachePlan.full(STEPS, _n_blocks(m), "branch"), steps=STEPS, granularity="step")


def _l2c_like_plan(steps, blocks):
    """A branch-level plan shaped like Learning-to-Cache's: full steps alternate; at the steps
    between, some attention and some MLP branches reuse (gamma as the correction fits it)."""
    compute = [[[i % 2 == 0 or (b + i) % 3 == 0, i % 2 == 0 or (b + i) % 2 == 1] for b in range(blocks)]
               for i in range(steps)]
    gamma = [0.0 if i % 2 == 0 or i < 3 else 0.5 for i in range(steps)]
    return CachePlan(steps, blocks, "branch", compute, gamma, meta={"policy": "L2C"})


@pytest.mark.parametrize("name", ["DiT", "Flux", "Wan"])
def test_l2c_branch_plan_projected_with_block_granularity(name, tmp_path):
    """An L2C plan (branch level) with ``granularity="block"`` runs projected: a block computes
    where either of its branches does; the same through ``L2CConfig(plan_path=...)``. (By default
    it runs per branch: tests/test_diffusers_branch.py.)"""
    from omnicache.policies import L2CConfig

    m, shape, inputs = dm.make(name)
    plan = _l2c_like_plan(STEPS, _n_blocks(m))
    block = plan.to_block()
    assert block.granularity == "block" and not any(block.gamma)
    assert [[c[0] for c in row] for row in block.compute] == [[a or b for a, b in row] for row in plan.compute]
    path = tmp_path / "l2c.json"
    plan.save(path)
    traces = []
    for config in (plan, L2CConfig(plan_path=str(path)), block):
        od.enable(m, config, steps=STEPS, granularity="block")
        out = dm.sample(m, shape, inputs, STEPS)
        s = od.summary(m)
        od.disable(m)
        assert s.granularity == "block" and s.compute_fraction < 1
        traces.append((s.contexts[None]["trace"], out))
    expect = [[c[0] for c in row] for row in block.compute]
    for trace, out in traces:
        assert [list(map(bool, row)) for row in trace] == expect
        assert all(torch.equal(a, b) for a, b in zip(out, traces[-1][1]))


def test_cache_contexts_keep_separate_state():
    """cond/uncond calls through ``cache_context`` equal two separate runs."""
    m, shape, inputs = dm.make("Flux")
    config = TaylorSeerConfig()
    od.enable(m, config, steps=STEPS)
    runs = {c: dm.sample(m, shape, inputs, STEPS, seed=s) for c, s in (("cond", 0), ("uncond", 1))}
    x = {"cond": torch.randn(shape, generator=dm._g(0)), "uncond": torch.randn(shape, generator=dm._g(1))}
    outs = {"cond": [], "uncond": []}
    for i in range(STEPS):
        t = torch.full((shape[0],), 999.0 * (1 - i / STEPS))
        for c in ("cond", "uncond"):
            with m.cache_context(c), torch.no_grad():
                out = m(**inputs(x[c], t), return_dict=False)[0]
            outs[c].append(out)
            x[c] = x[c] - out[:, : shape[1]] / STEPS
    s = od.summary(m)
    od.disable(m)
    assert set(s.contexts) == {None, "cond", "uncond"}
    for c in ("cond", "uncond"):
        assert len(s.contexts[c]["trace"]) == STEPS
        assert _max_err(runs[c], outs[c]) == 0


def test_pipeline_scheduler_sets_steps():
    from diffusers import FlowMatchEulerDiscreteScheduler

    m, shape, inputs = dm.make("DiT")
    pipe = types.SimpleNamespace(transformer=m, scheduler=FlowMatchEulerDiscreteScheduler())
    od.enable(pipe, FORAConfig())
    with pytest.raises(RuntimeError, match="number of steps is unknown"):
        dm.sample(m, shape, inputs, 1)
    pipe.scheduler.set_timesteps(STEPS)
    dm.sample(m, shape, inputs, STEPS)
    assert od.summary(pipe).steps == STEPS
    od.disable(pipe)
    assert "set_timesteps" not in vars(pipe.scheduler)


_FBC_XFAIL = {  # diffusers' own FirstBlockCache fails on these (raises, reason)
    "SD3": (TypeError, "diffusers' own FBC fails on SD3: its last block returns encoder_hidden_states=None "
                       "(None - Tensor in FBCBlockHook)"),
    "Latte": (RuntimeError, "diffusers' own FBC chains transformer_blocks then temporal_transformer_blocks "
                            "(forward interleaves them) and takes the tail residual across the reshape: "
                            "(batch*tokens, frames, D) - (batch*frames, tokens, D) in FBCBlockHook"),
    "Sana": (ValueError, "diffusers' own FBC has no TransformerBlockRegistry entry for SanaTransformerBlock"),
    "Lumina2": (ValueError, "diffusers' own FBC has no TransformerBlockRegistry entry for "
                            "Lumina2TransformerBlock"),
}
FBC_MODELS = [pytest.param(n, marks=pytest.mark.xfail(raises=_FBC_XFAIL[n][0], strict=True, reason=_FBC_XFAIL[n][1]))
              if n in _FBC_XFAIL else n for n in MODELS]


@pytest.mark.parametrize("name", FBC_MODELS)
def test_first_block_cache_matches_diffusers(name):
    """Same model, same threshold: the same compute/reuse decisions as diffusers' own FBC."""
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    def cond(model):  # DiT, PixArt and SD3 have no cache_context(): set diffusers' hook context directly
        if hasattr(model, "cache_context"):
            return model.cache_context("cond")
        _set_cache_context(model, CacheContext("cond"))
        return contextlib.nullcontext()

    steps = 10
    m, shape, inputs = dm.make(name)
    key = "cond" if hasattr(m, "cache_context") else None
    od.enable(m, FirstBlockCacheConfig(threshold=0.0), steps=steps)
    with cond(m):
        dm.sample(m, shape, inputs, steps)
    rels = [d["signal_rel_l1"] for d in od.summary(m).contexts[key]["stats"][1:]]
    od.disable(m)
    threshold = sorted(rels)[len(rels) // 2]  # the median: some steps reuse, others compute
    threshold += 1e-6  # away from equality, where the rules differ (>= vs >)

    od.enable(m, FirstBlockCacheConfig(threshold=threshold), steps=steps)
    with cond(m):
        ours = dm.sample(m, shape, inputs, steps)
    ours_dec = [d["compute"] for d in od.summary(m).contexts[key]["stats"]]
    od.disable(m)

    theirs_dec = []
    orig = FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self, residual):
        theirs_dec.append(orig(self, residual))
        return theirs_dec[-1]

    m2, _, _ = dm.make(name)
    apply_first_block_cache(m2, DiffusersFBC(threshold=threshold))
    FBCHeadBlockHook._should_compute_remaining_blocks = spy
    try:
        with cond(m2):
            theirs = dm.sample(m2, shape, inputs, steps)
    finally:
        FBCHeadBlockHook._should_compute_remaining_blocks = orig
    assert ours_dec == theirs_dec
    assert 0 < sum(ours_dec) < steps
    assert _max_err(ours, theirs) < 1e-4


def _compile_xfail():
    import torch._dynamo.exc

    return pytest.mark.xfail(
        raises=torch._dynamo.exc.UserError, strict=True,
        reason="Lumina2 does not compile with fullgraph=True even without omnicache: its rope embedder reads "
               "the caption lengths back (attention_mask.sum(dim=1).tolist()) and sizes tensors with them "
               "(data-dependent expression u0 + 16)")


COMPILE_MODELS = [pytest.param(n, marks=_compile_xfail()) if n == "Lumina2" else n for n in MODELS]


@pytest.mark.parametrize("name", COMPILE_MODELS)
def test_compile_fullgraph_no_recompile(name):
    """TaylorSeer order 2 (STORE / REUSE steps, D1 and D2, per-step gamma): every step pattern
    compiles once with fullgraph=True; no recompile over two runs; equal to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    m, shape, inputs = dm.make(name)
    od.enable(m, TaylorSeerConfig(order=2), steps=STEPS)
    eager = dm.sample(m, shape, inputs, STEPS)
    compiled = torch.compile(m, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # the second run only replays
            out = dm.sample(m, shape, inputs, STEPS, fn=compiled)
            assert _max_err(eager, out) < 5e-3  # inductor's fusions round differently; D2 amplifies
    od.disable(m)
    torch._dynamo.reset()


@pytest.mark.cuda
def test_cuda_graph_capture_replay():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    m, shape, inputs = dm.make("Flux")
    m = m.cuda()
    cuda_inputs = lambda x, t: {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs(x, t).items()}
    plan = FORAConfig(interval=2, granularity="block").plan(STEPS, _n_blocks(m))
    od.enable(m, plan, steps=STEPS)

    def run(step_fn):
        x, outs = torch.randn(shape, generator=dm._g(0)).cuda(), []
        for i in range(STEPS):
            out = step_fn(i, x)
            outs.append(out.clone())
            x = x - out[:, : shape[1]] / STEPS
        return outs

    t_of = lambda i: torch.full((shape[0],), 999.0 * (1 - i / STEPS), device="cuda")
    with torch.no_grad():
        eager = run(lambda i, x: m(**cuda_inputs(x, t_of(i)), return_dict=False)[0])  # allocates the buffers
    od.reset(m)
    rt = od.adapter_of(m)[1]
    static_x, static_t = torch.zeros(shape, device="cuda"), torch.zeros(shape[0], device="cuda")
    graphs = {}  # one graph per distinct step pattern; the buffers exist, so capture allocates none

    def graph_step(i, x):
        static_x.copy_(x)
        static_t.copy_(t_of(i))
        key = rt.step_actions
        if key not in graphs:
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(g):
                static_out = m(**cuda_inputs(static_x, static_t), return_dict=False)[0]
            graphs[key] = (g, static_out)
            # capture recorded the call without running it: undo its bookkeeping
            ctx = rt.current
            ctx.step -= 1
            ctx.log.pop()
            rt.installer.switch(ctx.name)
        g, static_out = graphs[key]
        g.replay()
        rt.installer.before_call(m, ())  # the step's bookkeeping, as the forward hooks do eagerly
        rt.installer.after_call(m, (), None)
        return static_out

    outs = run(graph_step)
    od.disable(m)
    assert len(graphs) == 2
    assert _max_err(eager, outs) < 1e-3


def test_latte_dynamic_span_may_not_cross_a_layout_change():
    """Latte's blocks alternate spatial / temporal layouts: the remaining-blocks residual of a
    dynamic policy must start in the list the last block belongs to (temporal)."""
    m, _, _ = dm.make("Latte")
    with pytest.raises(ValueError, match="first_blocks"):
        od.enable(m, FirstBlockCacheConfig(first_blocks=2), steps=STEPS)
    assert not hasattr(m, od._ATTR)
    od.enable(m, FirstBlockCacheConfig(first_blocks=3), steps=STEPS)
    od.disable(m)


@pytest.mark.parametrize("name", ["Flux", "Wan"])
def test_dbcache_back_blocks_and_consecutive_cap(name):
    """DBCache on a diffusers model: the last block runs every call, the middle is reused at
    most ``max_consecutive`` calls in a row; threshold 0 equals the uncached model."""
    m, shape, inputs = dm.make(name)
    n = len(model_blocks(m))
    with torch.no_grad():
        ref = dm.sample(m, shape, inputs, STEPS)
    cfg = FirstBlockCacheConfig(threshold=1e9, last_blocks=1, max_consecutive=2)
    od.enable(m, cfg, steps=STEPS)
    with torch.no_grad():
        dm.sample(m, shape, inputs, STEPS)
    s = od.summary(m)
    od.disable(m)
    ctx = next(iter(s.contexts.values()))
    pattern = [i % 3 == 0 for i in range(STEPS)]  # computed, then two reused, ...
    assert [d["compute"] for d in ctx["stats"]] == pattern
    assert all(t[0] and t[n - 1] for t in ctx["trace"])  # the first and the last block: every call
    assert [all(t) for t in ctx["trace"]] == pattern
    od.enable(m, dataclasses.replace(cfg, threshold=0.0), steps=STEPS)
    with torch.no_grad():
        exact = dm.sample(m, shape, inputs, STEPS)
    od.disable(m)
    assert _max_err(ref, exact) < 1e-5
    with pytest.raises(ValueError, match="last"):
        od.enable(m, FirstBlockCacheConfig(first_blocks=2, last_blocks=n - 2), steps=STEPS)


@pytest.mark.parametrize("name", ["Flux", "Wan"])
def test_dynamic_flops_counted_from_costs_equal_the_linear_layers(name):
    """After one call with given shapes computes every block, a whole-batch dynamic policy
    counts later calls from the measured per-block costs with its Linear hooks detached (the
    hooks slow every Linear call); the summary still equals the FLOPs the Linear layers ran,
    counted here by our own hooks, and a new batch size is measured again."""
    m, shape, inputs = dm.make(name)
    ran = []

    def count(module, args, out):
        ran.append(2 * module.in_features * module.out_features * (args[0].numel() // module.in_features))
    linears = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    handles = [x.register_forward_hook(count) for x in linears]
    od.enable(m, FirstBlockCacheConfig(threshold=1e9, max_consecutive=1), steps=STEPS)  # compute, reuse, ...
    n_hooks = sum(len(x._forward_hooks) for x in linears)
    for batch in (shape[0], 1):
        sub = (batch, *shape[1:])
        sub_inputs = lambda x, t, _b=batch: {k: (v[:_b] if torch.is_tensor(v) and v.dim() and v.shape[0] == shape[0]
                                                 and k != "img_ids" else v) for k, v in inputs(x, t).items()}
        for _ in range(2):
            ran.clear()
            dm.sample(m, sub, sub_inputs, STEPS)
            s = od.summary(m)
            dec = [d["compute"] for d in next(iter(s.contexts.values()))["stats"]]
            assert dec == [i % 2 == 0 for i in range(STEPS)], dec
            assert s.flops == pytest.approx(sum(ran), rel=1e-12)
            # the last call reused or computed with known shapes: only our own counting hooks remain
            assert sum(len(x._forward_hooks) for x in linears) == len(linears)
    assert n_hooks == 2 * len(linears)
    od.disable(m)
    for h in handles:
        h.remove()
    assert not any(x._forward_hooks for x in linears)
