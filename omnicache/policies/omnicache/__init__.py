"""OmniCache: reuse placed by the sampling trajectory's geometry, plus cache-noise correction.

Calibrated on the model, through any engine (:class:`omnicache.cache.Engine`): a
calibration run (:mod:`.calibrate`) costs every possible reuse by the error it injects
under the chosen correction, the exact DP picks the reuse steps, and ``(γ1, γ2)`` are
fitted closed-loop on the cached run (:mod:`.correction`); the result is a
:class:`~omnicache.plan.CachePlan` replayed with zero host syncs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ...plan import CachePlan
from ..common import PolicyConfig, check_granularity, check_int, check_number

@dataclass(frozen=True)
class OmniCacheConfig(PolicyConfig):
    """Args:
        compute_fraction: share of the uncached steps to compute (the rest are reused).
        warmup, tail: first / last steps always computed.
        max_consecutive: most reuse steps in a row.
        correction: correct the reused residual for the cache noise (else plain reuse).
        order: the correction's order: 1 adds ``γ1 D1`` (``D1 = R_j - R_p``), 2 also
            ``γ2 D2`` (``D2`` the second difference); ``(γ1, γ2)`` fitted jointly.
        filtering: filter the drifts ``D1``, ``D2`` over the token grid once per full step
            (low-pass early, high-pass late) before the correction uses them.
        selection: the DP's cost: ``"error"`` (the error a reuse injects under the chosen
            correction, in its schedule context) or ``"curvature"`` (trajectory turning
            angle); ``"uniform"`` spreads the reuse steps evenly instead (an ablation).
        fit: ``"closed"`` fits γ on the cached calibration run, step by step, so that each
            reuse step also removes the noise earlier ones left; ``"open"`` fits each step
            on the uncached residuals alone (an ablation; no filtering).
        pca: with ``selection="curvature"``, measure the angle in the top-3 PCA space.
        search: also run the DP under tighter constraints (shorter runs, a longer tail)
            and keep the schedule whose replay on a held-out half of the calibration
            batch ends closest to uncached (where the engine replays its inputs separately;
            a diffusers pipeline call is one unit: no search there).
        granularity: ``"step"`` (one residual for the block stack) or ``"block"``.
        calibration_samples, calibration_seed: the calibration batch, where the engine
            chooses its inputs (our runtime: classes in turn).
        plan_path: a saved plan to use instead of calibrating.
    """

    compute_fraction: float = 0.5
    warmup: int = 2
    tail: int = 1
    max_consecutive: int = 4
    correction: bool = True
    order: int = 2
    filtering: bool = False
    selection: str = "error"
    pca: bool = False
    search: bool = True
    fit: str = "closed"
    granularity: str = "step"
    calibration_samples: int = 20
    calibration_seed: int = 1234
    plan_path: str | None = None
    kind: ClassVar[str] = "calibrated"

    def __post_init__(self):
        check_number(self, "compute_fraction", 1e-9, 1.0)
        check_int(self, "warmup", 1)
        check_int(self, "tail", 0)
        check_int(self, "max_consecutive", 1)
        check_int(self, "calibration_samples", 1)
        check_int(self, "calibration_seed", 0)
        if type(self.order) is not int or self.order not in (1, 2):  # not 1.0 or True
            raise ValueError(f"OmniCacheConfig.order must be 1 or 2, got {self.order!r}")
        for name in ("correction", "filtering", "pca", "search"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"OmniCacheConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.filtering and not self.correction:
            raise ValueError("OmniCacheConfig.filtering filters the correction's drifts: it needs correction=True")
        check_granularity(self, None, allowed=("step", "block"))
        if self.selection not in ("error", "curvature", "uniform"):
            raise ValueError(f"OmniCacheConfig.selection must be 'error', 'curvature' or 'uniform', "
                             f"got {self.selection!r}")
        if self.fit not in ("closed", "open"):
            raise ValueError(f"OmniCacheConfig.fit must be 'closed' or 'open', got {self.fit!r}")
        if self.fit == "open" and self.filtering:
            raise ValueError("OmniCacheConfig.fit='open' fits unfiltered residuals: it cannot be combined "
                             "with filtering=True")
        if self.search and self.calibration_samples < 2:
            raise ValueError("OmniCacheConfig.calibration_samples must be >= 2 with search=True "
                             "(half the batch fits, half scores)")
        if self.plan_path is not None and not isinstance(self.plan_path, str):
            raise ValueError(f"OmniCacheConfig.plan_path must be a path string or None, got {self.plan_path!r}")

    def plan(self, steps: int, blocks: int, granularity: str | None = None) -> CachePlan:
        """The saved plan (``plan_path``); without one, use :meth:`calibrate`."""
        if self.plan_path is None:
            raise ValueError("OmniCacheConfig.plan_path is None: calibrate on a model first "
                             "(config.calibrate(engine); generate() and the executor do this themselves)")
        plan = CachePlan.load(self.plan_path)
        if plan.steps != steps or plan.blocks != blocks:
            raise ValueError(f"OmniCacheConfig.plan_path: plan is for {plan.steps} steps x {plan.blocks} "
                             f"blocks, the run has {steps} x {blocks}")
        return plan

    def calibrate(self, engine, *, granularity: str | None = None) -> CachePlan:
        """Calibrate on ``engine``'s model (:class:`omnicache.cache.Engine`; its calibration batch:
        ``calibration_samples`` inputs, noise ``calibration_seed``, where the engine chooses its
        inputs) and return the plan: a value the caller holds and reuses (nothing is memoised
        here). With ``plan_path``, the saved plan."""
        from .calibrate import build_plan

        if self.plan_path is not None:
            return self.plan(engine.steps, engine.blocks)
        g = check_granularity(self, granularity, allowed=("step", "block"))
        engine = engine.with_inputs(self.calibration_samples, self.calibration_seed)
        plan = build_plan(engine, compute_fraction=self.compute_fraction, warmup=self.warmup, tail=self.tail,
                          max_consecutive=self.max_consecutive, order=self.order if self.correction else 0,
                          selection=self.selection, pca=self.pca, filtering=self.filtering, search=self.search,
                          fit=self.fit, granularity=g)
        plan.meta["config"] = dataclasses.asdict(dataclasses.replace(self, search=plan.meta["search"]))
        return plan
