"""Δ-DiT (Chen et al., 2024): Δ-Cache of a block group, rear blocks early, front blocks late.

Early steps shape the outline, which the front blocks carry, so the rear blocks (details)
are reused there; late steps refine details, so the front blocks are reused instead.
With ``g = group_size`` blocks and ``b = round(boundary * steps)``, step ``i`` computes
everything when ``i < warmup`` or ``(i - warmup) % interval == 0``; otherwise it reuses
the residuals of blocks ``[depth - g, depth)`` if ``i < b``, else of blocks ``[0, g)``::

    h_out = h_in + Σ_{b in group} R_b        (R_b = cached residual of block b)

which is the group's cached deviation ``Δ = out - in`` (the per-block residuals
telescope). Static plan, block level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..plan import CachePlan
from .common import PolicyConfig, check_granularity, check_int, check_number, describe, refresh_steps

__all__ = ["DeltaDiTConfig"]


@dataclass(frozen=True)
class DeltaDiTConfig(PolicyConfig):
    """``interval``: refresh period; ``group_size``: cached blocks (None = half the depth);
    ``boundary``: fraction of the steps that reuse the rear group before switching to the
    front group; ``warmup``: first steps always computed."""

    interval: int = 2
    group_size: int | None = None
    boundary: float = 0.5
    warmup: int = 1
    granularity: str = "block"
    kind: ClassVar[str] = "static"

    def __post_init__(self):
        check_int(self, "interval", 1)
        if self.group_size is not None:
            check_int(self, "group_size", 1)
        check_number(self, "boundary", 0.0, 1.0)
        check_int(self, "warmup", 0)
        check_granularity(self, None, ("block", "branch"))

    def plan(self, steps: int, blocks: int, granularity: str | None = None) -> CachePlan:
        g = check_granularity(self, granularity, ("block", "branch"))
        size = blocks // 2 if self.group_size is None else self.group_size
        if not 1 <= size <= blocks:
            raise ValueError(f"DeltaDiTConfig.group_size must be in [1, {blocks}] for a {blocks}-block "
                             f"model, got {size}")
        switch = round(self.boundary * steps)
        rear, front = range(blocks - size, blocks), range(size)
        compute = []
        for i, full in enumerate(refresh_steps(steps, self.interval, self.warmup)):
            reused = () if full else rear if i < switch else front
            compute.append([[b not in reused] * 2 for b in range(blocks)])
        return CachePlan(steps, blocks, g, compute, meta=describe(self))
