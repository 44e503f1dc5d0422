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
no host sync per step. The default ``coefficients`` are the identity; :func:`fit_teacache` fits them on
the user's model from one uncached run, through any engine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .common import PolicyConfig, check_granularity, check_int, check_mode, check_number

__all__ = ["TeaCacheConfig", "fit_teacache"]


@dataclass(frozen=True)
class TeaCacheConfig(PolicyConfig):
    """``threshold``: accumulated rescaled change that triggers a compute (0 computes every
    step); ``coefficients``: rescaling polynomial, highest degree first; ``mode``: ``"host"``
    (the decision on the host, one sync per step) or ``"device"`` (state, threshold test and
    compute-or-reuse on the device: no sync, ``fullgraph`` compile, CUDA graphs); ``degree``: of
    the polynomial :meth:`calibrate` fits."""

    threshold: float = 0.05
    coefficients: tuple = (1.0, 0.0)
    granularity: str = "step"
    mode: str = "host"
    degree: int = 4
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
        check_int(self, "degree", 1)

    def decider(self, steps: int, blocks: int, granularity: str | None = None) -> TeaCacheDecider:
        check_granularity(self, granularity, ("step",))
        return TeaCacheDecider(self, steps)

    def calibrate(self, engine) -> TeaCacheConfig:
        """This config with its polynomial fitted on ``engine``'s model (:func:`fit_teacache`)."""
        return fit_teacache(engine, self)


class TeaCacheDecider:
    """Per-sample accumulators; see the module docstring. Declares its signal
    (``omnicache.cache.decisions``): block 0's timestep-modulated input, compared with the
    previous step's."""

    signal = "modulated_input"
    first_blocks = 0  # the decision comes before any block
    last_blocks = 0
    ref_every_step = True  # m_{i-1} is the previous step's input, computed or not
    motion = False

    def __init__(self, config: TeaCacheConfig, steps: int):
        self.config, self.steps, self.acc = config, steps, []
        self.mode = config.mode

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


def fit_teacache(engine, config: TeaCacheConfig) -> TeaCacheConfig:
    """TeaCache's rescaling polynomial fitted on ``engine``'s model from one uncached run
    (:class:`omnicache.cache.Engine`: a replay at ``threshold=0``, every step computed):
    ``numpy.polyfit`` of the relative L1 change of the cached blocks' residual against that of
    the modulated input, every context's steps (after its first) and samples. Returns
    ``config`` with those ``coefficients`` (highest degree first, ``config.degree``)."""
    degree = config.degree
    summary = engine.replay(dataclasses.replace(config, threshold=0.0, mode="host")).summary
    xs, ys = [], []
    for ctx in summary.contexts.values():
        for d in ctx["stats"][1:]:  # the first step has no previous one
            x, y = d["signal_rel_l1"], d["residual_rel_l1"]
            for a, b in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
                if a is not None and b is not None:
                    xs.append(a)
                    ys.append(b)
    if len(xs) <= degree:
        raise ValueError(f"fit_teacache: {len(xs)} points cannot fit degree {degree}; use more steps or inputs")
    return dataclasses.replace(config, coefficients=tuple(float(v) for v in np.polyfit(xs, ys, degree)))
