"""Calibration on the user's own diffusers model: oc.calibrate (OmniCache, L2C, TeaCache, MagCache),
plans that know their model, on a tiny random Flux driven by a plain Euler loop and by a
real FluxPipeline (no text encoders: prompt_embeds are passed)."""

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install omnicache[diffusers])")

import diffusers_models as dm  # noqa: E402

from omnicache.integrations import diffusers as oc  # noqa: E402
from omnicache import fit_correction  # noqa: E402
from omnicache.plan import CachePlan  # noqa: E402
from omnicache.policies import FORAConfig, L2CConfig, OmniCacheConfig, TeaCacheConfig  # noqa: E402

STEPS = 12


def euler(m, shape, inputs, seed):
    """One sampling run of the user's own loop (a plain Euler loop over the transformer)."""
    def run():
        x = torch.randn(shape, generator=dm._g(seed))
        with torch.no_grad():
            for i in range(STEPS):
                t = torch.full((shape[0],), 999.0 * (1 - i / STEPS))
                x = x - m(**inputs(x, t), return_dict=False)[0] / STEPS
        return x
    return run


def _final_error(target, plan, run, ref):
    oc.enable(target, plan, steps=STEPS)
    try:
        x = run()
        s = oc.summary(target)
    finally:
        oc.disable(target)
    return float((x - ref).double().square().mean()), s


def test_calibrate_with_run_hits_fraction_and_gamma_helps_on_unseen_inputs():
    m, shape, inputs = dm.make("Flux")
    plan = oc.calibrate(m, OmniCacheConfig(compute_fraction=0.5), run=euler(m, shape, inputs, 0), steps=STEPS,
                        progress=False)
    assert plan.steps == STEPS and plan.meta["engine"] == "diffusers"
    assert plan.meta["model"]["class"] == "FluxTransformer2DModel" and plan.meta["model"]["blocks"] == 4
    assert any(plan.gamma)
    unseen = euler(m, shape, inputs, 7)
    ref = unseen()
    err_fit, s = _final_error(m, plan, unseen, ref)
    err_plain, _ = _final_error(m, dataclasses.replace(plan, gamma=None, gamma2=None), unseen, ref)
    assert abs(s.compute_fraction - 0.5) <= 0.03
    assert err_fit < err_plain


def _flux_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    m, _, _ = dm.make("Flux")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=m)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe_kwargs(seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
                height=64, width=64, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(seed + 100))


def test_calibrate_through_flux_pipeline():
    pipe = _flux_pipe()
    plan = oc.calibrate(pipe, OmniCacheConfig(compute_fraction=0.5), progress=False, **_pipe_kwargs(0))
    assert plan.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler" and plan.meta["contexts"] == ["cond"]
    kw = _pipe_kwargs(3)  # inputs it was not calibrated on
    ref = pipe(**dict(kw, generator=torch.Generator().manual_seed(103))).images

    def run():
        return pipe(**dict(kw, generator=torch.Generator().manual_seed(103))).images
    err_fit, s = _final_error(pipe, plan, run, ref)
    err_plain, _ = _final_error(pipe, dataclasses.replace(plan, gamma=None, gamma2=None), run, ref)
    assert abs(s.compute_fraction - 0.5) <= 0.03
    assert err_fit < err_plain


def test_plans_know_their_model():
    m, shape, inputs = dm.make("Flux")
    plan = oc.calibrate(m, OmniCacheConfig(compute_fraction=0.5), run=euler(m, shape, inputs, 0), steps=STEPS,
                        progress=False)
    plan = CachePlan.from_dict(plan.to_dict())  # survives a save/load round trip
    from diffusers import FluxTransformer2DModel

    other = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[2, 6, 8])  # another config, 4 blocks
    with pytest.raises(ValueError, match=r"CachePlan\.meta\.model\.config"):
        oc.enable(other, plan, steps=STEPS)
    assert not hasattr(other, oc.install._ATTR)
    with pytest.raises(ValueError, match=r"CachePlan\.steps"):
        oc.enable(m, plan, steps=STEPS + 1)
    oc.enable(other, plan, steps=STEPS, check_plan=False)  # the documented override
    oc.disable(other)
    pipe = _flux_pipe()
    from diffusers import DPMSolverMultistepScheduler

    pipe_plan = dataclasses.replace(plan, meta=dict(plan.meta, scheduler="DPMSolverMultistepScheduler",
                                                    model=dict(plan.meta["model"])))
    pipe_plan.meta["model"]["config"] = __import__("omnicache").plan.model_fingerprint(pipe.transformer, 4)["config"]
    with pytest.raises(ValueError, match=r"CachePlan\.meta\.scheduler"):
        oc.enable(pipe, pipe_plan)
    assert DPMSolverMultistepScheduler  # the class named in the message exists


def test_uncalibrated_configs_and_missing_steps_refused_at_enable():
    m, _, _ = dm.make("Flux")
    for config in (OmniCacheConfig(compute_fraction=0.5), L2CConfig()):
        with pytest.raises(ValueError, match="calibrate"):
            oc.enable(_flux_pipe(), config)
    with pytest.raises(ValueError, match="steps"):
        oc.enable(m, FORAConfig())
    assert not hasattr(m, oc.install._ATTR)
    with pytest.raises(ValueError, match="run"):
        oc.calibrate(m, OmniCacheConfig(compute_fraction=0.5), steps=STEPS)
    with pytest.raises(ValueError, match="filtering"):
        oc.calibrate(_flux_pipe(), OmniCacheConfig(compute_fraction=0.5, filtering=True), **_pipe_kwargs(0))
    with pytest.raises(TypeError, match="OmniCacheConfig"):
        oc.calibrate(_flux_pipe(), FORAConfig(), **_pipe_kwargs(0))


def test_fit_teacache_on_the_model():
    m, shape, inputs = dm.make("Flux")
    cfg = oc.calibrate(m, TeaCacheConfig(threshold=0.05, degree=2), run=euler(m, shape, inputs, 0), steps=STEPS)
    assert len(cfg.coefficients) == 3 and cfg.coefficients != TeaCacheConfig().coefficients
    oc.enable(m, cfg, steps=STEPS)
    euler(m, shape, inputs, 1)()
    s = oc.summary(m)
    oc.disable(m)
    assert 0 < s.compute_fraction <= 1


def test_train_router_plan_keeps_its_branch_saving():
    """Learning-to-Cache on tiny Flux: the summary's counted compute fraction equals the plan's
    branch-level fraction (FLOPs measured per block and branch) within 0.02."""
    m, shape, inputs = dm.make("Flux")
    plan = oc.calibrate(m, L2CConfig(compute_fraction=0.7, iters=8), run=euler(m, shape, inputs, 0), steps=STEPS,
                           progress=False)
    assert plan.granularity == "branch" and plan.meta["model"]["class"] == "FluxTransformer2DModel"
    assert abs(plan.meta["flops_fraction"] - 0.7) <= 0.03 and plan.meta["removed_in_cache_steps"] > 0
    oc.enable(m, plan, steps=STEPS)
    euler(m, shape, inputs, 3)()
    s = oc.summary(m)
    oc.disable(m)
    assert s.granularity == "branch"
    assert abs(s.compute_fraction - plan.meta["flops_fraction"]) <= 0.02
    with pytest.raises(ValueError, match="correction.*pipeline"):  # γ on a branch plan: through a scheduler
        oc.calibrate(m, L2CConfig(correction=True), run=euler(m, shape, inputs, 0), steps=STEPS)


def test_l2c_with_gamma_through_the_pipeline():
    """L2C + γ: OmniCache's closed-loop γ fitted on the router's branch plan against the next
    latent through the pipeline's scheduler; on inputs it was not trained on, the final
    latent is closer to uncached than with the same plan and γ = 0."""
    cfg = L2CConfig(compute_fraction=0.6, iters=8, correction=True)
    pipe = _flux_pipe()
    plan = oc.calibrate(pipe, cfg, progress=False, **_pipe_kwargs(0))
    assert plan.meta["policy"] == "L2C+gamma" and plan.meta["gamma_fit"].startswith("closed loop, next latent")
    kw = _pipe_kwargs(3)

    def run():
        return pipe(**dict(kw, generator=torch.Generator().manual_seed(103))).images
    ref = run()
    err_fit, _ = _final_error(pipe, plan, run, ref)
    plain = dataclasses.replace(plan, gamma=None, gamma2=None)
    err_plain, _ = _final_error(pipe, plain, run, ref)
    assert err_fit < err_plain
    refit = fit_correction(oc.DiffusersEngine(pipe, progress=False, **_pipe_kwargs(0)), plain)  # on a plan held as a value
    assert refit.meta["policy"] == "L2C+gamma"  # the same fit, up to the float order of multithreaded sums
    assert refit.gamma == pytest.approx(plan.gamma, rel=1e-9, abs=1e-12)
    assert refit.gamma2 == pytest.approx(plan.gamma2, rel=1e-9, abs=1e-12)


def test_latte_calibration_router_and_magcache():
    """Latte changes its token layout between blocks (spatial / temporal): calibration records
    each block's residual (as a step plan runs there), and every fitted method runs on it."""
    from omnicache.policies import MagCacheConfig

    m, shape, inputs = dm.make("Latte")

    def run(seed=0):  # Latte predicts noise and variance: dm.sample steps on the first channels
        return dm.sample(m, shape, inputs, STEPS, seed=seed)[-1]
    plan = oc.calibrate(m, OmniCacheConfig(compute_fraction=0.5), run=run, steps=STEPS, progress=False)
    _, s = _final_error(m, plan, lambda: run(5), run(5))
    assert abs(s.compute_fraction - 0.5) <= 0.03
    plan = oc.calibrate(m, L2CConfig(compute_fraction=0.7, iters=3), run=run, steps=STEPS, progress=False)
    _, s = _final_error(m, plan, run, run())
    assert abs(s.compute_fraction - plan.meta["flops_fraction"]) <= 0.02
    cfg = oc.calibrate(m, MagCacheConfig(threshold=0.3), run=run, steps=STEPS, progress=False)
    assert len(cfg.mag_ratios) == STEPS and cfg.mag_ratios[0] == 1.0
    _, s = _final_error(m, cfg, run, run())
    assert s.compute_fraction < 1.0


def test_latte_stage_aware_filtering_over_frames_rows_columns():
    """On Latte the drifts are filtered over the (frames, rows, columns) token grid: each
    block's unit maps its layout (spatial (B*F, H*W, D), temporal (B*H*W, F, D)) to the grid
    and back; the plan records the grid; Flux (no such grid) refuses filtering."""
    from omnicache.integrations.diffusers.install import adapter_of

    m, shape, inputs = dm.make("Latte")

    def run(seed=0):
        return dm.sample(m, shape, inputs, STEPS, seed=seed)[-1]
    cfg = OmniCacheConfig(compute_fraction=0.5, filtering=True)
    plan = oc.calibrate(m, cfg, run=run, steps=STEPS, progress=False)
    f, h, w = grid = (2, 4, 4)  # video_length 2, sample 8 / patch 2
    assert plan.meta["filter"]["grid"] == list(grid) and plan.meta["filtering"]
    oc.enable(m, plan, steps=STEPS)
    try:
        out = run(5)
        _, rt = adapter_of(m)
        units = rt.session.contexts[None].units
        filtered = [u for (u, n), cu in units.items() if n == "hidden_states" and cu.D1f is not None]
        assert {rt.bound[rt.units[u][0]].temporal for u in filtered} == {False, True}  # both layouts
        for u in filtered:
            to_grid, from_grid = rt.grid_layout(u)
            D1 = units[(u, "hidden_states")].D1
            assert torch.equal(from_grid(to_grid(D1)), D1)
        t = next(u for u in filtered if rt.bound[rt.units[u][0]].temporal)
        x = torch.randn(2 * h * w, f, 8)  # a temporal block's layout: row b*H*W + hw, frame t
        g = rt.grid_layout(t)[0](x)  # the grid's token (t*H + y)*W + c
        assert torch.equal(g[1, 1 * h * w + 5], x[h * w + 5, 1])
    finally:
        oc.disable(m)
    assert torch.isfinite(out).all()
    mf, _, _ = dm.make("Flux")
    with pytest.raises(ValueError, match="OmniCacheConfig.filtering"):
        oc.calibrate(mf, cfg, run=lambda: None, steps=STEPS, progress=False)
