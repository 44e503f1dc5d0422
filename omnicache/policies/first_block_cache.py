"""First-Block Cache (ParaAttention / cache-dit "FBCache", DBCache with Fn front blocks).

Every step computes the first ``Fn = first_blocks`` blocks. Their residual
``r_i = h_Fn - h_0`` is compared, per sample (cond and uncond rows summed), with the
same residual at the sample's last computed step ``j``:

    rel = Σ|r_i - r_j| / Σ|r_j|;   rel < threshold -> reuse, else compute

Reuse adds the cached residual of the remaining blocks ``Fn..depth-1`` (one residual,
``apply_residual_``); compute runs them and stores their residual (``store_residual_``)
and makes ``r_i`` the new reference. Comparing with the last *computed* step (not the
previous step) keeps slow drift from going unseen. The first ``warmup`` steps compute.

``mode="device"`` (or ``"device-where"``, see :func:`.common.check_mode`): the same rule on device tensors (:meth:`FirstBlockCacheDecider.decide_device`,
through :class:`omnicache.cache.DeviceDecisions`): no host sync per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .common import check_granularity, check_int, check_mode, check_number

__all__ = ["FirstBlockCacheConfig"]


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """``threshold``: relative-L1 change of the first blocks' residual below which the rest
    is reused; ``first_blocks``: Fn blocks always computed; ``warmup``: first steps computed;
    ``mode``: ``"host"`` (one sync per step) or ``"device"`` (no sync; see the module docstring)."""

    threshold: float = 0.08
    first_blocks: int = 1
    warmup: int = 1
    granularity: str = "step"
    mode: str = "host"
    kind: ClassVar[str] = "dynamic"

    def __post_init__(self):
        check_number(self, "threshold", 0.0)
        check_int(self, "first_blocks", 1)
        check_int(self, "warmup", 1)
        check_granularity(self, None, ("step",))
        check_mode(self)

    def decider(self, steps: int, blocks: int, granularity: str | None = None) -> FirstBlockCacheDecider:
        check_granularity(self, granularity, ("step",))
        if self.first_blocks >= blocks:
            raise ValueError(f"FirstBlockCacheConfig.first_blocks must be < the model's {blocks} blocks, "
                             f"got {self.first_blocks}")
        return FirstBlockCacheDecider(self)


class FirstBlockCacheDecider:
    """See the module docstring."""

    ref_every_step = False  # the reference is the residual at the last computed step

    def __init__(self, config: FirstBlockCacheConfig):
        self.config, self.first_blocks, self.batch = config, config.first_blocks, 0
        self.mode = config.mode

    def start(self, batch: int) -> None:
        self.batch = batch

    def signal(self, model, h0, h, c):
        return h - h0

    def signal_flops(self, flops: dict, config) -> float:
        return 0.0

    def decide(self, i: int, rel: list | None) -> list[bool]:
        if rel is None or i < self.config.warmup:
            return [True] * self.batch
        return [r >= self.config.threshold for r in rel]

    def record(self) -> dict:
        return {}

    # ------------------------------------------------ mode="device" (omnicache.cache.DeviceDecisions)
    def device_state(self, samples: int, device) -> dict:
        return {}

    def device_forced(self, step: torch.Tensor) -> torch.Tensor:
        return step < self.config.warmup

    def decide_device(self, rel: torch.Tensor, forced: torch.Tensor, state: dict) -> torch.Tensor:
        """:meth:`decide` on device tensors (``rel`` compared in float64, as the host's floats)."""
        return forced | (rel.to(torch.float64) >= self.config.threshold)
