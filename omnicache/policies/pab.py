"""PAB, Pyramid Attention Broadcast (Zhao, Jin, Wang, You; 2024), and T-GATE (Zhang et al.,
2024): static plans over *named* branches (:mod:`omnicache.plan`).

**PAB.** Attention outputs change little in the middle of sampling, least for
cross-attention, then temporal, then spatial attention. Inside a window of the trajectory
each attention kind is computed every ``range`` steps and its output broadcast (reused) in
between, with ranges forming a pyramid: spatial < temporal < cross. ``slow()`` and
``fast()`` are the paper's two operating points as we read them (ranges 2/4/6 and 3/5/7;
windows ``t/T`` in [0.1, 0.8] for spatial and temporal, [0.1, 0.9] for cross attention, as
PAB's published configuration for Latte). The MLP is computed every step unless
``mlp_range > 1``.

**T-GATE.** Cross-attention converges early ("semantics-planning" phase): from the gate
step on, each row's cached cross-attention output is reused for the rest of sampling.
Before the gate, after ``warmup`` steps, self-attention may be computed every
``self_interval`` steps only (T-GATE's partial self-attention caching; 1 = off). The
original also averages the two CFG halves of the cached cross-attention and drops CFG
after the gate; that changes the pipeline's own call, which a plan does not do: here every
row keeps its own cache and CFG runs unchanged.

Windows are on the step's position ``t/T ~= 1 - i/steps`` (the plan knows the step count,
not the scheduler's timesteps). On a model without a named branch (our DiT has no
cross- or temporal attention) that entry has nothing to act on
(:meth:`~omnicache.plan.CachePlan.for_branches`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..plan import CachePlan
from .common import PolicyConfig, check_granularity, check_int, check_number, describe

__all__ = ["PABConfig", "TGATEConfig", "NAMED_BRANCHES"]

NAMED_BRANCHES = ("self_attn", "cross_attn", "temporal_attn", "mlp")


def _window(config, name):
    value = getattr(config, name)
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
          and 0.0 <= value[0] <= value[1] <= 1.0)
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name} must be (lo, hi) with 0 <= lo <= hi <= 1 "
                         f"(a range of t/T), got {value!r}")


def broadcast_steps(steps: int, every: int, window) -> list[bool]:
    """Per step: compute (True) or broadcast. Inside ``window`` (``t/T = 1 - i/steps`` in
    [lo, hi]) the first step computes and then every ``every``-th; outside, every step."""
    lo, hi = window
    eps = 1e-9  # t/T = 1 - i/steps in floating point
    inside = [lo - eps <= 1.0 - i / steps <= hi + eps for i in range(steps)]
    out, first = [], None
    for i, w in enumerate(inside):
        if not w or i == 0:
            out.append(True)
            first = None
            continue
        first = i if first is None else first
        out.append((i - first) % every == 0)
    return out


@dataclass(frozen=True)
class PABConfig(PolicyConfig):
    """``spatial_range`` / ``temporal_range`` / ``cross_range`` / ``mlp_range``: broadcast
    ranges (1 = computed every step); ``*_window``: where broadcasting applies, as
    ``(lo, hi)`` of ``t/T``."""

    spatial_range: int = 2
    temporal_range: int = 4
    cross_range: int = 6
    mlp_range: int = 1
    spatial_window: tuple = (0.1, 0.8)
    temporal_window: tuple = (0.1, 0.8)
    cross_window: tuple = (0.1, 0.9)
    mlp_window: tuple = (0.1, 0.8)
    granularity: str = "branch"
    kind: ClassVar[str] = "static"
    branches: ClassVar[tuple] = NAMED_BRANCHES

    def __post_init__(self):
        for name in ("spatial_range", "temporal_range", "cross_range", "mlp_range"):
            check_int(self, name, 1)
        for name in ("spatial_window", "temporal_window", "cross_window", "mlp_window"):
            _window(self, name)
        check_granularity(self, None, ("branch",))

    @classmethod
    def slow(cls) -> PABConfig:
        return cls(2, 4, 6)

    @classmethod
    def fast(cls) -> PABConfig:
        return cls(3, 5, 7)

    def scaled(self, factor: float) -> PABConfig:
        """The same pyramid with every range ``round(range * factor)`` (>= 1): the knob a
        compute target is tuned with."""
        def r(v):
            return max(1, round(v * factor))
        return PABConfig(r(self.spatial_range), r(self.temporal_range), r(self.cross_range),
                         self.mlp_range if self.mlp_range == 1 else r(self.mlp_range),
                         self.spatial_window, self.temporal_window, self.cross_window, self.mlp_window)

    def plan(self, steps: int, blocks: int, granularity: str | None = None) -> CachePlan:
        g = check_granularity(self, granularity, ("branch",))
        cols = [broadcast_steps(steps, self.spatial_range, self.spatial_window),
                broadcast_steps(steps, self.cross_range, self.cross_window),
                broadcast_steps(steps, self.temporal_range, self.temporal_window),
                broadcast_steps(steps, self.mlp_range, self.mlp_window)]
        compute = [[[c[i] for c in cols] for _ in range(blocks)] for i in range(steps)]
        return CachePlan(steps, blocks, g, compute, meta=describe(self), branches=list(NAMED_BRANCHES))


@dataclass(frozen=True)
class TGATEConfig(PolicyConfig):
    """``gate``: the fraction of the steps after which cross-attention is cached for good
    (its value at step ``round(gate * steps)`` is the last computed); ``self_interval``:
    before the gate and after ``warmup`` steps, self-attention (spatial and temporal) is
    computed every ``self_interval`` steps (1 = every step)."""

    gate: float = 0.6
    self_interval: int = 1
    warmup: int = 2
    granularity: str = "branch"
    kind: ClassVar[str] = "static"
    branches: ClassVar[tuple] = NAMED_BRANCHES

    def __post_init__(self):
        check_number(self, "gate", 0.0, 1.0)
        check_int(self, "self_interval", 1)
        check_int(self, "warmup", 0)
        check_granularity(self, None, ("branch",))

    def plan(self, steps: int, blocks: int, granularity: str | None = None) -> CachePlan:
        g = check_granularity(self, granularity, ("branch",))
        gate = min(max(1, round(self.gate * steps)), steps)  # the first step that reuses cross-attention
        compute = []
        for i in range(steps):
            cross = i < gate
            selfa = i >= gate or i < self.warmup or (i - self.warmup) % self.self_interval == 0
            compute.append([[selfa, cross, selfa, True] for _ in range(blocks)])
        return CachePlan(steps, blocks, g, compute, meta=describe(self), branches=list(NAMED_BRANCHES))
