"""AdaCache (Kahatapitiya et al., 2024): a content-dependent caching rate, with MoReg.

After every computed step the change of the computed features since the previous computed
step is measured, per step of distance: ``c = rel / (i - j)``, ``rel`` the relative L1
change of the first blocks' residual (the same signal as First-Block Cache) between the
computed steps ``j < i``. A codebook maps ``c`` to the number of steps the cached residual
of the remaining blocks is then reused for: small change, long reuse. No decision is taken
at the steps in between (the signal is not compared there). The first ``warmup`` steps
compute.

**MoReg** (motion regularisation, video models): the rate is scaled by the clip's motion,
so that fast-moving content is cached less::

    c' = c * (m_i + max(0, m_i - m_j)) / m_0

with ``m`` the mean absolute frame-to-frame difference of the first block's input tokens
relative to their mean magnitude, at the step itself (``m_i``), at the previous computed
step (``m_j``) and at the first step (``m_0``). It needs a model whose first block sees
the frames (Latte's spatial blocks: ``(batch x frames, tokens, channels)``).

Our engines compute the first block at every step (where the signal comes from); the
original measures one block's output at the computed steps only. Host decisions only
(``mode="host"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .common import PolicyConfig, check_granularity, check_int, check_number

__all__ = ["AdaCacheConfig", "CODEBOOKS"]

# (rate below which, steps of reuse): the first match counts; the last entry catches all
CODEBOOKS = {
    "fast": ((0.02, 6), (0.04, 4), (0.06, 3), (0.10, 2), (math.inf, 1)),
    "slow": ((0.01, 4), (0.02, 3), (0.04, 2), (math.inf, 1)),
}


@dataclass(frozen=True)
class AdaCacheConfig(PolicyConfig):
    """``codebook``: ``"fast"``, ``"slow"`` or a tuple of ``(rate, steps)`` pairs with
    increasing rates (the last ``inf``); ``scale``: every rate threshold is multiplied by it
    (the knob a compute target is tuned with); ``moreg``: motion regularisation (video);
    ``warmup``: first steps computed; ``first_blocks``: blocks computed every step for the
    signal."""

    codebook: object = "fast"
    scale: float = 1.0
    moreg: bool = False
    warmup: int = 2
    first_blocks: int = 1
    granularity: str = "step"
    mode: str = "host"
    kind: ClassVar[str] = "dynamic"
    last_blocks: ClassVar[int] = 0

    def __post_init__(self):
        book = CODEBOOKS.get(self.codebook) if isinstance(self.codebook, str) else self.codebook
        ok = isinstance(book, (tuple, list)) and len(book) >= 1 and all(
            isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[1], int) and not isinstance(e[1], bool)
            and e[1] >= 1 and isinstance(e[0], (int, float)) and e[0] > 0 for e in book) \
            and list(e[0] for e in book) == sorted(e[0] for e in book) and math.isinf(book[-1][0])
        if not ok:
            raise ValueError(f"AdaCacheConfig.codebook must be 'fast', 'slow' or ((rate, steps), ..., (inf, steps)) "
                             f"with increasing rates and steps >= 1, got {self.codebook!r}")
        check_number(self, "scale", 0.0)
        if not isinstance(self.moreg, bool):
            raise ValueError(f"AdaCacheConfig.moreg must be a bool, got {self.moreg!r}")
        check_int(self, "warmup", 1)
        check_int(self, "first_blocks", 1)
        check_granularity(self, None, ("step",))
        if self.mode != "host":
            raise ValueError(f"AdaCacheConfig.mode must be 'host' (its rate needs the host), got {self.mode!r}")

    def decider(self, steps: int, blocks: int, granularity: str | None = None) -> AdaCacheDecider:
        check_granularity(self, granularity, ("step",))
        if self.first_blocks >= blocks:
            raise ValueError(f"AdaCacheConfig.first_blocks must be < the model's {blocks} blocks, "
                             f"got {self.first_blocks}")
        return AdaCacheDecider(self)


class AdaCacheDecider:
    """See the module docstring. Per sample: the step of the next computation and the step
    and motion of the last one."""

    signal = "residual"
    ref_every_step = False
    mode = "host"
    last_blocks = 0

    def __init__(self, config: AdaCacheConfig):
        self.config, self.first_blocks, self.batch = config, config.first_blocks, 0
        self.motion = config.moreg  # MoReg: the engine reports each step's motion first
        book = CODEBOOKS[config.codebook] if isinstance(config.codebook, str) else config.codebook
        self.book = [(rate * config.scale, n) for rate, n in book]
        self.next = self.last = self.rate = []
        self.observed, self.motion0, self.motion_last = None, None, []

    def start(self, batch: int) -> None:
        self.batch = batch
        self.next, self.last, self.rate = [0] * batch, [0] * batch, [None] * batch
        self.observed, self.motion0, self.motion_last = None, None, [None] * batch

    def observe_motion(self, motion: list) -> None:
        """MoReg: this step's motion per sample (see the module docstring)."""
        self.observed = list(motion)
        if self.motion0 is None:
            self.motion0 = [max(m, 1e-12) for m in motion]

    def skip(self, rate: float) -> int:
        return next(n for r, n in self.book if rate < r)

    def decide(self, i: int, rel: list | None) -> list[bool]:
        if len(self.next) != self.batch:
            self.start(self.batch)
        out = []
        for s in range(self.batch):
            compute = i < self.config.warmup or rel is None or i >= self.next[s]
            if compute:
                rate = None
                if rel is not None and i > self.last[s]:
                    rate = rel[s] / (i - self.last[s])
                    if self.config.moreg and self.observed is not None:
                        m, prev = self.observed[s], self.motion_last[s]
                        grad = max(0.0, m - prev) if prev is not None else 0.0
                        rate *= (m + grad) / self.motion0[s]
                self.next[s] = i + (1 if rate is None or i < self.config.warmup else self.skip(rate))
                self.last[s], self.rate[s] = i, rate
                if self.observed is not None:
                    self.motion_last[s] = self.observed[s]
            out.append(compute)
        return out

    def record(self) -> dict:
        return {"rate": list(self.rate), "next": list(self.next)}
