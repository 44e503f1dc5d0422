"""The systems of ``benchmarks/compare_diffusers.py`` (and ``compare_video.py``): each row's
installer on a copy of the pipeline, its knob and its calibration, and the context they run
in (:class:`Ctx`: the inputs, seeds and step count; what the calibrations prepared).

An installer is ``install(pipe, knob, ctx, target)``; a knob is ``(name, kind, lo, hi[,
bounded])`` with the kinds of :class:`omnicache.tuning.Knob` (``None``: one fixed-setting row).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json

import torch


@dataclasses.dataclass
class Ctx:
    base: object  # the loaded pipeline (never run with caching)
    steps: int
    eval_labels: list
    seed: int
    calib_labels: list
    calib_seed: int
    tune_samples: int
    progress: bool = False
    prepared: dict = dataclasses.field(default_factory=dict)

    def kwargs(self, pipe, labels):
        from omnicache.arena import digits_inputs
        return digits_inputs(pipe, labels=labels)

    def call(self, pipe, labels, seed):
        return pipe(**self.kwargs(pipe, labels), num_inference_steps=self.steps,
                    generator=torch.Generator().manual_seed(seed))

    def calib_call_kwargs(self, pipe):
        return dict(self.kwargs(pipe, self.calib_labels), num_inference_steps=self.steps,
                    generator=torch.Generator().manual_seed(self.calib_seed))


@dataclasses.dataclass
class System:
    name: str
    family: str  # "uncached", "ours", "diffusers", "cache-dit"
    install: object  # (pipe, knob, ctx, target) -> None
    # (name, "int"|"float"|"target", lo, hi[, bounded]); None: one fixed-setting row. A float
    # knob's hi is widened by the search unless bounded is True (a hard limit, e.g. a share)
    knob: tuple | None = None
    prepare: object = None  # (ctx) -> None, once per step count (calibration runs)
    note: str = ""


def _oc():
    from omnicache.integrations import diffusers as oc
    return oc


def ours_static(cfg_fn):
    def install(pipe, knob, ctx, target):
        _oc().enable(pipe, cfg_fn(knob))
    return install


def prep_teacache(ctx):
    from omnicache.policies import TeaCacheConfig
    pipe = copy.deepcopy(ctx.base)
    ctx.prepared["teacache"] = _oc().calibrate(pipe, TeaCacheConfig(), progress=ctx.progress,
                                               **ctx.calib_call_kwargs(pipe))


def prep_magcache_ours(ctx):
    from omnicache.policies import MagCacheConfig
    pipe = copy.deepcopy(ctx.base)
    ctx.prepared["magcache_ours"] = _oc().calibrate(pipe, MagCacheConfig(), progress=ctx.progress,
                                                    **ctx.calib_call_kwargs(pipe))


def install_magcache_ours(pipe, knob, ctx, target):
    _oc().enable(pipe, dataclasses.replace(ctx.prepared["magcache_ours"], threshold=knob))


def install_teacache(pipe, knob, ctx, target):
    _oc().enable(pipe, dataclasses.replace(ctx.prepared["teacache"], threshold=knob))


def install_omnicache(correction, filtering=False):
    def install(pipe, knob, ctx, target):
        from omnicache.policies import OmniCacheConfig
        key = ("omnicache", correction, filtering, knob)
        if key not in ctx.prepared:
            calib = copy.deepcopy(ctx.base)
            cfg = OmniCacheConfig(compute_fraction=knob, correction=correction, filtering=filtering)
            ctx.prepared[key] = _oc().calibrate(calib, cfg, progress=ctx.progress, **ctx.calib_call_kwargs(calib))
        _oc().enable(pipe, ctx.prepared[key])
    return install


def install_l2c(iters, gamma=False):
    def install(pipe, knob, ctx, target):
        from omnicache.policies import L2CConfig
        from omnicache.policies.l2c.export import export_plan
        from omnicache.policies.l2c.router import refresh_mask
        refresh = 2 if knob >= 0.55 else 3  # as benchmarks/compare.py: every 2 steps at 0.6, every 3 below
        key = ("l2c", refresh)
        if key not in ctx.prepared:  # one router per refresh period; its β is cut at each fraction
            calib = copy.deepcopy(ctx.base)
            cfg = L2CConfig(compute_fraction=knob, refresh=refresh, iters=iters)
            ctx.prepared[key] = _oc().calibrate(calib, cfg, progress=ctx.progress, **ctx.calib_call_kwargs(calib))
        trained = ctx.prepared[key]
        meta = dict(trained.meta)
        plan = export_plan(torch.tensor(meta["beta"]), refresh_mask(ctx.steps, refresh), meta["flops_per_step"],
                           compute_fraction=knob, meta=meta)
        plan.meta["flops_per_step"] = meta["flops_per_step"]
        if gamma:  # OmniCache's closed-loop γ on this cut of the router (one fit per plan)
            from omnicache import fit_correction
            gkey = ("l2c+gamma", refresh, knob)
            if gkey not in ctx.prepared:
                calib = copy.deepcopy(ctx.base)
                engine = _oc().DiffusersEngine(calib, progress=ctx.progress, **ctx.calib_call_kwargs(calib))
                ctx.prepared[gkey] = fit_correction(engine, plan)
            plan = ctx.prepared[gkey]
        _oc().enable(pipe, plan)
    return install


def diffusers_hook(cfg_fn):
    def install(pipe, knob, ctx, target):
        pipe.transformer.enable_cache(cfg_fn(pipe, knob, ctx))
    return install


def prep_magcache(ctx):
    from diffusers.hooks import MagCacheConfig
    pipe = copy.deepcopy(ctx.base)
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=ctx.steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pipe(**ctx.calib_call_kwargs(pipe))
    lists = [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios: {buf.getvalue()[:200]!r}")
    # one list per cache context (cond first, then uncond); MagCacheConfig takes one: the cond one
    ctx.prepared["mag_ratios"] = lists[0]
    ctx.prepared["mag_ratios_all"] = lists


def magcache_cfg(pipe, knob, ctx):
    from diffusers.hooks import MagCacheConfig
    return MagCacheConfig(threshold=knob, num_inference_steps=ctx.steps, mag_ratios=ctx.prepared["mag_ratios"])


def cachedit_install(fn, bn, taylor):
    def install(pipe, knob, ctx, target):
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
        cfg = DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=knob,
                            enable_separate_cfg=True, num_inference_steps=ctx.steps)
        cal = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylor else None
        cache_dit.enable_cache(pipe, cache_config=cfg, calibrator_config=cal)
    return install


def systems(l2c_iters: int):
    from omnicache.policies import FirstBlockCacheConfig, FORAConfig, TaylorSeerConfig
    out = [
        System("uncached", "uncached", lambda pipe, knob, ctx, target: None),
        System("ours: FORA", "ours", ours_static(lambda n: FORAConfig(interval=n)), ("interval", "int", 1, 12)),
        System("ours: TaylorSeer", "ours", ours_static(lambda n: TaylorSeerConfig(interval=n)),
               ("interval", "int", 1, 12)),
        System("ours: FirstBlockCache", "ours", ours_static(lambda x: FirstBlockCacheConfig(threshold=x)),
               ("threshold", "float", 0.0, 1.0)),
        System("ours: TeaCache", "ours", install_teacache, ("threshold", "float", 0.0, 1.0), prep_teacache),
        System("ours: MagCache", "ours", install_magcache_ours, ("threshold", "float", 0.0, 1.0), prep_magcache_ours,
               note="mag_ratios from oc.calibrate on the calibration batch (every context pooled); a static plan"),
        System("ours: OmniCache reuse only", "ours", install_omnicache(False), ("compute_fraction", "target", 0, 1)),
        System("ours: OmniCache + correction", "ours", install_omnicache(True), ("compute_fraction", "target", 0, 1)),
        System("ours: L2C", "ours", install_l2c(l2c_iters), ("compute_fraction", "target", 0, 1),
               note=f"router trained with iters={l2c_iters}"),
        System("ours: L2C + gamma", "ours", install_l2c(l2c_iters, gamma=True), ("compute_fraction", "target", 0, 1),
               note=f"the L2C row's router (iters={l2c_iters}), γ from omnicache.fit_correction on the calibration batch"),
    ]
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig as DFBC, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig)
    out += [
        System("diffusers: FirstBlockCache", "diffusers", diffusers_hook(lambda p, x, c: DFBC(threshold=x)),
               ("threshold", "float", 0.0, 1.0)),
        System("diffusers: TaylorSeer", "diffusers",
               diffusers_hook(lambda p, n, c: TaylorSeerCacheConfig(cache_interval=n)), ("cache_interval", "int", 1, 12)),
        System("diffusers: TaylorSeer lite", "diffusers",
               diffusers_hook(lambda p, n, c: TaylorSeerCacheConfig(cache_interval=n, use_lite_mode=True)),
               ("cache_interval", "int", 1, 12)),
        System("diffusers: MagCache", "diffusers", diffusers_hook(magcache_cfg), ("threshold", "float", 0.0, 1.0),
               prep_magcache, note="mag_ratios from MagCacheConfig(calibrate=True) on the calibration batch (cond context)"),
        System("diffusers: PyramidAttentionBroadcast", "diffusers",
               diffusers_hook(lambda p, n, c: PyramidAttentionBroadcastConfig(
                   spatial_attention_block_skip_range=n, current_timestep_callback=lambda: p.current_timestep)),
               ("spatial_attention_block_skip_range", "int", 1, 12)),
        System("diffusers: FasterCache", "diffusers",
               diffusers_hook(lambda p, n, c: FasterCacheConfig(
                   spatial_attention_block_skip_range=n, current_timestep_callback=lambda: p.current_timestep,
                   tensor_format="BCHW")),
               ("spatial_attention_block_skip_range", "int", 1, 12)),
    ]
    out += [
        System("cache-dit: DBCache F1B0", "cache-dit", cachedit_install(1, 0, False), ("residual_diff_threshold", "float", 0.0, 1.0)),
        System("cache-dit: DBCache F1B1", "cache-dit", cachedit_install(1, 1, False), ("residual_diff_threshold", "float", 0.0, 1.0)),
        System("cache-dit: DBCache F1B0 + TaylorSeer", "cache-dit", cachedit_install(1, 0, True),
               ("residual_diff_threshold", "float", 0.0, 1.0)),
    ]
    return out


def cache_dit_version():
    try:
        import cache_dit
        return getattr(cache_dit, "__version__", "unknown")
    except Exception:
        return None
