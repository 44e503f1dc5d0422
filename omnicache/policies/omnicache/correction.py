"""OmniCache's cache-noise correction on any plan and any engine: closed-loop γ.

The plan is replayed through the engine (:meth:`omnicache.cache.Engine.replay` with a fit
hook). At each step that reuses a unit, for the terms the reused units can form (``D1``
needs two computed values of every reused unit, ``D2`` three), the engine offers the
step's outcome at ``γ = 0``, its change per unit coefficient and the uncached outcome;
:class:`LeastSquares` returns ``γ = argmin ‖base + Σ_k γ_k d_k - target‖²`` (pooled over
every probe the engine offers that step: contexts, units, streams) and the replay goes on
with it, so each step's γ also removes the noise earlier reuse steps left in the run. The
outcome is the next latent where the engine has a sampler step (our runtime; a diffusers
pipeline), else the reused unit's residual.
"""

from __future__ import annotations

import dataclasses

import torch

from ...plan import CachePlan

__all__ = ["LeastSquares", "usable_terms", "fit_gammas", "fit_correction"]


class LeastSquares:
    """The fit hook (:class:`omnicache.cache.engine.FitHook`): per step, the least-squares
    coefficients over every probe offered so far that step; ``solution[t]`` the last."""

    def __init__(self):
        self.systems, self.solution = {}, {}

    def reset(self) -> None:
        """Forget every probe (the engine replays the run again)."""
        self.systems, self.solution = {}, {}

    def __call__(self, t: int, base: torch.Tensor, directions: list, target: torch.Tensor) -> list:
        J = torch.stack([d.double().flatten() for d in directions], 1)
        r = (target.double() - base.double()).flatten()
        parts = self.systems.setdefault(t, [])
        parts.append((J, r))
        if len(parts) > 1:
            J, r = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        g = torch.linalg.lstsq(J, r[:, None]).solution[:, 0].tolist()
        self.solution[t] = g
        return g


def usable_terms(plan: CachePlan, order: int) -> list[int]:
    """Per step: how many coefficients (0, 1, 2; at most ``order``) every unit the step reuses
    supports: ``D1`` needs two computed values of the unit before the step, ``D2`` three."""
    comp = plan.compute_tensor().long()
    counts = torch.cumsum(comp, 0) - comp  # computed values before each step, per unit
    return [0 if bool(comp[t].all()) else min(int(counts[t][comp[t] == 0].min()) - 1, order)
            for t in range(plan.steps)]


@torch.no_grad()
def fit_gammas(engine, plan: CachePlan, order: int = 2, samples: slice | None = None):
    """``(gamma, gamma2, how)``: the closed-loop coefficients of ``plan`` (any granularity) on
    ``engine`` (``samples`` of its inputs), and what they were fitted against."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if plan.steps != engine.steps:
        raise ValueError(f"CachePlan.steps: plan has {plan.steps} steps, the calibration run {engine.steps}")
    usable = usable_terms(plan, order)
    work = dataclasses.replace(plan, gamma=[1.0 if u >= 1 else 0.0 for u in usable],
                               gamma2=[1.0 if u >= 2 else 0.0 for u in usable])
    fit = LeastSquares()
    replay = engine.replay(work, samples=samples, fit=fit)
    gamma, gamma2 = [0.0] * plan.steps, [0.0] * plan.steps
    for t, g in fit.solution.items():
        gamma[t] = g[0] if usable[t] >= 1 else 0.0
        gamma2[t] = g[1] if usable[t] >= 2 and len(g) > 1 else 0.0
    return gamma, gamma2, f"closed loop, {replay.fitted}"


def fit_correction(engine, plan: CachePlan, order: int = 2) -> CachePlan:
    """OmniCache's cache-noise correction on any ``plan`` (a Learning-to-Cache plan, a FORA
    plan, one of your own) on ``engine``'s model: the plan with per-step ``(gamma, gamma2)``
    fitted closed-loop from one recording run and one replay; its ``meta`` says so."""
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan must be a CachePlan, got {type(plan).__name__}")
    gamma, gamma2, how = fit_gammas(engine, plan, order)
    policy = str(plan.meta.get("policy", "CachePlan"))
    meta = {**plan.meta, **engine.meta(), "correction": f"closed-loop gamma (order {order})", "gamma_fit": how,
            "policy": policy if policy.endswith("+gamma") else policy + "+gamma"}
    return dataclasses.replace(plan, gamma=gamma, gamma2=gamma2, meta=meta)
