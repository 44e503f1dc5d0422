"""First-Block Cache (ParaAttention / cache-dit "FBCache") and DBCache (cache-dit's "dual
block cache": Fn front blocks, Bn back blocks, a cap on consecutive cached steps).

Every step computes the first ``Fn = first_blocks`` blocks and the last ``Bn =
last_blocks`` blocks (0 for First-Block Cache). Their residual
``r_i = h_Fn - h_0`` is compared, per sample (cond and uncond rows summed), with the
same residual at the sample's last computed step ``j``:

    rel = Σ|r_i - r_j| / Σ|r_j|;   rel < threshold -> reuse, else compute

Reuse adds the cached residual of the middle blocks ``Fn..depth-Bn-1`` (one residual,
``apply_residual_``); compute runs them and stores their residual (``store_residual_``)
and makes ``r_i`` the new reference; the back blocks then run on the result either way,
so they refine a reused state with the current step's conditioning. Comparing with the
last *computed* step (not the previous step) keeps slow drift from going unseen. The
first ``warmup`` steps compute, and with ``max_consecutive = M`` a sample that reused
its last ``M`` steps computes (cache-dit's ``max_continuous_cached_steps``).

``mode="device"`` (or ``"device-where"``, see :func:`.common.check_mode`): the same rule on device tensors (:meth:`FirstBlockCacheDecider.decide_device`,
through :class:`omnicache.cache.DeviceDecisions`): no host sync per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .common import PolicyConfig, check_granularity, check_int, check_mode, check_number

__all__ = ["FirstBlockCacheConfig"]


@dataclass(frozen=True)
class FirstBlockCacheConfig(PolicyConfig):
    """``threshold``: relative-L1 change of the first blocks' residual below which the rest
    is reused; ``first_blocks``: Fn blocks always computed; ``warmup``: first steps computed;
    ``mode``: ``"host"`` (one sync per step) or ``"device"`` (no sync; see the module docstring);
    ``last_blocks``: Bn blocks at the end always computed (DBCache; 0: none);
    ``max_consecutive``: most cached steps in a row per sample (None: no limit)."""

    threshold: float = 0.08
    first_blocks: int = 1
    warmup: int = 1
    granularity: str = "step"
    mode: str = "host"
    last_blocks: int = 0
    max_consecutive: int | None = None
    kind: ClassVar[str] = "dynamic"

    def __post_init__(self):
        check_number(self, "threshold", 0.0)
        check_int(self, "first_blocks", 1)
        check_int(self, "warmup", 1)
        check_int(self, "last_blocks", 0)
        if self.max_consecutive is not None:
            check_int(self, "max_consecutive", 1)
        check_granularity(self, None, ("step",))
        check_mode(self)

    def decider(self, steps: int, blocks: int, granularity: str | None = None) -> FirstBlockCacheDecider:
        check_granularity(self, granularity, ("step",))
        if self.last_blocks == 0 and self.first_blocks >= blocks:
            raise ValueError(f"FirstBlockCacheConfig.first_blocks must be < the model's {blocks} blocks, "
                             f"got {self.first_blocks}")
        if self.first_blocks + self.last_blocks >= blocks:
            raise ValueError(f"FirstBlockCacheConfig.first_blocks + last_blocks must be < the model's {blocks} "
                             f"blocks, got {self.first_blocks} + {self.last_blocks}")
        return FirstBlockCacheDecider(self)


class FirstBlockCacheDecider:
    """See the module docstring. Declares its signal (``omnicache.cache.decisions``): the
    first blocks' residual, compared with the last computed step's."""

    signal = "residual"
    ref_every_step = False  # the reference is the residual at the last computed step
    motion = False

    def __init__(self, config: FirstBlockCacheConfig):
        self.config, self.first_blocks, self.last_blocks, self.batch = config, config.first_blocks, \
            config.last_blocks, 0
        self.mode = config.mode
        self.cached_run = []  # per sample: steps reused in a row

    def start(self, batch: int) -> None:
        self.batch = batch
        self.cached_run = [0] * batch

    def decide(self, i: int, rel: list | None) -> list[bool]:
        if len(self.cached_run) != self.batch:
            self.cached_run = [0] * self.batch
        if rel is None or i < self.config.warmup:
            out = [True] * self.batch
        else:
            cap = self.config.max_consecutive
            out = [r >= self.config.threshold or (cap is not None and n >= cap)
                   for r, n in zip(rel, self.cached_run)]
        self.cached_run = [0 if c else n + 1 for c, n in zip(out, self.cached_run)]
        return out

    def record(self) -> dict:
        return {"cached_run": list(self.cached_run)} if self.config.max_consecutive is not None else {}

    # ------------------------------------------------ mode="device" (omnicache.cache.DeviceDecisions)
    def device_state(self, samples: int, device) -> dict:
        if self.config.max_consecutive is None:
            return {}
        return {"cached_run": torch.zeros(samples, dtype=torch.int64, device=device)}

    def device_forced(self, step: torch.Tensor) -> torch.Tensor:
        return step < self.config.warmup

    def decide_device(self, rel: torch.Tensor, forced: torch.Tensor, state: dict) -> torch.Tensor:
        """:meth:`decide` on device tensors (``rel`` compared in float64, as the host's floats)."""
        compute = forced | (rel.to(torch.float64) >= self.config.threshold)
        if self.config.max_consecutive is not None:
            run = state["cached_run"]
            compute = compute | (run >= self.config.max_consecutive)
            run.copy_(torch.where(compute, torch.zeros_like(run), run + 1))
        return compute
