"""The engine protocol (:class:`omnicache.cache.Engine`) on a diffusers transformer or pipeline.

The run is the user's own: ``pipe(**call_kwargs)`` (its generators restored before every run)
or ``run()``, any function performing one sampling run with the transformer.
:class:`DiffusersEngine` records one uncached run (per cache context and step each unit's
residual, every cached stream; the linear FLOPs per block and branch; with a pipeline, the
latents around its scheduler's ``step`` and that step's sensitivity to the model output,
probed on a copy of the scheduler's state). A fit replay probes each reuse step: with a
pipeline, every context's call once per coefficient (γ = 0, then each term at 1), the
pipeline's combination of the calls' outputs (true CFG) recovered by least squares from what
it passes to ``scheduler.step``, each direction stepped on a copy of the scheduler: the
outcome is the next latent; otherwise (or where the combination is not recovered, e.g. batch
CFG) the reused unit runs anyway and the outcome is its residual. The router trains on the
recorded calls, replayed with their arguments, each branch submodule's output mixed.
"""

from __future__ import annotations

import copy
import functools
import sys

import torch
from tqdm import tqdm

from ...cache import Recording, Replay
from ...plan import model_fingerprint
from .install import adapter_of, disable, enable, split
from .models import model_blocks, model_grid

__all__ = ["DiffusersEngine"]


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
        return self.run() if self.run is not None else self.pipe(**self.kwargs)


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _output(out):
    return out[0] if isinstance(out, tuple) else out.sample


class DiffusersEngine:
    """The engine protocol on ``target`` (a pipeline, or a transformer driven by ``run`` over
    ``steps`` steps); ``call_kwargs``: what to call the pipeline with (its calibration inputs)."""

    name, samples = "diffusers", 1  # the user's call is one unit: no held-out half (no schedule search)

    def __init__(self, target, *, run=None, steps: int | None = None, progress: bool = True, **call_kwargs):
        self.transformer, self.pipe = split(target)
        self.target = self.pipe if self.pipe is not None else self.transformer
        self.runs = _Runs(self.pipe, run, call_kwargs)
        self.call_kwargs, self.progress, self._steps = call_kwargs, progress, steps
        self.scheduler = getattr(self.pipe, "scheduler", None)
        if steps is None and self.scheduler is None:
            raise ValueError("steps: with run=..., pass the number of steps the run takes (steps=N)")
        self.blocks, self.grid = len(model_blocks(self.transformer)), model_grid(self.transformer)
        self._recording = self._calls = None

    def with_inputs(self, samples: int, seed: int, source: str = "self") -> DiffusersEngine:
        if source != "self":
            raise ValueError("source='data': the diffusers engine trains on the recorded calls of your run")
        return self  # the inputs are the user's call

    def parameters(self):
        return self.transformer.parameters()

    @property
    def steps(self) -> int:
        return self._steps if self._steps is not None else self.record().steps

    def costs(self):
        self.record()
        return self._costs

    def training_samples(self) -> int:
        return 1

    def meta(self) -> dict:
        self.record()
        info = {"model": model_fingerprint(self.transformer, self.blocks), "engine": self.name, "steps": self.steps,
                "contexts": list(self.contexts)}
        if self.scheduler is not None:
            info["scheduler"] = type(self.scheduler).__name__
        info.update({k: float(self.call_kwargs[k]) for k in ("guidance_scale", "true_cfg_scale") if k in self.call_kwargs})
        return info

    # ------------------------------------------------------------------ record
    def record(self) -> Recording:
        """One uncached run (kept): per step ``{(context, unit, stream): residual}`` (float32)."""
        if self._recording is not None:
            return self._recording
        enable(self.target, None, steps=self._steps, check_plan=False)
        _, rt = adapter_of(self.transformer)
        store: dict = {}  # context -> step -> {"in": {unit: {...}}, "res": {(unit, stream): ...}}
        bar = tqdm(desc="calibration: recording", unit="call", disable=not self.progress, file=sys.stderr)

        def pre(u, module, args, kwargs):
            rec = store.setdefault(rt.current.name, {}).setdefault(rt.current.step, {"in": {}, "res": {}})
            rec["in"][u] = {n: x.detach().clone() for n, x in rt.bound[rt.units[u][0]].inputs(args, kwargs).items()
                            if x is not None}

        def post(u, module, args, kwargs, out):
            rec = store[rt.current.name][rt.current.step]
            outs = rt.bound[rt.units[u][1] - 1].outputs(out)
            rec["res"].update({(u, n): (outs[n] - x).detach().float() for n, x in rec["in"].pop(u).items()
                               if outs.get(n) is not None})
            bar.update(u == len(rt.units) - 1)

        handles = []
        for u, (lo, hi) in enumerate(rt.units):
            handles.append(rt.bound[lo].module.register_forward_pre_hook(functools.partial(pre, u), with_kwargs=True))
            handles.append(rt.bound[hi - 1].module.register_forward_hook(functools.partial(post, u), with_kwargs=True))
        latents, sens = [], []
        restore = self._watch_step(latents, sens)
        try:
            self.runs()
        finally:
            for h in handles:
                h.remove()
            restore()
            bar.close()
            steps, costs = rt.session.steps, list(rt.session.costs.values())
            disable(self.target)
        self.contexts = sorted(store, key=lambda n: (n is not None, str(n)))
        for name in self.contexts:
            if sorted(store[name]) != list(range(steps)):
                raise RuntimeError(f"calibration: context {name!r} was called at {len(store[name])} of "
                                   f"{steps} steps; every context must run at every step")
        if not costs:
            raise RuntimeError("calibration: the recording run measured no linear-layer FLOPs")
        self._costs, self._steps = costs[0], steps
        self.scale = sens if len(sens) == steps else [1.0] * steps
        residuals = [{(c, u, n): store[c][t]["res"][(u, n)] for c in self.contexts for u, n in sorted(store[c][t]["res"])}
                     for t in range(steps)]
        self._recording = Recording(residuals, latents if len(latents) == steps + 1 else None)
        return self._recording

    def _watch_step(self, latents, sens=None):
        """Record the latents around the scheduler's ``step`` (and, with ``sens``, probe its
        sensitivity to the model output on a copy of its state); returns the function that unwraps it."""
        sched = self.scheduler
        if sched is None:
            return lambda: None
        orig = sched.step

        def step(model_output, timestep, sample, *args, **kwargs):
            probe = copy.deepcopy(sched) if sens is not None else None  # its state before this step
            if probe is not None:
                vars(probe).pop("step", None)
            out = orig(model_output, timestep, sample, *args, **kwargs)
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            if not latents:
                latents.append(sample.detach().float().clone())
            latents.append(prev.detach().float().clone())
            if probe is not None:
                delta = 1e-3 * model_output  # a small move of the output, in its own direction
                size = float(delta.float().norm())
                moved = probe.step(model_output + delta, timestep, sample, *args, **dict(kwargs, return_dict=False))[0]
                sens.append(float((moved.float() - prev.float()).norm()) / size if size > 0 else 1.0)
            return out

        sched.step = step
        return lambda: vars(sched).pop("step", None)

    def sensitivity(self, t: int, tangents: list) -> torch.Tensor:
        """Each tangent scaled by the scheduler step's measured sensitivity at step ``t``."""
        self.record()
        return torch.stack([self.scale[t] * v.double().flatten() for v in tangents])

    # ------------------------------------------------------------------ replay
    def replay(self, policy, *, samples=None, fit=None) -> Replay:
        if samples is not None and samples != slice(None):
            raise ValueError("search: a diffusers calibration run is one call; use search=False")
        rec = self.record()
        if fit is not None and policy.granularity == "branch" and rec.latents is None:
            raise ValueError("correction: γ on a branch plan is fitted against the uncached next latent through "
                             "the pipeline's scheduler; pass a pipeline (not run=...)")
        enable(self.target, policy, steps=self.steps, check_plan=False)
        _, rt = adapter_of(self.transformer)
        latents = []
        try:
            if fit is None:
                restore = self._watch_step(latents)
                try:
                    self.runs()
                finally:
                    restore()
                return Replay(latents[-1] if latents else None, rt.summary())
            how = "unit residual at the cached state"
            if rec.latents is not None:
                latent_fit = _LatentFit(self, rt, policy, fit)
                try:
                    self.runs()
                finally:
                    latent_fit.close()
                if not latent_fit.residual_steps:
                    return Replay(None, None, "next latent through the pipeline's scheduler")
                if policy.granularity == "branch":
                    raise ValueError("correction: the pipeline's combination of its calls' outputs was not recovered "
                                     "(e.g. batch CFG); γ on a branch plan needs it")
                fit.reset()  # the residual fit replays the whole run
                rt.set_steps(self.steps)
            rt.fitting = functools.partial(_residual_fit, fit)
            self.runs()
            return Replay(None, None, how)
        finally:
            disable(self.target)

    # ------------------------------------------------------------------ Learning-to-Cache
    def _recorded_calls(self) -> dict:
        """Every transformer call of one uncached run: context -> step -> (args, kwargs, output)."""
        if self._calls is None:
            self.record()
            enable(self.target, None, steps=self.steps, check_plan=False)
            _, rt = adapter_of(self.transformer)
            calls, pending = {}, []

            def pre(module, args, kwargs):
                pending.append((rt.current.name, rt.current.step, _clone(args), _clone(kwargs)))

            def post(module, args, kwargs, out):
                name, step, a, kw = pending.pop()
                calls.setdefault(name, {})[step] = (a, kw, _output(out).detach().float().clone())

            handles = [self.transformer.register_forward_pre_hook(pre, with_kwargs=True),
                       self.transformer.register_forward_hook(post, with_kwargs=True)]
            try:
                self.runs()
            finally:
                for h in handles:
                    h.remove()
                disable(self.target)
            self._calls = calls
        return self._calls

    def mixed_error(self, beta, refresh, sample_idx):
        """Every context's recorded calls, teacher-forced: per refresh segment the full step's call
        seeds each branch's cache (no gradient), then each cache step's call runs with every
        branch submodule returning ``β·f + (1 − β)·cache``; the error is the output's mean
        squared error against the uncached output times the scheduler step's squared sensitivity."""
        bound = model_blocks(self.transformer)
        missing = sorted({type(b.module).__name__ for b in bound if not b.io.has_branches})
        if missing:
            raise TypeError(f"Learning-to-Cache needs attention/MLP branches on every block; "
                            f"{', '.join(missing)} declare none")
        calls, weights = self._recorded_calls(), [s * s for s in self.scale]
        segments = []
        for i, full in enumerate(refresh):
            if full:
                segments.append([i])
            else:
                segments[-1].append(i)
        state, saved = {"mode": None, "beta": None, "cache": {}}, []
        for k, bb in enumerate(bound):
            for kind, j, sub in bb.branches():
                saved.append((sub, vars(sub).get("forward")))
                sub.forward = functools.partial(_mixed_branch, state, (k, kind, j), sub.forward)
        err, terms = beta.new_zeros(()), 0
        try:
            for per_step in calls.values():
                for seg in segments:
                    a, kw, _ = per_step[seg[0]]
                    state["mode"], state["cache"] = "record", {}
                    with torch.no_grad():
                        self.transformer(*a, **kw)
                    for t in seg[1:]:
                        a, kw, target = per_step[t]
                        state["mode"], state["beta"] = "mix", beta[t]
                        o = _output(self.transformer(*a, **kw))
                        err, terms = err + weights[t] * (o.float() - target).square().mean(), terms + 1
        finally:
            state["cache"] = {}
            for sub, f in saved:
                del sub.forward
                if f is not None:
                    sub.forward = f
        return err, terms


def _mixed_branch(state, key, orig, *args, **kwargs):
    """A branch submodule while a router trains: records its output (a full step) or returns
    ``β·f + (1 − β)·cache`` (a cache step), which is the next cache step's cache."""
    out = orig(*args, **kwargs)
    if state["mode"] == "record":
        state["cache"][key] = _clone(out)
    elif state["mode"] == "mix":
        out = _mix(out, state["cache"][key], state["beta"][key[0], key[1]])
        state["cache"][key] = out
    return out


def _mix(out, cache, beta):
    if isinstance(out, torch.Tensor):
        return beta * out + (1 - beta) * cache
    return type(out)(_mix(o, c, beta) if isinstance(o, torch.Tensor) else o for o, c in zip(out, cache))


def _residual_fit(fit, ctx, u, pairs, use1, use2):
    """At a reuse unit that ran anyway: the coefficients of the forecast ``F + γ1 D1 + γ2 D2``
    against its true residual, every stream at once (the hook pools the step's calls)."""
    if not (use1 or use2) or not pairs:
        return None, None
    flat = lambda ts: torch.cat([t.double().flatten() for t in ts])  # noqa: E731
    units = [cu for cu, _, _ in pairs.values()]
    dirs = [flat([cu.drifts()[k] for cu in units]) for k, on in ((0, use1), (1, use2)) if on]
    g = fit(ctx.step, flat([cu.F for cu in units]), dirs, flat([x_out - x_in for _, x_in, x_out in pairs.values()]))
    dev = units[0].F.device
    g1 = torch.tensor(g[0], dtype=torch.float32, device=dev) if use1 else None
    g2 = torch.tensor(g[int(use1)], dtype=torch.float32, device=dev) if use2 else None
    return g1, g2


class _LatentFit:
    """The pipeline fit of :meth:`DiffusersEngine.replay` (see the module docstring)."""

    def __init__(self, engine, rt, plan, fit):
        self.engine, self.rt, self.fit, self.t = engine, rt, fit, 0
        self.reuses = [not bool(c.all()) for c in plan.compute_tensor()]  # per step: a unit is reused
        self.probes, self.residual_steps = {}, set()
        rt.installer.wrap_forward = self.wrap
        rt.installer.switch(rt.current.name if rt.current is not None else None)
        self.sched = engine.scheduler
        self.orig_step = self.sched.step
        self.sched.step = self.step

    def wrap(self, fwd):
        rt = self.rt

        def forward(*args, **kwargs):
            t = rt.current.step
            if not self.reuses[t]:  # nothing reused at this step: as is
                return fwd(*args, **kwargs)
            terms = [g for g in (rt.g1, rt.g2) if g is not None]
            saved = [g.clone() for g in terms]
            for g in terms:
                g.zero_()
            base, outs = fwd(*args, **kwargs), []
            for g in terms:
                g.fill_(1.0)
                outs.append(fwd(*args, **kwargs))
                g.zero_()
            for g, s in zip(terms, saved):
                g.copy_(s)
            o0 = _output(base)
            self.probes.setdefault(t, []).append((o0.detach(), [(_output(o) - o0).detach() for o in outs]))
            return base

        return forward

    def step(self, model_output, timestep, sample, *args, **kwargs):
        t, self.t = self.t, self.t + 1
        probes = self.probes.pop(t, None)
        if not probes or not probes[0][1]:
            return self.orig_step(model_output, timestep, sample, *args, **kwargs)
        d = self._directions(model_output, probes)
        if d is None:
            self.residual_steps.add(t)
            return self.orig_step(model_output, timestep, sample, *args, **kwargs)
        base = self._probe(model_output, timestep, sample, args, kwargs)
        dirs = [(self._probe(model_output + dk, timestep, sample, args, kwargs) - base).double() for dk in d]
        g = self.fit(t, base, dirs, self.engine.record().latents[t + 1].to(base.device))
        corrected = model_output + sum(float(gk) * dk for gk, dk in zip(g, d))
        return self.orig_step(corrected, timestep, sample, *args, **kwargs)

    def _directions(self, combined, probes):
        """Σ_c w_c (o_c(e_k) - o_c(0)), with w from ``combined ≈ Σ_c w_c o_c(0)``; None if the
        combination is not recovered to 1e-4."""
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

    def close(self):
        vars(self.sched).pop("step", None)
        self.rt.installer.wrap_forward = None
