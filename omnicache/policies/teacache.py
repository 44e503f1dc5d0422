"""TeaCache (Liu et al., 2025): skip whole steps while the timestep-modulated input barely moves.

Per step, the signal is block 0's timestep-modulated input
``m_i = modulate(norm1(h_i), shift_msa, scale_msa)``; per sample (cond and uncond rows
summed) the executor measures ``rel_i = Σ|m_i - m_{i-1}| / Σ|m_{i-1}|`` with ``rel_l1``.
A polynomial ``p`` (``coefficients``, highest degree first, as ``numpy.polyval``)
rescales it to the expected relative change of the block stack's output residual, and

    acc += p(rel_i);   compute (and acc = 0) if acc >= threshold, else reuse

at step granularity: reuse is ``h += R`` with ``R`` the residual of the whole block stack
at the sample's last computed step. The first and last steps always compute.

``mode="device"`` (or ``"device-where"``, see :func:`.common.check_mode`): the accumulators are float64 device tensors and the same rule runs
there (:meth:`TeaCacheDecider.decide_device`, through :class:`omnicache.cache.DeviceDecisions`):
no host sync per step. The default ``coefficients`` are the identity; :func:`fit_teacache_coefficients` fits them on
a model from one uncached run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..runtime.model import modulate
from .common import check_granularity, check_mode, check_number

__all__ = ["TeaCacheConfig", "fit_teacache_coefficients"]


@dataclass(frozen=True)
class TeaCacheConfig:
    """``threshold``: accumulated rescaled change that triggers a compute (0 computes every
    step); ``coefficients``: rescaling polynomial, highest degree first; ``mode``: ``"host"``
    (the decision on the host, one sync per step) or ``"device"`` (state, threshold test and
    compute-or-reuse on the device: no sync, ``fullgraph`` compile, CUDA graphs)."""

    threshold: float = 0.05
    coefficients: tuple = (1.0, 0.0)
    granularity: str = "step"
    mode: str = "host"
    kind: ClassVar[str] = "dynamic"

    def __post_init__(self):
        check_number(self, "threshold", 0.0)
        coef = self.coefficients
        if not isinstance(coef, (tuple, list)) or not coef or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coef):
            raise ValueError(f"TeaCacheConfig.coefficients must be a non-empty sequence of finite numbers, "
                             f"got {coef!r}")
        object.__setattr__(self, "coefficients", tuple(float(v) for v in coef))
        check_granularity(self, None, ("step",))
        check_mode(self)

    def decider(self, steps: int, blocks: int, granularity: str | None = None) -> TeaCacheDecider:
        check_granularity(self, granularity, ("step",))
        return TeaCacheDecider(self, steps)


class TeaCacheDecider:
    """Per-sample accumulators; see the module docstring."""

    first_blocks = 0  # the decision comes before any block
    ref_every_step = True  # m_{i-1} is the previous step's input, computed or not

    def __init__(self, config: TeaCacheConfig, steps: int):
        self.config, self.steps, self.acc = config, steps, []
        self.mode = config.mode

    def signal(self, model, h0, h, c):
        blk = model.blocks[0]
        mod = blk.modulation(c)
        return modulate(blk.norm1(h), mod[0], mod[1])

    def signal_flops(self, flops: dict, config) -> float:
        """Block 0's modulation and ``modulate`` (norm not counted, as in ``flops_per_sample``)."""
        return flops["block_modulation"] + 2 * config.num_tokens * config.hidden_size

    def start(self, batch: int) -> None:
        self.acc = [0.0] * batch

    def decide(self, i: int, rel: list | None) -> list[bool]:
        """Per sample: compute (True) or reuse; ``rel`` is None when there is no previous step."""
        if rel is None or i == 0 or i == self.steps - 1:
            self.acc = [0.0] * len(self.acc)
            return [True] * len(self.acc)
        out = []
        for s, r in enumerate(rel):
            self.acc[s] += float(np.polyval(self.config.coefficients, r))
            out.append(self.acc[s] >= self.config.threshold)
            if out[-1]:
                self.acc[s] = 0.0
        return out

    def record(self) -> dict:
        return {"accumulated": list(self.acc)}

    # ------------------------------------------------ mode="device" (omnicache.cache.DeviceDecisions)
    def device_state(self, samples: int, device) -> dict:
        return {"accumulated": torch.zeros(samples, dtype=torch.float64, device=device)}

    def device_forced(self, step: torch.Tensor) -> torch.Tensor:
        """The first and the last step compute (``step``: a device counter)."""
        return (step == 0) | (step == self.steps - 1)

    def decide_device(self, rel: torch.Tensor, forced: torch.Tensor, state: dict) -> torch.Tensor:
        """:meth:`decide` on device tensors: ``acc += p(rel)`` (float64, Horner as ``numpy.polyval``),
        compute where ``acc >= threshold`` or forced, and ``acc = 0`` where it computes."""
        acc, x = state["accumulated"], rel.to(torch.float64)
        p = torch.zeros_like(x)
        for coef in self.config.coefficients:
            p = p * x + coef
        new = torch.where(forced, torch.zeros_like(acc), acc + p)
        compute = forced | (new >= self.config.threshold)
        acc.copy_(torch.where(compute, torch.zeros_like(new), new))
        return compute


def fit_teacache_coefficients(model, sampler, steps: int, labels: torch.Tensor, *, guidance: float = 1.0,
                              seed: int = 0, degree: int = 4) -> tuple:
    """Fit ``p`` with ``numpy.polyfit`` so that ``p(rel of the modulated input)`` predicts the
    relative L1 change of the block stack's residual, from one uncached run of ``labels``.

    Returns the coefficients, highest degree first, for ``TeaCacheConfig(coefficients=...)``.
    """
    from ..runtime.executor import CacheExecutor  # the executor imports nothing from policies

    ex = CacheExecutor(model, labels, TeaCacheConfig(threshold=0.0), steps=steps, sampler=sampler,
                       guidance=guidance)
    _, summary = ex.run(seed)
    xs, ys = [], []
    for d in summary.stats[1:]:  # step 0 has no previous step
        xs += d["signal_rel_l1"]
        ys += d["residual_rel_l1"]
    if len(xs) <= degree:
        raise ValueError(f"fit_teacache_coefficients: {len(xs)} points cannot fit degree {degree}; "
                         f"use more steps or labels")
    return tuple(float(v) for v in np.polyfit(xs, ys, degree))
