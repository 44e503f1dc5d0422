"""MagCache (Ma et al., 2025): skip steps while the residual's magnitude ratio stays near 1.

The magnitude ratio of step ``t`` is ``γ_t = mean over tokens of ‖r_t‖ / ‖r_{t-1}‖``, ``r``
the block stack's residual (output minus input of the blocks), ``γ_0 = 1``. It is a
property of the model and the sampler, nearly the same for any input, so it is measured
once on an uncached run (:func:`fit_magcache`, through any engine) and stored in the
config. The rule, from step ``round(retention_ratio * steps)`` on:

    ratio *= γ_t;  n += 1;  err += |1 - ratio|
    skip step t if something is cached, err <= threshold and n <= max_skip_steps;
    otherwise compute it and reset ratio = 1, n = 0, err = 0

A skipped step returns its input plus the last computed residual. The decisions depend
on the ratios alone, never on the current step's tensors, so the whole schedule is known
before sampling: MagCache here is a static step plan (no host sync, one graph per step
pattern under ``torch.compile``). Ratios measured at another number of steps are
resampled to this one by nearest index, as the reference implementation does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..plan import CachePlan
from .common import PolicyConfig, check_granularity, check_int, check_number, describe

__all__ = ["MagCacheConfig", "magcache_schedule", "token_norms", "mag_ratios_from_norms", "mag_ratios_from_residuals",
           "fit_magcache"]


@dataclass(frozen=True)
class MagCacheConfig(PolicyConfig):
    """``threshold``: accumulated error below which a step is skipped; ``max_skip_steps``: most
    skipped steps in a row (K); ``retention_ratio``: leading fraction of the steps always
    computed; ``mag_ratios``: the model's per-step magnitude ratios (calibrate to get them)."""

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: tuple | None = None
    granularity: str = "step"
    kind: ClassVar[str] = "static"

    def __post_init__(self):
        check_number(self, "threshold", 0.0)
        check_int(self, "max_skip_steps", 0)
        check_number(self, "retention_ratio", 0.0, 1.0)
        check_granularity(self, None, ("step",))
        if self.mag_ratios is not None:
            try:
                ratios = tuple(float(r) for r in self.mag_ratios)
            except (TypeError, ValueError):
                raise ValueError(f"MagCacheConfig.mag_ratios must be a sequence of numbers, "
                                 f"got {self.mag_ratios!r}") from None
            if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
                raise ValueError(f"MagCacheConfig.mag_ratios must be positive finite numbers, got {ratios!r}")
            object.__setattr__(self, "mag_ratios", ratios)

    def plan(self, steps: int, blocks: int, granularity: str | None = None) -> CachePlan:
        g = check_granularity(self, granularity, ("step",))
        if self.mag_ratios is None:
            raise ValueError("MagCacheConfig.mag_ratios is None: measure them on the model first "
                             "(config.calibrate(engine), e.g. omnicache.integrations.diffusers.calibrate(pipe, config, "
                             "...) or config.calibrate(omnicache.runtime.RuntimeEngine(model, labels, steps=...)))")
        compute = magcache_schedule(self.mag_ratios, steps, self.threshold, self.max_skip_steps,
                                    self.retention_ratio)
        return CachePlan(steps, blocks, g, [[[c, c]] * blocks for c in compute], meta=describe(self))

    def calibrate(self, engine) -> MagCacheConfig:
        """This config with the magnitude ratios of ``engine``'s model (:func:`fit_magcache`)."""
        return fit_magcache(engine, self)


def _resample(ratios, steps: int) -> list[float]:
    """``ratios`` at ``steps`` values: nearest index, ``round(i * (n - 1) / (steps - 1))`` in
    float32 with ties to even (the reference implementation's ``nearest_interp``)."""
    n = len(ratios)
    if n == steps:
        return list(ratios)
    if steps == 1:
        return [ratios[-1]]
    grid = torch.arange(steps, dtype=torch.float32) * ((n - 1) / (steps - 1))
    return [ratios[int(i)] for i in torch.round(grid).long()]


def magcache_schedule(ratios, steps: int, threshold: float, max_skip_steps: int,
                      retention_ratio: float) -> list[bool]:
    """Per step: computed (True) or skipped, by MagCache's rule (module docstring)."""
    gammas = _resample(list(ratios), steps)
    retention = int(retention_ratio * steps + 0.5)
    out, ratio, n, err, cached = [], 1.0, 0, 0.0, False
    for t in range(steps):
        compute = True
        if t >= retention:
            ratio *= gammas[t]
            n += 1
            err += abs(1.0 - ratio)
            if cached and err <= threshold and n <= max_skip_steps:
                compute = False
            else:
                ratio, n, err = 1.0, 0, 0.0
        cached = cached or compute
        out.append(compute)
    return out


def token_norms(residual) -> torch.Tensor:
    """The norms of a residual's token vectors (last dim), flattened, in float64; a list of
    tensors (cache contexts, streams) gives all their tokens, one after the other."""
    parts = residual if isinstance(residual, (list, tuple)) else [residual]
    return torch.cat([torch.linalg.vector_norm(p.double(), dim=-1).flatten() for p in parts])


def mag_ratios_from_norms(norms) -> tuple:
    """``γ_t`` = mean of ``norms[t] / (norms[t-1] + 1e-8)`` (per token), ``γ_0 = 1``."""
    out = [1.0]
    for prev, cur in zip(norms, norms[1:]):
        if cur.shape != prev.shape:
            raise ValueError("mag_ratios: the residuals change shape between steps")
        out.append(float((cur / (prev + 1e-8)).mean()))
    return tuple(out)


def mag_ratios_from_residuals(residuals) -> tuple:
    """``γ_t`` from a sequence of per-step residuals ``[..., D]`` (token vectors on the last
    dim; a step may be a list of tensors, see :func:`token_norms`)."""
    return mag_ratios_from_norms([token_norms(r) for r in residuals])


@torch.no_grad()
def fit_magcache(engine, config: MagCacheConfig) -> MagCacheConfig:
    """``config`` with the magnitude ratios of ``engine``'s model, from one uncached run
    (:meth:`omnicache.cache.Engine.record`): ``γ_t`` the mean over tokens of
    ``‖r_t‖ / ‖r_{t-1}‖``, ``r`` the ``hidden_states`` residual of the block stack (each
    block's, on models whose token layout changes between blocks), every cache context's
    tokens pooled."""
    rec = engine.record()
    if rec.steps < 2:
        raise ValueError(f"fit_magcache: the run made {rec.steps} step(s); ratios need at least 2")
    return dataclasses.replace(config, mag_ratios=mag_ratios_from_residuals(
        [rec.stream(t, "hidden_states") for t in range(rec.steps)]))
