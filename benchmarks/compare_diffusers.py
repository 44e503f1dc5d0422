"""OmniCache against the other caching systems on a trained diffusers FluxPipeline.

    OMP_NUM_THREADS=1 python benchmarks/compare_diffusers.py              # the full comparison
    python benchmarks/compare_diffusers.py --quick                         # smoke run (seconds)
    python benchmarks/compare_diffusers.py --steps 28 --samples 64 ...     # see --help

The arena: ``omnicache.arena.load_digits_pipeline("flux")``: a class-conditional
``FluxTransformer2DModel`` trained on scikit-learn's digits, driven by the unmodified
``diffusers.FluxPipeline`` (true CFG: two transformer calls per step, under the pipeline's
``cache_context("cond")`` / ``("uncond")``). Every system runs on its own deep copy of the
same pipeline, with the same inputs (labels = classes in turn, one ``torch.Generator`` seeded
``--seed``).

Systems (rows):

- ours (``omnicache.integrations.diffusers`` as ``oc``): FORA, TaylorSeer, FirstBlockCache,
  TeaCache (polynomial from ``oc.fit_teacache`` on the calibration batch), MagCache (ratios
  from ``oc.fit_magcache`` on the calibration batch: a static plan), OmniCache
  (``oc.calibrate`` on the calibration batch), Learning-to-Cache (``oc.train_router`` on
  the calibration batch), L2C + γ (that router's plan at each target, with OmniCache's
  closed-loop γ fitted by ``oc.fit_gamma`` on the calibration batch).
- diffusers' own hooks (``pipe.transformer.enable_cache``): FirstBlockCache, TaylorSeer
  (standard and lite), MagCache (ratios from its own ``calibrate=True`` run on the
  calibration batch), PyramidAttentionBroadcast, FasterCache. A hook that fails on Flux is
  reported with its error.
- cache-dit (optional, ``pip install .[peers]`` or ``tools/install_peers.sh``): DBCache
  F1B0 and F1B1, DBCache F1B0 + TaylorSeer calibrator (order 1). Skipped, and said so,
  when not installed.

The calibration batch: other labels (classes shifted by 5) and another seed
(``--calib-seed``) than the evaluation batch.

Tuning (the same search for every system): each system's knob is set so that its compute
fraction on the *tuning batch* (the first ``--tune-samples`` samples of the evaluation
inputs) lands within ±0.03 of each target; integer knobs are scanned upward (stopping once
below the target band), float knobs bisected (at most ``--bisect`` evaluations, stopping
within ±0.01; a threshold's ``hi`` is only the first bracket, widened 4x up to four times while
the fraction stays above the target; a knob marked bounded, such as ToCa's reused share R,
never leaves its range), every evaluated point memoised per system so later targets start from a
bracket. A system that cannot reach a target reports the nearest point it reaches. OmniCache
and L2C take the target itself as their knob (their plans are cut to a FLOP fraction, in
whole steps); where that lands outside ±0.03 (OmniCache rounds its computed steps up), the
knob one step lower (or higher) is tried as well and the nearer kept.

Measurements:

- compute fraction: linear FLOPs spent ÷ uncached, counted by *our own* forward hooks on
  every ``nn.Linear`` of the transformer (2·in·out·rows), the same for every system;
- wall time: ``--rounds`` interleaved rounds over all rows (every row once per round,
  the uncached row included), median per row; speedup = uncached median ÷ row median;
- PSNR / SSIM of the images against the uncached run, class accuracy of the project's
  digit classifier (images in [-1, 1]);
- host syncs per step: calls of ``Tensor.item / tolist / __bool__ / __float__ / __int__ /
  nonzero`` during the pipeline call (counted by patching those methods; on a CPU build
  there is no ``cuda.synchronize``), divided by the steps; the uncached row gives the
  pipeline's own;
- torch.compile: ``torch.compile(pipe.transformer, fullgraph=True, backend=...)`` on a short
  run (1 sample, 4 steps for dynamic systems, the full steps for plans; ``--compile-backend``
  default ``eager``: dynamo's full-graph capture without inductor code generation);
  ``ok`` or the error's first line.

Writes ``benchmarks/results/diffusers-comparison.{md,json,png}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import io
import json
import math
import pathlib
import platform
import statistics
import sys
import time
import traceback

import torch

from omnicache import metrics
from omnicache.evaluate import class_acc
from omnicache.io import atomic_path, atomic_write_text

TARGETS = (0.6, 0.5, 0.4)
TOLERANCE = 0.03
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- measuring


class FlopCounter:
    """Linear FLOPs of every ``nn.Linear`` in a transformer (2·in·out·rows), by forward hooks."""

    def __init__(self, transformer):
        self.flops = 0
        self.handles = [m.register_forward_hook(self._hook) for m in transformer.modules()
                        if isinstance(m, torch.nn.Linear)]

    def _hook(self, module, args, output):
        if torch.compiler.is_compiling():
            return
        x = args[0]
        self.flops += 2 * module.in_features * module.out_features * (x.numel() // module.in_features)

    def remove(self):
        for h in self.handles:
            h.remove()


SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero")


@contextlib.contextmanager
def count_syncs():
    """Count host syncs (Tensor.item/tolist/__bool__/__float__/__int__/nonzero calls)."""
    box = [0]
    saved = {n: torch.Tensor.__dict__.get(n) for n in SYNC_METHODS}
    originals = {n: getattr(torch.Tensor, n) for n in SYNC_METHODS}

    def wrap(f):
        def g(self, *a, **k):
            box[0] += 1
            return f(self, *a, **k)
        return g

    for n in SYNC_METHODS:
        setattr(torch.Tensor, n, wrap(originals[n]))
    try:
        yield box
    finally:
        for n in SYNC_METHODS:
            if saved[n] is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, saved[n])


# ----------------------------------------------------------------------------- systems


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
    ctx.prepared["teacache"] = _oc().fit_teacache(pipe, TeaCacheConfig(), progress=ctx.progress,
                                                  **ctx.calib_call_kwargs(pipe))


def prep_magcache_ours(ctx):
    from omnicache.policies import MagCacheConfig
    pipe = copy.deepcopy(ctx.base)
    ctx.prepared["magcache_ours"] = _oc().fit_magcache(pipe, MagCacheConfig(), progress=ctx.progress,
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
            ctx.prepared[key] = _oc().train_router(calib, cfg, progress=ctx.progress, **ctx.calib_call_kwargs(calib))
        trained = ctx.prepared[key]
        meta = dict(trained.meta)
        plan = export_plan(torch.tensor(meta["beta"]), refresh_mask(ctx.steps, refresh), meta["flops_per_step"],
                           compute_fraction=knob, meta=meta)
        plan.meta["flops_per_step"] = meta["flops_per_step"]
        if gamma:  # OmniCache's closed-loop γ on this cut of the router (one fit per plan)
            gkey = ("l2c+gamma", refresh, knob)
            if gkey not in ctx.prepared:
                calib = copy.deepcopy(ctx.base)
                ctx.prepared[gkey] = _oc().fit_gamma(calib, plan, progress=ctx.progress, **ctx.calib_call_kwargs(calib))
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
               note="mag_ratios from oc.fit_magcache on the calibration batch (every context pooled); a static plan"),
        System("ours: OmniCache reuse only", "ours", install_omnicache(False), ("compute_fraction", "target", 0, 1)),
        System("ours: OmniCache + correction", "ours", install_omnicache(True), ("compute_fraction", "target", 0, 1)),
        System("ours: L2C", "ours", install_l2c(l2c_iters), ("compute_fraction", "target", 0, 1),
               note=f"router trained with iters={l2c_iters}"),
        System("ours: L2C + gamma", "ours", install_l2c(l2c_iters, gamma=True), ("compute_fraction", "target", 0, 1),
               note=f"the L2C row's router (iters={l2c_iters}), γ from oc.fit_gamma on the calibration batch"),
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


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Run:
    images: torch.Tensor
    flops: int
    syncs: int
    wall: float


def run_once(pipe, ctx, labels, seed, count=True):
    from omnicache.arena import digits_images
    counter = FlopCounter(pipe.transformer) if count else None
    try:
        with count_syncs() if count else contextlib.nullcontext([0]) as box:
            t0 = time.perf_counter()
            out = ctx.call(pipe, labels, seed)
            wall = time.perf_counter() - t0
        return Run(digits_images(pipe, out), counter.flops if counter else 0, box[0], wall)
    finally:
        if counter:
            counter.remove()


def build(system, ctx, knob, target):
    pipe = copy.deepcopy(ctx.base)
    system.install(pipe, knob, ctx, target)
    return pipe


class Tuner:
    """The same search for every system (see the module docstring); memo: knob -> fraction."""

    def __init__(self, system, ctx, ref_flops, bisect):
        self.system, self.ctx, self.ref_flops, self.bisect = system, ctx, ref_flops, bisect
        self.memo = {}

    def fraction(self, knob, target):
        if knob not in self.memo:
            pipe = build(self.system, self.ctx, knob, target)
            r = run_once(pipe, self.ctx, self.ctx.eval_labels[:self.ctx.tune_samples], self.ctx.seed)
            self.memo[knob] = r.flops / self.ref_flops
        return self.memo[knob]

    def tune(self, target):
        name, kind, lo, hi = self.system.knob[:4]
        bounded = len(self.system.knob) > 4 and self.system.knob[4]
        if kind == "target":  # a FLOP fraction, quantised to whole steps: try one step either way
            f = self.fraction(target, target)
            if abs(f - target) > TOLERANCE:
                alt = target - 1.0 / self.ctx.steps if f > target else target + 1.0 / self.ctx.steps
                if lo < alt <= hi:
                    self.fraction(alt, target)
            return min(self.memo, key=lambda k: (abs(self.memo[k] - target), abs(k - target)))
        if kind == "int":
            best = None
            for v in range(int(lo), int(hi) + 1):
                f = self.fraction(v, target)
                if best is None or abs(f - target) < best[0]:
                    best = (abs(f - target), v)
                if f < target - TOLERANCE:  # fractions only fall as the interval grows
                    break
            return best[1]
        # float: bracket from the memo, then bisect
        below = [k for k, f in self.memo.items() if f <= target]
        above = [k for k, f in self.memo.items() if f > target]
        if above:
            lo = max(lo, max(above))
        if below:
            hi = min(hi, min(below))
        elif bounded:  # the range's end is the last point to try
            if self.fraction(hi, target) > target:
                return min(self.memo, key=lambda k: (abs(self.memo[k] - target), k))
        else:
            for _ in range(4):  # widen until the fraction drops below the target
                if self.fraction(hi, target) <= target:
                    break
                lo, hi = hi, hi * 4
        for _ in range(self.bisect):
            close = [k for k, f in self.memo.items() if abs(f - target) <= TOLERANCE / 3]
            if close:
                break
            mid = (lo + hi) / 2
            f = self.fraction(mid, target)
            lo, hi = (mid, hi) if f > target else (lo, mid)
        return min(self.memo, key=lambda k: (abs(self.memo[k] - target), k))


def cached_step_cost(ctx, rounds):
    """Our FirstBlockCache against diffusers' at the same decisions: threshold 1e9 in both (the
    first call of each context computes, every later one reuses; warm-up 1 in ours = diffusers'
    first call), checked by equal FLOPs; median wall of ``rounds`` interleaved runs on the
    tuning batch. ratio = ours / diffusers (the issue's target: <= 1.05)."""
    from diffusers.hooks import FirstBlockCacheConfig as DFBC
    from omnicache.policies import FirstBlockCacheConfig
    ours = copy.deepcopy(ctx.base)
    _oc().enable(ours, FirstBlockCacheConfig(threshold=1e9, first_blocks=1, warmup=1))
    theirs = copy.deepcopy(ctx.base)
    theirs.transformer.enable_cache(DFBC(threshold=1e9))
    labels = ctx.eval_labels[:ctx.tune_samples]
    a, b = run_once(ours, ctx, labels, ctx.seed), run_once(theirs, ctx, labels, ctx.seed)
    wa, wb = [], []
    for r in range(rounds):  # A B, then B A: neither always runs first (caches, frequency drift)
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            pipe, walls = (ours, wa) if which == 0 else (theirs, wb)
            walls.append(run_once(pipe, ctx, labels, ctx.seed, count=False).wall)
    ma, mb = statistics.median(wa), statistics.median(wb)
    paired = statistics.median(x / y for x, y in zip(wa, wb))
    out = dict(same_flops=a.flops == b.flops, ours_flops=a.flops, diffusers_flops=b.flops,
               same_images=bool(torch.equal(a.images, b.images)), ours_walls=wa, diffusers_walls=wb,
               ours_wall_s=ma, diffusers_wall_s=mb, ratio=ma / mb, paired_ratio=paired, met=ma / mb <= 1.05,
               ours_syncs_per_step=a.syncs / ctx.steps, diffusers_syncs_per_step=b.syncs / ctx.steps)
    log(f"   cached-step cost, ours/diffusers FirstBlockCache at the same decisions: {out['ratio']:.3f} "
        f"(median of paired rounds {paired:.3f}; same FLOPs: {out['same_flops']})")
    return out


def first_line(e):
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return msg[0][:300] if msg else type(e).__name__


def compile_check(system, ctx, knob, target, backend, short_steps):
    """``torch.compile(pipe.transformer, fullgraph=True)`` on a short run: 'ok' or the error."""
    import torch._dynamo
    torch._dynamo.reset()
    sub = dataclasses.replace(ctx, steps=short_steps)
    try:
        pipe = copy.deepcopy(ctx.base)
        system.install(pipe, knob, sub, target)
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=backend)
        sub.call(pipe, ctx.eval_labels[:1], ctx.seed)
        return "ok"
    except Exception as e:
        return first_line(e)
    finally:
        torch._dynamo.reset()


def score_images(images, ref, labels, classifier):
    """The quality columns of a row (images against the uncached run's): PSNR, SSIM, class
    accuracy."""
    psnr = float(metrics.psnr(images, ref).mean()) if not torch.equal(images, ref) else math.inf
    return dict(psnr=psnr, ssim=float(metrics.ssim(images, ref).mean()),
                class_acc=class_acc(classifier, images, labels))


def compare(args, systems_fn=None, score=score_images, arena="flux"):
    """The comparison on the ``arena`` pipeline: ``systems_fn(l2c_iters)`` the rows,
    ``score(images, ref_images, labels, classifier)`` their quality columns (shared with
    ``benchmarks/compare_video.py``)."""
    from omnicache.arena import load_digits_pipeline
    from omnicache.runtime.default import load_classifier

    torch.set_num_threads(args.threads)
    classifier = load_classifier()
    base = load_digits_pipeline(arena)
    num_classes = base.omnicache_arena.num_classes
    have_cachedit = cache_dit_version() is not None
    all_systems = [s for s in (systems_fn or systems)(args.l2c_iters) if not args.only or s.family == "uncached"
                   or any(o.lower() in s.name.lower() for o in args.only)]
    skipped = []
    if not have_cachedit:
        skipped += [dict(system=s.name, reason="cache-dit not installed (pip install .[peers] / tools/install_peers.sh)")
                    for s in all_systems if s.family == "cache-dit"]
        all_systems = [s for s in all_systems if s.family != "cache-dit"]
    report = dict(targets=list(args.targets), tolerance=TOLERANCE, per_steps={}, skipped=skipped)
    t_start = time.perf_counter()
    for steps in args.steps:
        t_steps = time.perf_counter()
        ctx = Ctx(base=base, steps=steps, eval_labels=[i % num_classes for i in range(args.samples)], seed=args.seed,
                  calib_labels=[(i + 5) % num_classes for i in range(args.calib_samples)], calib_seed=args.calib_seed,
                  tune_samples=min(args.tune_samples, args.samples))
        labels_t = torch.tensor(ctx.eval_labels)
        log(f"== {steps} steps: uncached reference ({args.samples} samples)")
        ref_pipe = copy.deepcopy(base)
        ref = run_once(ref_pipe, ctx, ctx.eval_labels, ctx.seed)
        ref_tune = run_once(copy.deepcopy(base), ctx, ctx.eval_labels[:ctx.tune_samples], ctx.seed)
        ref_acc = score(ref.images, ref.images, labels_t, classifier)["class_acc"]
        rows, errors, tunings = [], [], {}
        pipes = [("uncached", None, None, ref_pipe)]
        for s in all_systems:
            if s.family == "uncached":
                continue
            if s.install is None:
                errors.append(dict(system=s.name, error=s.note))
                continue
            t0 = time.perf_counter()
            try:
                if s.prepare is not None:
                    s.prepare(ctx)
                if s.knob is None:  # a fixed setting (a paper's operating point): one row, no target
                    pipes.append((s.name, None, None, build(s, ctx, None, None)))
                    log(f"   {s.name}: fixed setting")
                    continue
                tuner = Tuner(s, ctx, ref_tune.flops, args.bisect)
                seen = set()
                for target in args.targets:
                    knob = tuner.tune(target)
                    key = knob
                    if key in seen and s.knob[1] != "target":
                        # the same setting serves two targets (e.g. an interval): measured once, listed for both
                        pipes.append((s.name, target, knob, None))
                        continue
                    seen.add(key)
                    pipes.append((s.name, target, knob, build(s, ctx, knob, target)))
                tunings[s.name] = dict(knob=s.knob[0], memo={repr(k): v for k, v in sorted(tuner.memo.items())},
                                       seconds=round(time.perf_counter() - t0, 1))
                log(f"   {s.name}: tuned in {time.perf_counter() - t0:.0f}s "
                    f"({len(tuner.memo)} tuning runs) -> {[p[2] for p in pipes if p[0] == s.name]}")
            except Exception as e:
                errors.append(dict(system=s.name, error=first_line(e), traceback=traceback.format_exc()[-2000:]))
                pipes = [p for p in pipes if p[0] != s.name]
                log(f"   {s.name}: ERROR {first_line(e)}")
        # interleaved rounds: every row once per round; round 0 also measures FLOPs, syncs, images
        measured = {}
        walls = {i: [] for i in range(len(pipes))}
        for rnd in range(args.rounds):
            for i, (name, target, knob, pipe) in enumerate(pipes):
                if pipe is None:
                    continue
                try:
                    r = run_once(pipe, ctx, ctx.eval_labels, ctx.seed, count=(rnd == 0))
                except Exception as e:
                    errors.append(dict(system=name, error=f"at target {target}: {first_line(e)}"))
                    pipes[i] = (name, target, knob, None)
                    continue
                walls[i].append(r.wall)
                if rnd == 0:
                    measured[i] = r
                elif not torch.equal(r.images, measured[i].images):
                    measured[i].__dict__.setdefault("unrepeatable", True)
            log(f"   round {rnd + 1}/{args.rounds} done")
        ref_wall = statistics.median(walls[0])
        last = {}
        for i, (name, target, knob, pipe) in enumerate(pipes):
            if pipe is None:
                if (name, "measured") in last:
                    j = last[(name, "measured")][knob] if knob in last[(name, "measured")] else None
                    if j is not None:
                        shared = dict(rows[j], target=target, shared_with=rows[j]["target"])
                        shared["in_band"] = abs(shared["compute_fraction"] - target) <= TOLERANCE
                        rows.append(shared)
                continue
            r = measured[i]
            wall = statistics.median(walls[i])
            row = dict(system=name, family=name.split(":")[0], target=target, knob=knob,
                       compute_fraction=r.flops / ref.flops, flops_per_sample=r.flops / len(ctx.eval_labels),
                       wall_s=wall, walls=walls[i], speedup=ref_wall / wall, ideal_speedup=ref.flops / r.flops,
                       **score(r.images, ref.images, labels_t, classifier),
                       syncs_per_step=r.syncs / steps, repeatable=not getattr(r, "unrepeatable", False))
            if name == "uncached":
                row["psnr"] = math.inf
            row["in_band"] = target is None or abs(row["compute_fraction"] - target) <= TOLERANCE
            last.setdefault((name, "measured"), {})[knob] = len(rows)
            rows.append(row)
        report["per_steps"][str(steps)] = dict(
            steps=steps, samples=args.samples, rows=rows, errors=errors, tunings=tunings, reference_acc=ref_acc,
            reference_flops=ref.flops, reference_wall_s=ref_wall, seconds=round(time.perf_counter() - t_steps, 1),
            prepared={k: v for k, v in ctx.prepared.items() if k in ("mag_ratios_all",)},
            teacache=dataclasses.asdict(ctx.prepared["teacache"]) if "teacache" in ctx.prepared else None)
        if args.cost_rounds > 0:
            report["per_steps"][str(steps)]["cached_step_cost"] = cached_step_cost(ctx, args.cost_rounds)
        if args.compile:
            comp = {}
            for s in all_systems:
                if s.install is None or any(e["system"] == s.name for e in errors):
                    continue
                knob = next((r["knob"] for r in rows if r["system"] == s.name and r["target"] in (0.5, None)),
                            next((r["knob"] for r in rows if r["system"] == s.name), None))
                short = steps if s.knob and s.knob[1] == "target" else args.compile_steps
                t0 = time.perf_counter()
                comp[s.name] = compile_check(s, ctx, knob, 0.5, args.compile_backend, short)
                log(f"   compile {s.name}: {comp[s.name]} ({time.perf_counter() - t0:.0f}s)")
            report["per_steps"][str(steps)]["compile"] = comp
        print(format_table(report["per_steps"][str(steps)]), flush=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- output


HEAD = ["system", "target", "compute", "wall s", "speedup", "ideal", "PSNR", "SSIM", "acc", "syncs/step", "compile"]


def fmt_row(r, comp):
    tgt = "-" if r["target"] is None else f"{r['target']:.1f}"
    flag = "" if r.get("in_band", True) else "*"
    shared = f" (= {r['shared_with']:.1f})" if r.get("shared_with") is not None else ""
    return [r["system"], tgt + shared, f"{r['compute_fraction']:.3f}{flag}", f"{r['wall_s']:.2f}",
            f"{r['speedup']:.2f}", f"{r['ideal_speedup']:.2f}",
            "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['class_acc']:.3f}",
            f"{r['syncs_per_step']:.1f}", comp.get(r["system"], "-") if r["system"] != "uncached" else
            comp.get("uncached", "-")]


def format_table(block, markdown=False):
    comp = {k: ("ok" if v == "ok" else "no") for k, v in block.get("compile", {}).items()}
    rows = [fmt_row(r, comp) for r in block["rows"]]
    if markdown:
        lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEAD)]
        lines = [f"{block['steps']} steps (uncached wall {block['reference_wall_s']:.2f} s, acc "
                 f"{block['reference_acc']:.3f})",
                 "  ".join(h.ljust(w) for h, w in zip(HEAD, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    for e in block["errors"]:
        lines.append(("- " if markdown else "  ") + f"{e['system']}: {e['error']}")
    return "\n".join(lines)


def targets_check(block):
    """The issue's targets on one step count: OmniCache + correction vs the best other row at
    0.5 and 0.4 (PSNR margin), its class accuracy vs uncached."""
    out = {}
    rows = [r for r in block["rows"] if r["target"] is not None]
    for target in (0.5, 0.4):
        at = [r for r in rows if r["target"] == target]
        omni = [r for r in at if r["system"] == "ours: OmniCache + correction"]
        others = [r for r in at if r["system"] != "ours: OmniCache + correction" and r["in_band"]]
        if not omni or not others:
            continue
        best = max(others, key=lambda r: r["psnr"])
        o = omni[0]
        out[str(target)] = dict(omnicache_psnr=o["psnr"], best_other=best["system"], best_other_psnr=best["psnr"],
                                margin_db=o["psnr"] - best["psnr"], psnr_met=o["psnr"] - best["psnr"] >= 1.0,
                                acc_drop=block["reference_acc"] - o["class_acc"],
                                acc_met=block["reference_acc"] - o["class_acc"] <= 0.02)
    return out


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    blocks = list(report["per_steps"].values())
    fig, axes = plt.subplots(1, len(blocks), figsize=(7 * len(blocks), 5.5), squeeze=False)
    markers = {"ours": "o", "diffusers": "s", "cache-dit": "^"}
    # one colour per system across the panels (a system absent from one panel keeps its colour)
    names = sorted({r["system"] for block in blocks for r in block["rows"] if r["system"] != "uncached"})
    cmap = plt.get_cmap("tab20")
    handles = {}
    for ax, block in zip(axes[0], blocks):
        for k, name in enumerate(names):
            pts = [r for r in block["rows"] if r["system"] == name and not math.isinf(r["psnr"])
                   and r.get("shared_with") is None]
            if not pts:
                continue
            handles[name], = ax.plot([r["speedup"] for r in pts], [r["psnr"] for r in pts],
                                     marker=markers.get(pts[0]["family"], "x"), color=cmap(k % 20), label=name,
                                     linestyle="-", linewidth=0.8)
        ax.set_xlabel("measured speedup (uncached wall / wall)")
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.set_title(f"Flux digits arena, {block['steps']} steps")
        ax.grid(alpha=0.3)
    axes[0][-1].legend([handles[n] for n in names if n in handles], [n for n in names if n in handles],
                       fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write(report, stem):
    import diffusers
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=1, default=str))
    v = report["versions"]
    md = ["# Caching systems on the Flux digits arena\n",
          "Commands: " + "; ".join(f"`{c}`" for c in report.get("commands", [report["command"]])),
          f"\n{report['date']}, torch {v['torch']}, diffusers {v['diffusers']}, cache-dit {v['cache_dit']}, "
          f"{report['seconds']:.0f} s. `*`: compute fraction outside ±{TOLERANCE} of the target (nearest reached).\n"]
    for block in report["per_steps"].values():
        md += [f"\n## {block['steps']} steps ({block.get('samples', '?')} samples)\n", format_table(block, markdown=True),
               "", "targets: " + json.dumps(block["targets_check"]), ""]
        c = block.get("cached_step_cost")
        if c:
            pr = f", median of paired rounds {c['paired_ratio']:.3f}" if "paired_ratio" in c else ""
            md += [f"cached-step cost, ours / diffusers FirstBlockCache at the same decisions (same FLOPs: "
                   f"{c['same_flops']}): {c['ratio']:.3f}{pr} over {len(c['ours_walls'])} rounds "
                   f"(target <= 1.05: {'met' if c['met'] else 'not met'})", ""]
        if block.get("compile"):
            md += ["compile errors:"] + [f"- {k}: {v}" for k, v in block["compile"].items() if v != "ok"] + [""]
    md += [f"- skipped: {s['system']}: {s['reason']}" for s in report["skipped"]]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(md) + "\n")
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.{{json,md,png}}")


def merge(paths, stem):
    """One report from several runs (e.g. 28 and 50 steps run as separate processes)."""
    reports = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    out = dict(reports[0])
    out["per_steps"] = {k: v for r in reports for k, v in r["per_steps"].items()}
    out["commands"] = [r["command"] for r in reports]
    out["runs"] = [dict(command=r["command"], date=r["date"], seconds=r["seconds"], settings=r["settings"])
                   for r in reports]
    out["seconds"] = sum(r["seconds"] for r in reports)
    for block in out["per_steps"].values():  # recomputed: a shared row's band is its own target's
        for r in block["rows"]:
            r["in_band"] = r["target"] is None or abs(r["compute_fraction"] - r["target"]) <= TOLERANCE
        block["targets_check"] = targets_check(block)
    write(out, stem)
    return out


def add_arguments(p, steps, samples, tune_samples, targets, out):
    """The options compare_diffusers.py and compare_video.py share, with their defaults."""
    p.add_argument("--steps", type=int, nargs="+", default=steps)
    p.add_argument("--samples", type=int, default=samples)
    p.add_argument("--tune-samples", type=int, default=tune_samples)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-seed", type=int, default=1234)
    p.add_argument("--targets", type=float, nargs="+", default=list(targets))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bisect", type=int, default=8)
    p.add_argument("--l2c-iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", help="only systems whose name contains one of these")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-backend", default="eager")
    p.add_argument("--compile-steps", type=int, default=4)
    p.add_argument("--out", default=None, help=f"output stem (default benchmarks/results/{out})")
    p.add_argument("--no-write", action="store_true")


def record_run(report, args, script, argv, **versions):
    """The run's command, date, device, versions and settings, into ``report``."""
    import diffusers
    report.update(
        command=f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=dict(kind="cpu", processor=platform.processor() or platform.machine(), threads=args.threads,
                    platform=platform.platform()),
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, **versions,
                      python=platform.python_version()),
        settings=dict(samples=args.samples, tune_samples=args.tune_samples, calib_samples=args.calib_samples,
                      seed=args.seed, calib_seed=args.calib_seed, rounds=args.rounds, bisect=args.bisect,
                      l2c_iters=args.l2c_iters, compile_backend=args.compile_backend,
                      compile_steps=args.compile_steps, sync_methods=list(SYNC_METHODS)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 8 steps, 4 samples, target 0.5, 1 round")
    add_arguments(p, [28, 50], 64, 16, TARGETS, "diffusers-comparison")
    p.add_argument("--cost-rounds", type=int, default=10)
    p.add_argument("--merge", nargs="+", help="merge these JSON reports into --out and exit")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, pathlib.Path(args.out) if args.out else RESULTS / "diffusers-comparison")
    if args.quick:
        args.steps, args.samples, args.tune_samples, args.calib_samples = [8], 4, 4, 2
        args.targets, args.rounds, args.bisect, args.l2c_iters, args.compile_steps, args.cost_rounds = [0.5], 1, 3, 2, 2, 1
    report = compare(args)
    record_run(report, args, "compare_diffusers.py", argv, cache_dit=cache_dit_version())
    for block in report["per_steps"].values():
        block["targets_check"] = targets_check(block)
    for s in report["skipped"]:
        print(f"skipped: {s['system']}: {s['reason']}")
    if not args.no_write:
        write(report, pathlib.Path(args.out) if args.out else RESULTS / "diffusers-comparison")
    return report


if __name__ == "__main__":
    main()
