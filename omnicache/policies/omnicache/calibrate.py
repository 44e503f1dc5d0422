"""OmniCache calibration: uncached runs of a small batch turned into a static CachePlan.

:func:`record` runs the calibration batch uncached and keeps, per step ``t``, the latent
``x_t``, the block stack's input ``h_t`` and residual ``R_t = h_out - h_in`` and the
conditioning ``c_t``. :func:`build_plan` then, with ``j`` the last computed step before a
reuse step ``t`` and ``p``, ``q`` the two computed steps before ``j``:

1. **Correction** of order 0 (plain reuse), 1 or 2: the executor forecasts
   ``R̂_t = R_j + γ1 D1 + γ2 D2`` from what it stores, ``D1 = R_j - R_p`` and
   ``D2 = D1 - (R_p - R_q)``; with ``filtering`` both drifts are first filtered over the
   token grid once per full step (:func:`omnicache.policies.omnicache.schedule.filter_delta`: low-pass early,
   high-pass late).
2. **Schedule**: ``selection="error"`` costs a reuse by the error it injects under that
   correction, ``‖x̂_{t+1} - x_{t+1}‖`` (RMS over the batch; ``x̂_{t+1}`` the sampler step
   from ``h_t + R̂_t``, linearised, with ``(γ1, γ2)`` the least-squares fit for this very
   context ``(t, j, p, q)``: :class:`Corrector`); the cost depends on ``j, p, q``, so the
   exact DP :func:`omnicache.policies.omnicache.schedule.plan_reuse_steps_in_context` places the ``K`` reuse
   steps (``K`` from the compute fraction) with every step costed in its context.
   ``selection="curvature"`` costs ``t`` by the trajectory's turning angle ``κ_t`` instead
   (:func:`omnicache.policies.omnicache.schedule.curvature`, :func:`omnicache.policies.omnicache.schedule.plan_reuse_steps`).
3. **γ, closed loop** (:func:`fit_closed_loop`): the schedule is replayed on the
   calibration batch, and at each reuse step ``(γ1, γ2)`` is the least-squares fit that
   brings the cached run's next latent back to the uncached one,
   ``min ‖x̂_{t+1}(γ) - x_{t+1}‖²`` (Gauss-Newton, one step from 0: the sampler step is
   linearised in γ by finite differences). It thus removes the noise that earlier reuse
   steps left in the run as well as this step's. Fitting each step's γ on the uncached
   residuals alone (open loop) minimises each step's error but lets the errors add up:
   on the embedded model (flow, 50 steps, TaylorSeer's N=2 schedule, 64 samples) it
   gave 60.3 dB against uncached, the closed-loop fit 64.2 dB, TaylorSeer's fixed
   coefficients 63.3 dB.
4. **Search** (``search=True``): the DP is also run under tighter constraints (run
   lengths ``max_consecutive - 2 … max_consecutive``, ``tail`` and ``tail + 1``); each
   distinct schedule gets its closed-loop γ on the first half of the calibration batch
   and is scored by replaying it on the second half; the best is refitted on the whole
   batch. The DP's additive cost does not see how errors of successive reuse steps
   combine; the held-out replay does.

The constraints always hold: the first ``warmup`` and last ``tail`` steps are computed and
at most ``max_consecutive`` reuse steps run in a row.

``omnicache calibrate`` (:mod:`omnicache.cli`) records the embedded default model and
writes the plan as JSON.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from tqdm import tqdm

from ...plan import CachePlan, model_fingerprint
from ...runtime.executor import CacheExecutor
from . import schedule
from .fit import residual_after_fit

__all__ = ["Trajectory", "record", "Corrector", "fit_closed_loop", "fit_plan_closed_loop", "replay_error",
           "RuntimeEngine", "build_plan", "plan_for_schedule"]

FILTER_DEFAULTS = dict(low_cutoff=0.5, high_cutoff=0.25, split=0.5)


@dataclasses.dataclass
class Trajectory:
    """An uncached run of ``labels`` from the noise ``latents[0]``: ``latents[t]`` enters
    step ``t`` (``steps + 1`` of them); per step, ``inputs[t]`` / ``residuals[t]`` the block
    stack's input and residual ``[rows, T, D]`` and ``conds[t]`` the conditioning
    ``[rows, D]``; ``executor`` the uncached executor that ran it (``finish(t, x, h, c)``:
    its final layer + guidance + sampler step); ``grid`` the token grid ``(H, W)``."""

    labels: torch.Tensor
    latents: list
    residuals: list
    inputs: list
    conds: list
    executor: CacheExecutor
    grid: tuple

    def finish(self, t, x, h, c):
        return self.executor.finish(t, x, h, c)

    @property
    def sampler(self):
        return self.executor.sampler

    @property
    def guidance(self) -> float:
        return self.executor.guidance

    @property
    def steps(self) -> int:
        return len(self.residuals)


@torch.no_grad()
def record(model, labels, *, steps: int, sampler="flow", guidance: float = 1.0, seed: int = 0,
           progress: bool = True) -> Trajectory:
    """Run ``labels`` uncached (CFG as ``generate`` does) and record what calibration needs."""
    ex = CacheExecutor(model, labels, None, steps=steps, sampler=sampler, guidance=guidance)
    x = ex.init_noise(seed)
    latents, residuals, inputs, conds = [x], [], [], []
    for i in tqdm(range(steps), desc="calibrating", unit="step", disable=not progress, file=sys.stderr):
        h, c = ex.embed(i, x)
        h_in = h
        for blk in ex.blocks:
            h = blk(h, c)
        inputs.append(h_in)
        residuals.append(h - h_in)
        conds.append(c)
        x = ex.finish(i, x, h, c)
        latents.append(x)
    side = model.config.input_size // model.config.patch_size
    return Trajectory(labels, latents, residuals, inputs, conds, ex, (side, side))


def _sources(compute: list[bool]) -> list[tuple | None]:
    """Per step: None if computed, else ``(j, p, q)`` (None where missing)."""
    out, hist = [], []
    for t, c in enumerate(compute):
        if c:
            hist.append(t)
            out.append(None)
        else:
            prev = hist[::-1] + [None, None]
            out.append((prev[0], prev[1], prev[2]))
    return out


class Corrector:
    """The DP's cost: the error a reuse injects, for any context ``(t, j, p, q)``.

    ``error(t, j, p, q)`` is the RMS over the batch of ``x̂_{t+1} - x_{t+1}`` when step
    ``t`` alone is reused from computed steps ``j, p, q`` with the correction of order
    ``order``, ``(γ1, γ2)`` the least-squares fit for that context. The sampler step is
    linearised in the block stack's output at the uncached point,
    ``A_t = ∂x_{t+1}/∂h_out`` (central differences of the final layer in one batched call
    per step; guidance and the sampler step are linear), so the error vector is
    ``A_t (R_j - R_t) + γ1 A_t D1 + γ2 A_t D2`` and the fit and its residual come from a
    Gram matrix (float64). Without filtering the projected drifts are differences of the
    projected residuals ``A_t R_s`` of the ``3 M + 3`` steps before ``t``
    (``M = max_consecutive``, the widest context); with filtering each filtered drift is
    projected on its own. Memoised per step.
    """

    def __init__(self, traj: Trajectory, order: int, max_consecutive: int, filtering: dict | None = None):
        if order not in (0, 1, 2):
            raise ValueError(f"order must be 0, 1 or 2, got {order!r}")
        self.traj, self.order, self.filtering, self.m = traj, order, filtering, max_consecutive
        self._proj, self._errors = {}, {}

    @torch.no_grad()
    def _project(self, t: int, tangents: list) -> torch.Tensor:
        """``A_t · v`` for each tangent ``v`` ``[rows, T, D]``: float64 ``[k, B·C·H·W]``."""
        tr, ex = self.traj, self.traj.executor
        h0 = tr.inputs[t] + tr.residuals[t]
        v = torch.stack(tangents)  # (k, rows, T, D)
        scale = 1e-2 * h0.norm() / v.flatten(1).norm(dim=1).clamp_min(1e-30)  # (k,)
        dv = scale.view(-1, 1, 1, 1) * v
        k, rows = v.shape[0], v.shape[1]
        h = torch.cat([h0 + dv, h0 - dv]).flatten(0, 1)  # (2k·rows, T, D)
        c = tr.conds[t].repeat(2 * k, 1)
        out = ex.model.final(h, c).double()
        out = out.reshape(2, k, rows, *out.shape[1:])
        d = (out[0] - out[1]) / (2 * scale.double().view(-1, *[1] * (out.dim() - 2)))  # (k, rows, C, H, W)
        if ex.cfg:
            cond, uncond = d.chunk(2, dim=1)
            d = uncond + ex.guidance * (cond - uncond)
        return ex.sampler.step(t, torch.zeros_like(d), d).flatten(1)  # the step is linear in (x, out)

    def _prepare(self, t):
        """Project what step ``t``'s contexts need, in one batched call: the residuals ``R_s``
        of the steps a context can reach and, with filtering, their filtered copies
        ``P_j R_s`` for every ``j`` a context can end on (the filter is linear)."""
        r = self.traj.residuals
        lo = max(t - 3 * self.m - 2, 0)
        keys = [(None, s) for s in range(lo, t + 1)]
        tangents = [r[s] for s in range(lo, t + 1)]
        if self.filtering and self.order >= 1:
            for j in range(max(t - self.m, 0), t):
                window = list(range(max(j - 2 * self.m - 2, 0), j + 1))
                raw = torch.stack([r[s] for s in window])  # (n, rows, T, D)
                filtered = schedule.filter_delta(raw.flatten(0, 1), self.traj.grid,
                                                 j / max(self.traj.steps - 1, 1), **self.filtering)
                keys.extend((j, s) for s in window)
                tangents.extend(filtered.reshape(raw.shape).unbind(0))
        proj = self._project(t, tangents)
        self._proj[t] = {key: proj[i] for i, key in enumerate(keys)}

    def _vectors(self, t, j, p, q):
        """``A_t (R_t - R_j)`` and the projected (filtered) drifts the correction uses."""
        if t not in self._proj:
            self._prepare(t)
        P = self._proj[t]
        v = P[(None, t)] - P[(None, j)]
        cols = []
        if self.order >= 1 and p is not None:
            f = j if self.filtering else None  # D1, D2 as filtered at full step j
            e1 = P[(f, j)] - P[(f, p)]
            cols.append(e1)
            if self.order >= 2 and q is not None:
                cols.append(e1 - P[(f, p)] + P[(f, q)])
        return v, cols

    def error(self, t, j, p, q) -> float:
        key = (t, j, p, q)
        if key not in self._errors:
            sq = residual_after_fit(*self._vectors(t, j, p, q))
            self._errors[key] = (sq / self.traj.labels.shape[0]) ** 0.5
        return self._errors[key]


def plan_for_schedule(compute: list[bool], blocks: int, granularity: str, order: int, filtering: dict | None,
          grid: tuple, gamma=None, gamma2=None, meta: dict | None = None) -> CachePlan:
    """A plan for ``compute``; without ``gamma`` the coefficients are placeholders (1.0 where
    the executor can form D1 / D2) so that the executor stores every difference."""
    if gamma is None:
        gamma, gamma2 = [0.0] * len(compute), [0.0] * len(compute)
        for t, src in enumerate(_sources(compute)):
            if src is not None and src[1] is not None and order >= 1:
                gamma[t] = 1.0
                gamma2[t] = 1.0 if src[2] is not None and order >= 2 else 0.0
    meta = dict(meta or {})
    if filtering and order >= 1:
        meta["filter"] = dict(filtering, grid=list(grid))
    rows = [[[c, c] for _ in range(blocks)] for c in compute]
    return CachePlan(len(compute), blocks, granularity, rows, gamma, gamma2, meta=meta)


@torch.no_grad()
def fit_closed_loop(model, traj: Trajectory, compute: list[bool], order: int, filtering: dict | None = None,
                    samples: slice = slice(None)) -> tuple[list[float], list[float]]:
    """``(gamma, gamma2)`` fitted on the cached run itself (see the module docstring, 3).

    The schedule ``compute`` runs through a :class:`CacheExecutor` on ``samples`` of the
    calibration batch (same noise as :func:`record`), so ``F``, ``D1``, ``D2`` (and their
    filtered copies) are exactly what the executor will hold. At a reuse step ``t`` with
    hidden state ``h``, ``o(γ) = finish(t, x̂_t, h + F + γ1 D1 + γ2 D2)`` is linearised,
    ``J = [o(e_1) - o(0), o(e_2) - o(0)]``, and ``γ = argmin ‖o(0) + J γ - x_{t+1}‖²``
    (float64, pooled over the samples). Coefficients whose difference the executor cannot
    form yet (fewer than 2 / 3 computed steps so far) stay 0.
    """
    steps = traj.steps
    gamma, gamma2 = [0.0] * steps, [0.0] * steps
    if order == 0:
        return gamma, gamma2
    plan = plan_for_schedule(compute, len(model.blocks), "step", order, filtering, traj.grid)
    labels = traj.labels[samples]
    ex = CacheExecutor(model, labels, plan, steps=steps, sampler=traj.sampler, guidance=traj.guidance)
    x = traj.latents[0][samples]
    ex.reset_cache()
    for t in range(steps):
        if compute[t]:
            x, _ = ex.step(t, x)
            continue
        h, c = ex.embed(t, x)
        unit = ex.cache_units[0]
        F, (D1, D2) = unit.F, unit.drifts()
        cols = [d for d, g in ((D1, plan.gamma[t]), (D2, plan.gamma2[t])) if g]
        base = h + F

        def out(r, t=t, x=x, h=h, c=c):
            return ex.finish(t, x, r, c).double()

        o0 = out(base)
        if cols:
            J = torch.stack([(out(base + d) - o0).flatten() for d in cols], 1)
            target = (traj.latents[t + 1][samples].double() - o0).flatten()
            g = torch.linalg.lstsq(J, target[:, None]).solution[:, 0].tolist()
            gamma[t] = g[0]
            gamma2[t] = g[1] if len(g) > 1 else 0.0
            for gi, d in zip(g, cols):
                base = base + gi * d
        x = ex.finish(t, x, base, c)
    return gamma, gamma2


@torch.no_grad()
def fit_plan_closed_loop(model, traj: Trajectory, plan: CachePlan, order: int = 2,
                         samples: slice = slice(None)) -> CachePlan:
    """``plan`` with per-step ``(gamma, gamma2)`` fitted on its own cached run, for any
    granularity (branch-level plans such as Learning-to-Cache's included).

    As :func:`fit_closed_loop`, but the correction enters inside the block loop, so the step
    is linearised by probing: at a step that reuses any unit, the step is run from the
    same state and caches with ``γ = 0`` and with each coefficient at ``probe`` (the caches
    restored in between), ``J`` holds the probe columns of ``x_{t+1}``, and
    ``γ = argmin ‖o(0) + J γ - x_{t+1}‖²``. A coefficient is fitted only where every unit
    the step reuses has the computed values its difference needs (2 for ``D1``, 3 for
    ``D2``); elsewhere it stays 0.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if plan.steps != traj.steps:
        raise ValueError(f"plan has {plan.steps} steps, the trajectory {traj.steps}")
    comp = plan.compute_tensor()
    if plan.granularity == "step":
        comp = comp[:, :1, :1]
    elif plan.granularity == "block":
        comp = comp[:, :, :1]
    counts = torch.cumsum(comp.long(), 0) - comp.long()  # computed values before each step, per unit
    usable = []  # per step: how many coefficients every reused unit supports
    for t in range(plan.steps):
        reused = ~comp[t]
        usable.append(0 if not bool(reused.any()) else min(int(counts[t][reused].min()) - 1, order))
    probe = [1.0 if u >= 1 else 0.0 for u in usable]
    work = dataclasses.replace(plan, gamma=probe, gamma2=[1.0 if u >= 2 else 0.0 for u in usable])
    ex = CacheExecutor(model, traj.labels[samples], work, steps=plan.steps, sampler=traj.sampler,
                       guidance=traj.guidance)
    ex.reset_cache()
    gamma, gamma2 = [0.0] * plan.steps, [0.0] * plan.steps
    x = traj.latents[0][samples]
    buffers = ex.cache_tensors()

    def run(t, g1, g2):
        saved = [b.clone() for b in buffers]
        ex.set_gamma(t, g1, g2)
        out, _ = ex.step(t, x)
        for b, s in zip(buffers, saved):
            b.copy_(s)
        return out.double()

    for t in range(plan.steps):
        if usable[t] >= 1:
            o0 = run(t, 0.0, 0.0)
            cols = [run(t, 1.0, 0.0) - o0] + ([run(t, 0.0, 1.0) - o0] if usable[t] >= 2 else [])
            J = torch.stack([c.flatten() for c in cols], 1)
            target = (traj.latents[t + 1][samples].double() - o0).flatten()
            g = torch.linalg.lstsq(J, target[:, None]).solution[:, 0].tolist()
            gamma[t] = g[0]
            gamma2[t] = g[1] if len(g) > 1 else 0.0
        ex.set_gamma(t, gamma[t], gamma2[t])
        x, _ = ex.step(t, x)
    return dataclasses.replace(plan, gamma=gamma, gamma2=gamma2)


@torch.no_grad()
def replay_error(model, traj: Trajectory, plan: CachePlan, samples: slice = slice(None)) -> float:
    """Mean squared error of the final latent when ``plan`` replays ``samples`` of the batch."""
    labels = traj.labels[samples]
    ex = CacheExecutor(model, labels, plan, steps=traj.steps, sampler=traj.sampler, guidance=traj.guidance)
    x, _ = ex.run(x=traj.latents[0][samples])
    return float((x - traj.latents[-1][samples]).double().square().mean())


class RuntimeEngine:
    """The calibration interface of our runtime (what :func:`build_plan` asks of an engine):
    a recorded :class:`Trajectory` and replays through the :class:`CacheExecutor`.

    ``steps``, ``blocks``, ``samples`` (calibration batch size), ``latents`` (per step, for
    the curvature), ``residuals`` (per step, for the open-loop fit), ``grid``;
    ``corrector(order, max_consecutive, filtering)`` (the DP's cost: ``.error(t, j, p, q)``),
    ``fit(compute, order, filtering, samples)`` (closed-loop ``(gamma, gamma2)``),
    ``replay_error(plan, samples)`` (final-latent MSE of a replay), ``meta()`` (what the
    plan records of the model and the run)."""

    def __init__(self, model, traj: Trajectory):
        self.model, self.traj = model, traj
        self.steps, self.blocks, self.grid = traj.steps, len(model.blocks), traj.grid
        self.samples = traj.labels.shape[0]
        self.latents, self.residuals = traj.latents, traj.residuals

    def corrector(self, order, max_consecutive, filtering):
        return Corrector(self.traj, order, max_consecutive, filtering)

    def fit(self, compute, order, filtering, samples=slice(None)):
        return fit_closed_loop(self.model, self.traj, compute, order, filtering, samples)

    def replay_error(self, plan, samples=slice(None)):
        return replay_error(self.model, self.traj, plan, samples)

    def meta(self) -> dict:
        return {"model": model_fingerprint(self.model), "engine": "omnicache.runtime"}


def _candidate_constraints(warmup: int, tail: int, max_consecutive: int, steps: int, search: bool):
    runs = range(max(1, max_consecutive - 2), max_consecutive + 1) if search else [max_consecutive]
    tails = (tail, tail + 1) if search else (tail,)
    out = []
    for m in sorted(runs, reverse=True):
        for tl in tails:
            if warmup + tl <= steps:
                out.append((warmup, tl, m))
    return out


def _uniform_reuse(steps: int, budget: int, warmup: int, tail: int) -> list[int]:
    """``budget`` reuse steps spread as evenly as possible between the warm-up and the tail."""
    window = steps - warmup - tail
    runs = window - budget + 1  # the computed steps inside the window split it into this many runs
    out, t = [], warmup
    for k in range(runs):
        run = (k + 1) * budget // runs - k * budget // runs
        out.extend(range(t, t + run))
        t += run + 1
    return out


def _open_loop(traj, compute: list[bool], order: int) -> tuple[list[float], list[float]]:
    """``(gamma, gamma2)`` fitted per step on the uncached residuals (the DESIGN's first
    formulation): :func:`omnicache.policies.omnicache.schedule.fit_gammas2` / :func:`~omnicache.policies.omnicache.schedule.fit_gammas`."""
    steps = traj.steps
    if order == 0:
        return [0.0] * steps, [0.0] * steps
    if order == 1:
        return schedule.fit_gammas(traj.residuals, compute).tolist(), [0.0] * steps
    g = schedule.fit_gammas2(traj.residuals, compute)
    return g[:, 0].tolist(), g[:, 1].tolist()


def build_plan(engine, *, compute_fraction: float, warmup: int, tail: int,
               max_consecutive: int, order: int, selection: str, pca: bool = False,
               filtering: bool = False, search: bool = True, fit: str = "closed", granularity: str = "step",
               meta: dict | None = None) -> CachePlan:
    """The static plan of a calibrated run on ``engine`` (see the module docstring and
    :class:`RuntimeEngine` for what an engine provides; the diffusers integration has its own).

    ``selection``: ``"error"``, ``"curvature"`` or ``"uniform"`` (reuse spread evenly: the
    ablation's schedule without trajectory information). ``fit``: ``"closed"`` (closed-loop
    γ, :func:`fit_closed_loop`) or ``"open"`` (per-step least squares on the uncached
    residuals; no filtering).
    """
    steps = engine.steps
    budget = schedule.budget_for_compute_fraction(steps, compute_fraction)
    filt = dict(FILTER_DEFAULTS) if filtering and order >= 1 else None
    if fit not in ("closed", "open"):
        raise ValueError(f"fit must be 'closed' or 'open', got {fit!r}")
    if fit == "open" and filt:
        raise ValueError("fit='open' fits on unfiltered residuals: it cannot be combined with filtering")
    corrector = engine.corrector(order, max_consecutive, filt)
    if selection == "curvature":
        kappa = (schedule.curvature_pca3 if pca else schedule.curvature)(engine.latents)
    elif selection not in ("error", "uniform"):
        raise ValueError(f"selection must be 'error', 'curvature' or 'uniform', got {selection!r}")

    def fit_gammas(compute, samples=slice(None)):
        if fit == "open":
            return _open_loop(engine, compute, order)
        return engine.fit(compute, order, filt, samples)

    schedules = []  # distinct compute schedules, in the order tried
    for w, tl, m in _candidate_constraints(warmup, tail, max_consecutive, steps, search):
        if budget > schedule.max_reuse_steps(steps, warmup=w, tail=tl, max_consecutive=m):
            if not schedules and (w, tl, m) == (warmup, tail, max_consecutive):
                raise ValueError(f"compute_fraction={compute_fraction} needs {budget} reuse steps of {steps}: "
                                 f"more than warmup={warmup}, tail={tail}, max_consecutive={max_consecutive} allow")
            continue
        if selection == "error":
            reuse = schedule.plan_reuse_steps_in_context(corrector.error, steps, budget, warmup=w, tail=tl,
                                                         max_consecutive=m)
        elif selection == "curvature":
            reuse = schedule.plan_reuse_steps(kappa, budget, warmup=w, tail=tl, max_consecutive=m)
        else:
            reuse = _uniform_reuse(steps, budget, w, tl)
        compute = schedule.compute_schedule(steps, reuse)
        if compute not in schedules:
            schedules.append(compute)

    n = engine.samples
    scores = []
    if len(schedules) > 1:
        if n < 2:
            raise ValueError("search needs calibration_samples >= 2 (half fits, half scores)")
        fit_half, held = slice(0, n // 2), slice(n // 2, n)
        for compute in schedules:
            g1, g2 = fit_gammas(compute, fit_half)
            plan = plan_for_schedule(compute, engine.blocks, "step", order, filt, engine.grid, g1, g2)
            scores.append(engine.replay_error(plan, held))
        compute = schedules[min(range(len(schedules)), key=scores.__getitem__)]
    else:
        compute = schedules[0]
    gamma, gamma2 = fit_gammas(compute)
    costs = [0.0 if src is None else corrector.error(t, *src) for t, src in enumerate(_sources(compute))]
    info = dict(policy="OmniCache", selection=selection, order=order, pca=pca, filtering=filt is not None,
                fit=fit, search=search, compute_fraction=compute_fraction, warmup=warmup, tail=tail,
                max_consecutive=max_consecutive, reuse_error=[round(c, 8) for c in costs],
                candidates=len(schedules), heldout_mse=[float(f"{s:.4g}") for s in scores])
    info.update(engine.meta())
    info.update(meta or {})
    return plan_for_schedule(compute, engine.blocks, granularity, order, filt, engine.grid, gamma, gamma2, info)
