"""FORA (Selvaraju et al., 2024): reuse attention and MLP outputs between periodic refreshes.

Step ``i`` computes every branch when ``i < warmup`` or ``(i - warmup) % interval == 0``;
every other step reuses each block's cached pre-gate attention and MLP outputs with the
current step's adaLN gate: ``h += gate_t * F``. Static plan, branch level by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..plan import CachePlan
from .common import PolicyConfig, check_granularity, check_int, describe, refresh_steps

__all__ = ["FORAConfig"]


@dataclass(frozen=True)
class FORAConfig(PolicyConfig):
    """``interval``: refresh period N (N = 1 is uncached); ``warmup``: first steps always computed."""

    interval: int = 3
    warmup: int = 0
    granularity: str = "branch"
    kind: ClassVar[str] = "static"

    def __post_init__(self):
        check_int(self, "interval", 1)
        check_int(self, "warmup", 0)
        check_granularity(self, None)

    def plan(self, steps: int, blocks: int, granularity: str | None = None) -> CachePlan:
        g = check_granularity(self, granularity)
        compute = [[[full, full]] * blocks for full in refresh_steps(steps, self.interval, self.warmup)]
        return CachePlan(steps, blocks, g, compute, meta=describe(self))
