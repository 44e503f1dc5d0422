"""OmniCache calibration: one uncached, batched run that turns into a static CachePlan.

:func:`record` runs the calibration batch uncached and keeps, per step ``t``, the latent
``x_t``, the block stack's input ``h_t`` and residual ``R_t = h_out - h_in`` and the
conditioning ``c_t``. :func:`build_plan` then:

1. **Correction** (``order`` 0, 1 or 2): a reuse step ``t`` after the computed steps
   ``… q < p < j < t`` is estimated as ``R̂_t = R_j + γ1 D1 + γ2 D2`` with
   ``D1 = R_j - R_p``, ``D2 = D1 - (R_p - R_q)`` (what the executor stores), ``(γ1, γ2)``
   the joint least-squares fit on the calibration run
   (:func:`omnicache.schedule.fit_gamma2`); order 1 fits ``γ1`` alone, order 0 is plain
   reuse. With ``filtering`` the drifts are first filtered over the token grid
   (:func:`omnicache.schedule.filter_delta`, low-pass early, high-pass late) and the fit
   uses the filtered drifts.
2. **Schedule**: ``selection="error"`` costs reusing ``t`` by the error it injects under
   that correction, ``‖x̂_{t+1} - x_{t+1}‖`` (RMS over the batch), ``x̂_{t+1}`` the
   sampler step from ``h_t + R̂_t``; the cost depends on ``j, p, q``, so the exact DP
   :func:`omnicache.schedule.plan_reuse_steps_in_context` places the ``K`` reuse steps
   (``K`` from the compute fraction) with every step costed in its actual context.
   ``selection="curvature"`` costs ``t`` by the turning angle ``κ_t`` of the trajectory
   (:func:`omnicache.schedule.curvature`) and uses
   :func:`omnicache.schedule.plan_reuse_steps`. Both keep the first ``warmup`` and last
   ``tail`` steps computed and at most ``max_consecutive`` reuse steps in a row.
3. The ``(γ1, γ2)`` of the chosen schedule go into the plan's ``gamma``/``gamma2``.

:func:`main` is ``omnicache calibrate``: it records the embedded default model and
writes the plan as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable

import torch
from tqdm import tqdm

from . import schedule
from .plan import CachePlan
from .runtime.executor import CacheExecutor

__all__ = ["Trajectory", "record", "Corrector", "step_costs", "build_plan", "main"]

FILTER_DEFAULTS = dict(low_cutoff=0.5, high_cutoff=0.25, split=0.5)


@dataclasses.dataclass
class Trajectory:
    """An uncached run: ``latents[t]`` enters step ``t`` (``steps + 1`` of them); per step,
    ``inputs[t]`` / ``residuals[t]`` the block stack's input and residual ``[rows, T, D]``,
    ``conds[t]`` the conditioning ``[rows, D]``; ``finish(t, x, h, c)`` the executor's
    final layer + guidance + sampler step; ``grid`` the token grid ``(H, W)``."""

    latents: list
    residuals: list
    inputs: list
    conds: list
    finish: Callable
    grid: tuple

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
    for i in tqdm(range(steps), desc="calibrating", unit="step", disable=not progress):
        h, c = ex._embed(i, x)
        h_in = h
        for blk in ex.blocks:
            h = blk(h, c)
        inputs.append(h_in)
        residuals.append(h - h_in)
        conds.append(c)
        x = ex._finish(i, x, h, c)
        latents.append(x)
    side = model.config.input_size // model.config.patch_size
    return Trajectory(latents, residuals, inputs, conds, ex._finish, (side, side))


class Corrector:
    """The correction of order ``order`` fitted on a trajectory, for any context ``(t, j, p, q)``.

    ``gammas(t, j, p, q)`` is ``(γ1, γ2)``; ``error(t, j, p, q)`` the RMS over the batch of
    ``x̂_{t+1} - x_{t+1}`` when step ``t`` alone is reused from that context. Both memoised.
    """

    def __init__(self, traj: Trajectory, order: int, filtering: dict | None = None):
        if order not in (0, 1, 2):
            raise ValueError(f"order must be 0, 1 or 2, got {order!r}")
        self.traj, self.order, self.filtering = traj, order, filtering
        self._gammas, self._errors, self._deltas = {}, {}, {}

    def _filtered(self, delta, j):
        if not self.filtering:
            return delta
        progress = j / max(self.traj.steps - 1, 1)
        return schedule.filter_delta(delta, self.traj.grid, progress, **self.filtering)

    def deltas(self, j, p, q):
        """``(D1, D2)`` as the executor holds them at a reuse step after ``j`` (None where unused)."""
        key = (j, p, q)
        if key not in self._deltas:
            r = self.traj.residuals
            d1 = d2 = None
            if self.order >= 1 and p is not None:
                d1 = r[j] - r[p]
                if self.order >= 2 and q is not None:
                    d2 = self._filtered(d1 - (r[p] - r[q]), j)
                d1 = self._filtered(d1, j)
            self._deltas[key] = (d1, d2)
        return self._deltas[key]

    def gammas(self, t, j, p, q) -> tuple[float, float]:
        key = (t, j, p, q)
        if key not in self._gammas:
            d1, d2 = self.deltas(j, p, q)
            g = (0.0, 0.0)
            if d1 is not None:
                r = self.traj.residuals
                # fit_gamma2 on (target, R_j, R_j - D1, R_j - 2 D1 + D2) reproduces D1, D2 exactly
                r_p = r[j] - d1
                r_q = None if d2 is None else r_p - d1 + d2
                g = tuple(float(v) for v in schedule.fit_gamma2(r[t], r[j], r_p, r_q))
            self._gammas[key] = g
        return self._gammas[key]

    def estimate(self, t, j, p, q) -> torch.Tensor:
        """``R̂_t = R_j + γ1 D1 + γ2 D2``."""
        d1, d2 = self.deltas(j, p, q)
        g1, g2 = self.gammas(t, j, p, q)
        est = self.traj.residuals[j]
        if d1 is not None and g1:
            est = est + g1 * d1
        if d2 is not None and g2:
            est = est + g2 * d2
        return est

    @torch.no_grad()
    def error(self, t, j, p, q) -> float:
        key = (t, j, p, q)
        if key not in self._errors:
            tr = self.traj
            x_hat = tr.finish(t, tr.latents[t], tr.inputs[t] + self.estimate(t, j, p, q), tr.conds[t])
            diff = (x_hat - tr.latents[t + 1]).double()
            self._errors[key] = float(diff.square().sum().div(diff.shape[0]).sqrt())
        return self._errors[key]


def _history(compute: list[bool]) -> list[tuple]:
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


def step_costs(traj: Trajectory, compute: list[bool], corrector: Corrector) -> list[float]:
    """The injected error of each reuse step of ``compute`` (0 at computed steps)."""
    return [0.0 if src is None else corrector.error(t, *src) for t, src in enumerate(_history(compute))]


def build_plan(traj: Trajectory, *, blocks: int, compute_fraction: float, warmup: int, tail: int,
               max_consecutive: int, order: int, selection: str, pca: bool = False,
               filtering: bool = False, granularity: str = "step", meta: dict | None = None) -> CachePlan:
    """The static plan of a calibrated trajectory (see the module docstring)."""
    steps = traj.steps
    budget = schedule.budget_for_compute_fraction(steps, compute_fraction)
    filt = dict(FILTER_DEFAULTS) if filtering else None
    corrector = Corrector(traj, order, filt)
    if selection == "error":
        reuse = schedule.plan_reuse_steps_in_context(
            corrector.error, steps, budget, warmup=warmup, tail=tail, max_consecutive=max_consecutive)
    elif selection == "curvature":
        fn = schedule.curvature_pca3 if pca else schedule.curvature
        reuse = schedule.plan_reuse_steps(fn(traj.latents), budget, warmup=warmup, tail=tail,
                                          max_consecutive=max_consecutive)
    else:
        raise ValueError(f"selection must be 'curvature' or 'error', got {selection!r}")
    compute = schedule.compute_schedule(steps, reuse)
    gamma, gamma2 = [0.0] * steps, [0.0] * steps
    for t, src in enumerate(_history(compute)):
        if src is not None:
            gamma[t], gamma2[t] = corrector.gammas(t, *src)
    costs = step_costs(traj, compute, corrector)
    rows = [[[c, c] for _ in range(blocks)] for c in compute]
    info = dict(policy="OmniCache", selection=selection, order=order, pca=pca, filtering=filtering,
                compute_fraction=compute_fraction, warmup=warmup, tail=tail,
                max_consecutive=max_consecutive, reuse_error=[round(c, 8) for c in costs])
    if filt:
        info["filter"] = dict(filt, grid=list(traj.grid))
    info.update(meta or {})
    return CachePlan(steps=steps, blocks=blocks, granularity=granularity, compute=rows,
                     gamma=gamma, gamma2=gamma2, meta=info)
