"""NoCache: the reference; every step computes every block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..plan import CachePlan
from .common import PolicyConfig, check_granularity, describe

__all__ = ["NoCacheConfig"]


@dataclass(frozen=True)
class NoCacheConfig(PolicyConfig):
    """Uncached sampling (a plan of all ``True``; nothing is stored)."""

    granularity: str = "step"
    kind: ClassVar[str] = "static"

    def __post_init__(self):
        check_granularity(self, None)

    def plan(self, steps: int, blocks: int, granularity: str | None = None) -> CachePlan:
        return CachePlan.full(steps, blocks, check_granularity(self, granularity), meta=describe(self))
