"""OmniCache calibration on any engine: one uncached run turned into a static CachePlan.

The engine (:class:`omnicache.cache.Engine`) records one uncached run: per step ``t`` the
cached residual ``R_t = h_out - h_in`` and, where it has a sampler step, the latents.
:func:`build_plan` then, with ``j`` the last computed step before a reuse step ``t`` and
``p``, ``q`` the two computed steps before ``j``:

1. **Correction** of order 0 (plain reuse), 1 or 2: the engine forecasts
   ``R̂_t = R_j + γ1 D1 + γ2 D2`` from what it stores, ``D1 = R_j - R_p`` and
   ``D2 = D1 - (R_p - R_q)``; with ``filtering`` both drifts are first filtered over the
   token grid once per full step (:func:`omnicache.filters.filter_delta`: low-pass early,
   high-pass late).
2. **Schedule**: ``selection="error"`` costs a reuse by the error it injects under that
   correction, ``‖x̂_{t+1} - x_{t+1}‖`` (RMS over the batch; ``x̂_{t+1}`` the sampler step
   from ``h_t + R̂_t``, linearised by the engine, :meth:`Engine.sensitivity`, with
   ``(γ1, γ2)`` the least-squares fit for this very context ``(t, j, p, q)``:
   :class:`Corrector`); the cost depends on ``j, p, q``, so the exact DP
   :func:`.schedule.plan_reuse_steps_in_context` places the ``K`` reuse steps (``K`` from
   the compute fraction) with every step costed in its context. ``selection="curvature"``
   costs ``t`` by the trajectory's turning angle ``κ_t`` instead (:func:`.schedule.curvature`,
   :func:`.schedule.plan_reuse_steps`).
3. **γ, closed loop** (:func:`.correction.fit_gammas`): the schedule is replayed, and at
   each reuse step ``(γ1, γ2)`` is the least-squares fit that brings the cached run's next
   latent back to the uncached one, ``min ‖x̂_{t+1}(γ) - x_{t+1}‖²`` (Gauss-Newton, one step
   from 0). It thus removes the noise that earlier reuse steps left in the run as well as
   this step's. Fitting each step's γ on the uncached residuals alone (open loop) minimises
   each step's error but lets the errors add up: on the embedded model (flow, 50 steps,
   TaylorSeer's N=2 schedule, 64 samples) it gave 60.3 dB against uncached, the closed-loop
   fit 64.2 dB, TaylorSeer's fixed coefficients 63.3 dB.
4. **Search** (``search=True``, where the engine's inputs replay separately): the DP is also
   run under tighter constraints (run lengths ``max_consecutive - 2 … max_consecutive``,
   ``tail`` and ``tail + 1``); each distinct schedule gets its closed-loop γ on the first half
   of the calibration batch and is scored by replaying it on the second half; the best is
   refitted on the whole batch. The DP's additive cost does not see how errors of successive
   reuse steps combine; the held-out replay does.

The constraints always hold: the first ``warmup`` and last ``tail`` steps are computed and
at most ``max_consecutive`` reuse steps run in a row.
"""

from __future__ import annotations

import torch

from ...filters import filter_delta
from ...plan import CachePlan
from . import schedule
from .correction import fit_gammas
from .fit import residual_after_fit

__all__ = ["Corrector", "build_plan", "plan_for_schedule", "sources", "FILTER_DEFAULTS"]

FILTER_DEFAULTS = dict(low_cutoff=0.5, high_cutoff=0.25, split=0.5)


def sources(compute: list[bool]) -> list[tuple | None]:
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

    ``error(t, j, p, q)`` is the RMS over the batch of ``x̂_{t+1} - x_{t+1}`` when step ``t``
    alone is reused from computed steps ``j, p, q`` with the correction of order ``order``,
    ``(γ1, γ2)`` the least-squares fit for that context. The engine linearises the sampler
    step in the cached residual at the uncached point (``A_t``, :meth:`Engine.sensitivity`),
    so the error vector is ``A_t (R_j - R_t) + γ1 A_t D1 + γ2 A_t D2`` and the fit and its
    residual come from a Gram matrix (float64). Without filtering the projected drifts are
    differences of the projected residuals ``A_t R_s`` of the ``3 M + 3`` steps before ``t``
    (``M = max_consecutive``, the widest context); with filtering (where the recording's
    residuals lie on a token grid; elsewhere the cost is measured unfiltered) each filtered
    drift is projected on its own. Memoised per step.
    """

    def __init__(self, engine, order: int, max_consecutive: int, filtering: dict | None = None):
        if order not in (0, 1, 2):
            raise ValueError(f"order must be 0, 1 or 2, got {order!r}")
        self.engine, self.rec = engine, engine.record()
        self.order, self.m = order, max_consecutive
        self.filtering = filtering if self.rec.grid is not None else None
        self._proj, self._errors = {}, {}

    def _prepare(self, t):
        """Project what step ``t``'s contexts need, in one call: the residuals ``R_s`` of the
        steps a context can reach and, with filtering, their filtered copies ``P_j R_s`` for
        every ``j`` a context can end on (the filter is linear)."""
        rec = self.rec
        lo = max(t - 3 * self.m - 2, 0)
        keys = [(None, s) for s in range(lo, t + 1)]
        tangents = [rec.flat(s) for s in range(lo, t + 1)]
        if self.filtering and self.order >= 1:
            for j in range(max(t - self.m, 0), t):
                window = list(range(max(j - 2 * self.m - 2, 0), j + 1))
                raw = torch.stack([rec.flat(s) for s in window])  # (n, rows, T, D)
                filtered = filter_delta(raw.flatten(0, 1), rec.grid, j / max(rec.steps - 1, 1), **self.filtering)
                keys.extend((j, s) for s in window)
                tangents.extend(filtered.reshape(raw.shape).unbind(0))
        proj = self.engine.sensitivity(t, tangents)
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
            self._errors[key] = (sq / self.engine.samples) ** 0.5
        return self._errors[key]


def plan_for_schedule(compute: list[bool], blocks: int, granularity: str, order: int, filtering: dict | None,
                      grid: tuple | None, gamma=None, gamma2=None, meta: dict | None = None) -> CachePlan:
    """A plan for ``compute``; without ``gamma`` the coefficients are placeholders (1.0 where
    the engine can form D1 / D2) so that the engine stores every difference."""
    if gamma is None:
        gamma, gamma2 = [0.0] * len(compute), [0.0] * len(compute)
        for t, src in enumerate(sources(compute)):
            if src is not None and src[1] is not None and order >= 1:
                gamma[t] = 1.0
                gamma2[t] = 1.0 if src[2] is not None and order >= 2 else 0.0
    meta = dict(meta or {})
    if filtering and order >= 1:
        meta["filter"] = dict(filtering, grid=list(grid))
    rows = [[[c, c] for _ in range(blocks)] for c in compute]
    return CachePlan(len(compute), blocks, granularity, rows, gamma, gamma2, meta=meta)


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


def _open_loop(residuals: list, compute: list[bool], order: int) -> tuple[list[float], list[float]]:
    """``(gamma, gamma2)`` fitted per step on the uncached residuals (the DESIGN's first
    formulation): :func:`.schedule.fit_gammas2` / :func:`.schedule.fit_gammas`."""
    steps = len(residuals)
    if order == 0:
        return [0.0] * steps, [0.0] * steps
    if order == 1:
        return schedule.fit_gammas(residuals, compute).tolist(), [0.0] * steps
    g = schedule.fit_gammas2(residuals, compute)
    return g[:, 0].tolist(), g[:, 1].tolist()


def build_plan(engine, *, compute_fraction: float, warmup: int, tail: int, max_consecutive: int, order: int,
               selection: str, pca: bool = False, filtering: bool = False, search: bool = True, fit: str = "closed",
               granularity: str = "step", meta: dict | None = None) -> CachePlan:
    """The static plan of a calibrated run on ``engine`` (see the module docstring).

    ``selection``: ``"error"``, ``"curvature"`` or ``"uniform"`` (reuse spread evenly: the
    ablation's schedule without trajectory information). ``fit``: ``"closed"`` (closed-loop
    γ) or ``"open"`` (per-step least squares on the uncached residuals; no filtering).
    ``search`` runs only where the engine's inputs replay separately (``engine.samples > 1``).
    """
    steps = engine.steps
    budget = schedule.budget_for_compute_fraction(steps, compute_fraction)
    filt = dict(FILTER_DEFAULTS) if filtering and order >= 1 else None
    if fit not in ("closed", "open"):
        raise ValueError(f"fit must be 'closed' or 'open', got {fit!r}")
    if fit == "open" and filt:
        raise ValueError("fit='open' fits on unfiltered residuals: it cannot be combined with filtering")
    if selection not in ("error", "curvature", "uniform"):
        raise ValueError(f"selection must be 'error', 'curvature' or 'uniform', got {selection!r}")
    if filt and engine.grid is None:
        raise ValueError("OmniCacheConfig.filtering needs the token grid: available on models whose tokens lie on "
                         "a grid the engine knows (our DiT; LatteTransformer3DModel's frames x rows x columns)")
    rec = engine.record()
    corrector = Corrector(engine, order, max_consecutive, filt)
    if selection == "curvature":
        if rec.latents is None:
            raise ValueError("OmniCacheConfig.selection='curvature' needs the sampler's latents, which this engine "
                             "did not record (a bare transformer in your own loop: pass a pipeline)")
        kappa = (schedule.curvature_pca3 if pca else schedule.curvature)(rec.latents)
    search = search and engine.samples > 1

    def fit_coefficients(compute, samples=None):
        if fit == "open":
            return _open_loop([rec.flat(t) for t in range(steps)], compute, order)
        if order == 0:
            return [0.0] * steps, [0.0] * steps
        plan = plan_for_schedule(compute, engine.blocks, "step", order, filt, engine.grid)
        gamma, gamma2, _ = fit_gammas(engine, plan, order, samples)
        return gamma, gamma2

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

    n, scores = engine.samples, []
    if len(schedules) > 1:
        fit_half, held = slice(0, n // 2), slice(n // 2, n)
        for compute in schedules:
            g1, g2 = fit_coefficients(compute, fit_half)
            plan = plan_for_schedule(compute, engine.blocks, "step", order, filt, engine.grid, g1, g2)
            x = engine.replay(plan, samples=held).latent
            scores.append(float((x - rec.latents[-1][held]).double().square().mean()))
        compute = schedules[min(range(len(schedules)), key=scores.__getitem__)]
    else:
        compute = schedules[0]
    gamma, gamma2 = fit_coefficients(compute)
    costs = [0.0 if src is None else corrector.error(t, *src) for t, src in enumerate(sources(compute))]
    info = dict(policy="OmniCache", selection=selection, order=order, pca=pca, filtering=filt is not None,
                fit=fit, search=search, compute_fraction=compute_fraction, warmup=warmup, tail=tail,
                max_consecutive=max_consecutive, reuse_error=[round(c, 8) for c in costs],
                candidates=len(schedules), heldout_mse=[float(f"{s:.4g}") for s in scores])
    info.update(engine.meta())
    info.update(meta or {})
    return plan_for_schedule(compute, engine.blocks, granularity, order, filt, engine.grid, gamma, gamma2, info)
