"""Calibration on the user's own diffusers model: OmniCache plans, and γ on any plan.

    from omnicache.integrations import diffusers as oc
    plan = oc.calibrate(pipe, OmniCacheConfig(compute_fraction=0.5), **pipe_call_kwargs)
    plan = oc.calibrate(transformer, OmniCacheConfig(...), run=my_sampling_fn, steps=N)
    cfg = oc.fit_teacache(pipe, TeaCacheConfig(threshold=0.1), **pipe_call_kwargs)   # (.fitting)
    cfg = oc.fit_magcache(pipe, MagCacheConfig(threshold=0.06), **pipe_call_kwargs)  # (.fitting)
    plan = oc.fit_gamma(pipe, any_plan, **pipe_call_kwargs)   # OmniCache's γ on any plan (e.g. L2C's)
    oc.enable(pipe, plan); plan.save("flux-omnicache-0.5.json")

A calibration run is the user's own: ``pipe(**pipe_call_kwargs)`` (a generator passed in
the kwargs is restored before every run, so every run sees the same noise) or ``run()``,
any function that performs one sampling run with the transformer. :class:`DiffusersEngine`
is the engine interface OmniCache's :func:`~omnicache.policies.omnicache.calibrate.build_plan`
asks for (the same method code as on our runtime):

- **record**: one uncached run; per cache context (``"cond"``, ``"uncond"``, ... each its
  own stream) and step, the block stack's inputs and residuals (every cached stream), and,
  with a pipeline, the latents entering and leaving its scheduler's ``step``;
- **the DP's cost** (:class:`ResidualCorrector`): the error a reuse injects, measured on
  the block stack's residual with the least-squares forecast ``R_j + γ1 D1 + γ2 D2`` for
  that context, every stream and context pooled, times the sensitivity of the scheduler's
  step to the model output (probed on a copy of the scheduler's state, so any diffusers
  scheduler works); the pipeline's output head is not linearised;
- **the closed-loop γ fit**: the schedule is replayed; at each reuse step the stack runs
  anyway, and ``(γ1, γ2)`` is the least-squares fit of the forecast to the true residual at
  the state the cached run has reached (normal equations pooled over contexts and
  streams); the replay then continues from the forecast, so each step's γ also absorbs
  what earlier reuse steps left in the run.

Plans record the model (class, block count, config fingerprint), steps, scheduler class
and guidance in ``meta``; :func:`~omnicache.integrations.diffusers.enable` refuses them on
another model or scheduler.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys

import torch
from tqdm import tqdm

from ...plan import model_fingerprint
from ...policies.omnicache.fit import residual_after_fit, solve_normal
from .install import disable, enable, runtime_of, split
from .video import video_grid

__all__ = ["calibrate", "fit_gamma", "DiffusersEngine", "ResidualCorrector"]


class _Runs:
    """The user's sampling run, repeatable: ``pipe(**kwargs)`` with its generators' states
    restored before each call, or ``run()``."""

    def __init__(self, pipe, run, kwargs):
        if run is None and pipe is None:
            raise ValueError("run: a bare transformer needs run=<a function that performs one sampling run> "
                             "(or pass a pipeline)")
        if run is not None and kwargs:
            raise ValueError(f"pipe call kwargs ({', '.join(kwargs)}) are for a pipeline; with run=..., "
                             f"the function makes its own calls")
        if run is not None and not callable(run):
            raise ValueError(f"run must be callable, got {type(run).__name__}")
        self.pipe, self.run, self.kwargs = pipe, run, kwargs
        gens = kwargs.get("generator")
        gens = gens if isinstance(gens, (list, tuple)) else [gens] if gens is not None else []
        self.generators = [(g, g.get_state()) for g in gens if isinstance(g, torch.Generator)]

    @torch.no_grad()
    def __call__(self):
        for g, state in self.generators:
            g.set_state(state)
        if self.run is not None:
            return self.run()
        return self.pipe(**self.kwargs)


class ResidualCorrector:
    """The DP's cost on a diffusers engine: ``error(t, j, p, q)`` = ‖R_t - R̂_t‖ · s_t, the
    forecast ``R̂_t = R_j + γ1 D1 + γ2 D2`` least-squares fitted for that context
    (``D1 = R_j - R_p``, ``D2 = D1 - (R_p - R_q)``), ``R`` every context's and stream's
    residual, and ``s_t`` the scheduler step's sensitivity to the model output."""

    def __init__(self, residuals: list, scale: list, order: int):
        self.r, self.s, self.order, self.memo = residuals, scale, order, {}

    def error(self, t, j, p, q) -> float:
        key = (t, j, p, q)
        if key in self.memo:
            return self.memo[key]
        r = self.r
        v = (r[t] - r[j]).double().flatten()
        cols = []
        if self.order >= 1 and p is not None:
            e1 = (r[j] - r[p]).double().flatten()
            cols.append(e1)
            if self.order >= 2 and q is not None:
                cols.append(e1 - (r[p] - r[q]).double().flatten())
        self.memo[key] = residual_after_fit(v, cols) ** 0.5 * self.s[t]
        return self.memo[key]


def _solve(gram, rhs) -> list:
    return solve_normal(gram, rhs).tolist()


class _ResidualFit:
    """γ by least squares against the true residual at the cached state: at each reuse step
    the stack runs anyway; normal equations pooled over contexts and streams (a bare
    transformer, with no scheduler to probe)."""

    name = "closed loop, residual at the cached state"

    def __init__(self, rt):
        self.rt, self.sums = rt, {}
        rt.fitting = self

    def __call__(self, ctx, u, pairs, use1, use2):
        k = int(use1) + int(use2)
        if k == 0:  # too few computed steps for a difference: plain reuse
            return None, None
        gram, rhs = self.sums.setdefault(ctx.step, (torch.zeros(k, k, dtype=torch.float64),
                                                    torch.zeros(k, dtype=torch.float64)))
        dev = None
        for cu, x_in, x_out in pairs.values():
            D1, D2 = cu.drifts()
            E = torch.stack([d.double().flatten() for d, on in ((D1, use1), (D2, use2)) if on], 1)
            v = ((x_out - x_in) - cu.F).double().flatten()
            gram += (E.T @ E).cpu()
            rhs += (E.T @ v).cpu()
            dev = x_out.device
        g = _solve(gram, rhs)
        g1 = torch.tensor(g[0], dtype=torch.float32, device=dev) if use1 else None
        g2 = torch.tensor(g[int(use1)], dtype=torch.float32, device=dev) if use2 else None
        return g1, g2

    def result(self) -> dict:
        return {t: _solve(gram, rhs) for t, (gram, rhs) in self.sums.items()}

    def close(self):
        self.rt.fitting = None


class _LatentFit:
    """γ by least squares against the uncached run's next latent, through the pipeline's own
    scheduler: at a reuse step every context's call is made once per coefficient (γ = 0,
    then each term at 1: reuse steps skip the blocks, so this is cheap); the pipeline's
    combination of the contexts' outputs (true CFG) is recovered by least squares from what
    it passes to ``scheduler.step``; each probe direction is stepped on a copy of the
    scheduler's state; ``γ = argmin ‖x(γ) - x_{t+1}‖²``; the run continues with that γ.
    A step whose combination cannot be recovered (outputs of another shape, e.g. batch
    CFG) falls back to the residual fit."""

    name = "closed loop, next latent through the pipeline's scheduler"

    def __init__(self, engine, rt, plan):
        self.engine, self.rt, self.plan, self.out, self.probes = engine, rt, plan, {}, {}
        self.reuses = [not bool(c.all()) for c in plan.compute_tensor()]  # per step: a unit is reused
        self.fallback = _ResidualFit(rt)
        self.fallback.close()
        self.residual_steps = set()
        rt.installer.wrap_forward = self.wrap
        rt.installer.switch(rt.current.name if rt.current is not None else None)
        sched = engine.scheduler
        self.sched, self.orig_step = sched, sched.step
        sched.step = self.step

    def wrap(self, fwd):
        rt = self.rt

        def forward(*args, **kwargs):
            ctx = rt.current
            t = ctx.step
            if not self.reuses[t]:  # nothing reused at this step: as is
                return fwd(*args, **kwargs)
            terms = [(rt.gamma_t, 0), (rt.gamma2_t, 1)][: int(bool(self.plan.gamma[t])) + int(bool(self.plan.gamma2[t]))]
            saved = [g.clone() for g, _ in terms]
            for g, _ in terms:
                g.zero_()
            base = fwd(*args, **kwargs)
            outs = []
            for g, _ in terms:
                g.fill_(1.0)
                outs.append(fwd(*args, **kwargs))
                g.zero_()
            for (g, _), s in zip(terms, saved):
                g.copy_(s)
            o0 = base[0] if isinstance(base, tuple) else base.sample
            self.probes.setdefault(t, []).append((o0.detach(), [((o[0] if isinstance(o, tuple) else o.sample) - o0)
                                                               .detach() for o in outs]))
            return base

        return forward

    def step(self, model_output, timestep, sample, *args, **kwargs):
        t = len(self.out)
        probes = self.probes.pop(t, None)
        if not probes or not probes[0][1]:
            out = self.orig_step(model_output, timestep, sample, *args, **kwargs)
            self.out[t] = None
            return out
        d = self._directions(model_output, probes)
        if d is None:
            self.residual_steps.add(t)
            self.out[t] = None
            return self.orig_step(model_output, timestep, sample, *args, **kwargs)
        base = self._probe(model_output, timestep, sample, args, kwargs)
        J = torch.stack([(self._probe(model_output + dk, timestep, sample, args, kwargs) - base).double().flatten()
                         for dk in d], 1)
        target = (self.engine.latents[t + 1].to(base.device).double() - base.double()).flatten()
        g = torch.linalg.lstsq(J, target[:, None]).solution[:, 0]
        self.out[t] = g.tolist()
        corrected = model_output + sum(float(gk) * dk for gk, dk in zip(g, d))
        return self.orig_step(corrected, timestep, sample, *args, **kwargs)

    def _directions(self, combined, probes):
        """Σ_c w_c (o_c(e_k) - o_c(0)), with w from ``combined ≈ Σ_c w_c o_c(0)``; None if
        the combination is not recovered to 1e-4."""
        if any(o0.shape != combined.shape for o0, _ in probes):
            return None
        A = torch.stack([o0.double().flatten() for o0, _ in probes], 1)
        y = combined.double().flatten()
        w = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
        if float((A @ w - y).norm()) > 1e-4 * float(y.norm()) + 1e-12:
            return None
        k = len(probes[0][1])
        return [sum(float(w[c]) * probes[c][1][j] for c in range(len(probes))).to(combined.dtype) for j in range(k)]

    def _probe(self, model_output, timestep, sample, args, kwargs):
        probe = copy.deepcopy(self.sched)
        vars(probe).pop("step", None)
        return self.orig_step.__func__(probe, model_output, timestep, sample, *args,
                                       **dict(kwargs, return_dict=False))[0]

    def result(self) -> dict:
        return {t: g for t, g in self.out.items() if g is not None}

    def close(self):
        vars(self.sched).pop("step", None)
        self.rt.installer.wrap_forward = None


class DiffusersEngine:
    """The calibration interface on a diffusers transformer (see the module docstring):
    ``steps``, ``blocks``, ``samples``, ``latents``, ``residuals``, ``grid``,
    ``corrector(...)``, ``fit(...)``, ``replay_error(...)``, ``meta()``."""

    grid = None  # the (F, H, W) token grid of a video model (Latte): stage-aware filtering
    samples = 1  # the user's call is one unit: no held-out half (no schedule search)

    def __init__(self, target, *, run=None, steps=None, progress=True, **call_kwargs):
        self.transformer, self.pipe = split(target)
        self.runs = _Runs(self.pipe, run, call_kwargs)
        self.call_kwargs, self.progress = call_kwargs, progress
        self.scheduler = getattr(self.pipe, "scheduler", None)
        self._record(steps)

    # ------------------------------------------------------------------ record
    def _record(self, steps):
        from ...policies import NoCacheConfig

        if steps is None and self.scheduler is None:
            raise ValueError("steps: with run=..., pass the number of steps the run takes (steps=N)")
        enable(self.pipe if self.pipe is not None else self.transformer, NoCacheConfig(), steps=steps,
               check_plan=False)
        _, rt = runtime_of(self.transformer)
        # The residual's spans: the whole stack, or each block where the model changes its
        # token layout between blocks (Latte: spatial / temporal), as a step plan runs there.
        spans = list(rt.units)
        store: dict = {}  # context -> step -> {"in": {span: {...}}, "res": {(span, stream): ...}}
        bar = tqdm(desc="calibration: recording", unit="call", disable=not self.progress, file=sys.stderr)

        def pre(u, module, args, kwargs):
            ctx = rt.current
            rec = store.setdefault(ctx.name, {}).setdefault(ctx.step, {"in": {}, "res": {}})
            rec["in"][u] = {n: x.detach().clone() for n, x in rt.bound[spans[u][0]].inputs(args, kwargs).items()
                            if x is not None}

        def post(u, module, args, kwargs, out):
            ctx = rt.current
            rec = store[ctx.name][ctx.step]
            outs = rt.bound[spans[u][1] - 1].outputs(out)
            rec["res"].update({(u, n): (outs[n] - x).detach().float() for n, x in rec["in"].pop(u).items()
                               if outs.get(n) is not None})
            if u == len(spans) - 1:
                bar.update()

        handles = [*self._extra_hooks(rt)]
        for u, (lo, hi) in enumerate(spans):
            handles.append(rt.bound[lo].module.register_forward_pre_hook(functools.partial(pre, u), with_kwargs=True))
            handles.append(rt.bound[hi - 1].module.register_forward_hook(functools.partial(post, u), with_kwargs=True))
        latents, sens = [], []
        restore = self._wrap_step(latents, sens)
        try:
            self.runs()
        finally:
            for h in handles:
                h.remove()
            restore()
            bar.close()
            self.steps = rt.steps
            self.grid = rt.video_grid
            self._after_record(rt)
            disable(self.pipe if self.pipe is not None else self.transformer)
        self.blocks = rt.n
        self.contexts = sorted(store, key=lambda n: (n is not None, str(n)))
        for name in self.contexts:
            if sorted(store[name]) != list(range(self.steps)):
                raise RuntimeError(f"calibration: context {name!r} was called at {len(store[name])} of "
                                   f"{self.steps} steps; every context must run at every step")
        # per step: every context's and stream's residual, flattened and concatenated
        self.residuals = [torch.cat([store[c][t]["res"][n].flatten() for c in self.contexts
                                     for n in sorted(store[c][t]["res"])])[None] for t in range(self.steps)]
        self.latents = latents if len(latents) == self.steps + 1 else None
        self.scale = sens if len(sens) == self.steps else [1.0] * self.steps

    def _extra_hooks(self, rt) -> list:
        """Hook handles a subclass adds to the recording run (removed after it)."""
        return []

    def _after_record(self, rt) -> None:
        """What a subclass reads off the runtime after the recording run."""

    def _wrap_step(self, latents, sens):
        """Record the latents around the scheduler's ``step`` and probe its sensitivity to
        the model output on a copy of its state; returns the function that unwraps it."""
        sched = self.scheduler
        if sched is None:
            return lambda: None
        orig = sched.step

        def step(model_output, timestep, sample, *args, **kwargs):
            probe = copy.deepcopy(sched)  # its state before this step (our wrapper removed)
            vars(probe).pop("step", None)
            out = orig(model_output, timestep, sample, *args, **kwargs)
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            if not latents:
                latents.append(sample.detach().float().clone())
            latents.append(prev.detach().float().clone())
            delta = 1e-3 * model_output  # a small move of the output, in its own direction
            size = float(delta.float().norm())
            moved = probe.step(model_output + delta, timestep, sample, *args, **dict(kwargs, return_dict=False))[0]
            sens.append(float((moved.float() - prev.float()).norm()) / size if size > 0 else 1.0)
            return out

        sched.step = step
        return lambda: vars(sched).pop("step", None)

    # ------------------------------------------------------------------ interface
    def corrector(self, order, max_consecutive, filtering):
        """The DP's cost; with filtering (video models) measured on the unfiltered drifts (the
        closed-loop γ fit, :meth:`fit`, replays the filtered caches)."""
        if filtering and self.grid is None:
            raise ValueError("OmniCacheConfig.filtering needs the token grid: available on video models whose "
                             "blocks lay out frames x rows x columns (LatteTransformer3DModel)")
        return ResidualCorrector(self.residuals, self.scale, order)

    def fit(self, compute, order, filtering, samples=slice(None)):
        """Closed-loop ``(gamma, gamma2)`` of schedule ``compute`` (see the module docstring)."""
        from ...policies.omnicache.calibrate import plan_for_schedule

        if order == 0:
            return [0.0] * self.steps, [0.0] * self.steps
        plan = self.fit_plan(plan_for_schedule(compute, self.blocks, "step", order, filtering, self.grid), order,
                             probe=False)
        return plan.gamma, plan.gamma2

    def fit_plan(self, plan, order: int = 2, probe: bool = True):
        """``plan`` (any granularity: step, block or branch, e.g. Learning-to-Cache's) with its
        per-step ``(gamma, gamma2)`` fitted closed-loop on this model (see the module
        docstring; a branch plan needs the pipeline's next-latent fit). With ``probe``, a coefficient is fitted where every unit a step reuses
        has the computed values its difference needs (2 for ``D1``, 3 for ``D2``), as
        :func:`~omnicache.policies.omnicache.calibrate.fit_plan_closed_loop` does on our
        runtime; otherwise where ``plan``'s own gammas are non-zero."""
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        if plan.steps != self.steps:
            raise ValueError(f"CachePlan.steps: plan has {plan.steps} steps, the calibration run {self.steps}")
        if probe:
            comp = plan.compute_tensor().long()
            counts = torch.cumsum(comp, 0) - comp  # computed values before each step, per unit
            usable = [0 if bool(comp[t].all()) else min(int(counts[t][comp[t] == 0].min()) - 1, order)
                      for t in range(plan.steps)]
            plan = dataclasses.replace(plan, gamma=[1.0 if u >= 1 else 0.0 for u in usable],
                                       gamma2=[1.0 if u >= 2 else 0.0 for u in usable])
        if plan.granularity == "branch" and self.latents is None:
            raise ValueError("correction: γ on a branch plan is fitted against the uncached next latent "
                             "through the pipeline's scheduler; pass a pipeline (not run=...)")
        target = self.pipe if self.pipe is not None else self.transformer
        enable(target, plan, steps=self.steps, check_plan=False)
        _, rt = runtime_of(self.transformer)
        fit = _LatentFit(self, rt, plan) if self.latents is not None else _ResidualFit(rt)
        try:
            self.runs()
            if getattr(fit, "residual_steps", None):  # the pipeline's combination was not recovered
                if plan.granularity == "branch":
                    raise ValueError("correction: the pipeline's combination of its calls' outputs was not "
                                     "recovered (e.g. batch CFG); γ on a branch plan needs it")
                fit.close()
                rt.set_steps(self.steps)
                fit = _ResidualFit(rt)
                self.runs()
        finally:
            fit.close()
            disable(target)
        gamma, gamma2 = [0.0] * self.steps, [0.0] * self.steps
        for t, g in fit.result().items():
            vals = iter(g)
            gamma[t] = next(vals) if plan.gamma[t] else 0.0
            gamma2[t] = next(vals) if plan.gamma2[t] else 0.0
        self.gamma_fit = fit.name
        return dataclasses.replace(plan, gamma=gamma, gamma2=gamma2)

    def replay_error(self, plan, samples=slice(None)):
        raise ValueError("search: a diffusers calibration run is one call; use search=False")

    def meta(self) -> dict:
        info = {"model": model_fingerprint(self.transformer, self.blocks), "engine": "diffusers",
                "steps": self.steps, "contexts": [c for c in self.contexts],
                "gamma_fit": getattr(self, "gamma_fit", None)}
        if self.scheduler is not None:
            info["scheduler"] = type(self.scheduler).__name__
        for key in ("guidance_scale", "true_cfg_scale"):
            if key in self.call_kwargs:
                info[key] = float(self.call_kwargs[key])
        return info


def calibrate(pipe_or_transformer, config, *, run=None, steps: int | None = None, progress: bool = True,
              **pipe_call_kwargs):
    """Calibrate ``config`` (an ``OmniCacheConfig``) on this model; returns a ``CachePlan``.

    Args:
        pipe_or_transformer: a diffusers pipeline (its call is the calibration run) or a
            supported transformer driven by ``run``.
        config: ``OmniCacheConfig``; ``filtering`` needs a video model's token grid (Latte;
            the DP's cost is then measured unfiltered, the γ fit replays the filtered caches)
            and the schedule search (held-out half of a batch) is off: one call is one unit.
        run: for a bare transformer, a function performing one sampling run with it.
        steps: the steps of one run (read from the pipeline's scheduler if None).
        **pipe_call_kwargs: what to call the pipeline with (the calibration inputs, e.g.
            ``prompt_embeds=..., num_inference_steps=28, generator=...``).
    """
    from ...policies import OmniCacheConfig
    from ...policies.omnicache.calibrate import build_plan

    if not isinstance(config, OmniCacheConfig):
        raise TypeError(f"config must be an OmniCacheConfig, got {type(config).__name__} "
                        f"(Learning-to-Cache: train_router; TeaCache: fit_teacache)")
    if config.selection == "curvature" and split(pipe_or_transformer)[1] is None:
        raise ValueError("OmniCacheConfig.selection='curvature' needs the latents: pass a pipeline")
    transformer = split(pipe_or_transformer)[0]
    if config.filtering and video_grid(transformer) is None:
        raise ValueError(f"OmniCacheConfig.filtering: needs a video model's token grid (LatteTransformer3DModel), "
                         f"not {type(transformer).__name__}")
    engine = DiffusersEngine(pipe_or_transformer, run=run, steps=steps, progress=progress, **pipe_call_kwargs)
    plan = build_plan(engine, compute_fraction=config.compute_fraction, warmup=config.warmup, tail=config.tail,
                      max_consecutive=config.max_consecutive, order=config.order if config.correction else 0,
                      selection=config.selection, pca=config.pca, filtering=config.filtering, search=False,
                      fit=config.fit,
                      granularity=config.granularity)
    plan.meta["config"] = dataclasses.asdict(dataclasses.replace(config, search=False))
    return plan


def fit_gamma(pipe_or_transformer, plan, *, order: int = 2, run=None, steps: int | None = None,
              progress: bool = True, **pipe_call_kwargs):
    """OmniCache's cache-noise correction on any ``CachePlan`` (a Learning-to-Cache plan, a
    FORA plan, one of your own): the plan with per-step ``(gamma, gamma2)`` fitted closed-loop
    on this model from one uncached recording run and one replay
    (:meth:`DiffusersEngine.fit_plan`; a branch plan needs a pipeline). Arguments as for
    :func:`calibrate`."""
    from ...plan import CachePlan

    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan must be a CachePlan, got {type(plan).__name__}")
    engine = DiffusersEngine(pipe_or_transformer, run=run, steps=steps, progress=progress, **pipe_call_kwargs)
    fitted = engine.fit_plan(plan, order)
    policy = str(plan.meta.get("policy", "CachePlan"))
    fitted.meta = {**plan.meta, **engine.meta(), "correction": f"closed-loop gamma (order {order})",
                   "policy": policy if policy.endswith("+gamma") else policy + "+gamma"}
    return fitted
