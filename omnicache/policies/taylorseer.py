"""TaylorSeer (Liu et al., 2025): full steps every N, features forecast in between.

At every full step ``r`` the executor stores each unit's feature ``F_r`` and its
differences from the previous full steps (``D1 = F_r0 - F_r1``, ``D2 = D1_r0 - D1_r1``).
A step ``s`` after the latest full step ``r0`` (previous ones ``r1``, ``r2``) forecasts

    F(s) ≈ F_r0 + c1 · D1 + c2 · D2

with the Newton divided-difference coefficients in the step index (``h0 = r0 - r1``,
``h1 = r1 - r2``, ``a = (s - r0) / h0``, ``b = (s - r0)(s - r1) / (h0 + h1)``):

    order 1:  c1 = a                        (= k / N: steps since refresh / interval)
    order 2:  c1 = a + b / h0 - b / h1,  c2 = b / h1

This is the polynomial through the last ``order + 1`` full steps, so it is exact for
features polynomial of degree ``<= order`` in time, including at uneven spacing (the
warm-up steps). With even spacing order 2 is ``F + u ∇F + u(u+1)/2 ∇²F``, ``u = k / N``
(Newton's backward form; TaylorSeer's ``u^2 / 2`` form is its Taylor approximation, which
is not exact for a quadratic). Until ``order + 1`` full steps exist, the order drops.

Feature level: the default is ``step`` granularity, i.e. the forecast residual of the
block stack. Forecasting is linear, so it equals forecasting every block's residual
(``block``) up to rounding, with one buffer set instead of one per block. Forecasting the
pre-gate attention/MLP outputs (``branch``, the paper's per-layer features, gated by the
current adaLN gate) was worse on the embedded digits model (trained default, 40 samples,
50 flow steps, CFG 2, PSNR against uncached): 53.2 vs 51.3 dB at N=3, order 2, and
41.4 vs 38.3 dB at N=5, order 2 (warm-up 1), with branch also spending more (it computes every
block's modulation at every step). ``granularity="branch"`` is available for comparison.
Static plan: the full-step schedule is fixed, so are the coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..plan import CachePlan
from .common import PolicyConfig, check_granularity, check_int, describe, refresh_steps

__all__ = ["TaylorSeerConfig", "forecast_coefficients"]


def forecast_coefficients(full_steps: list[int], step: int, order: int) -> tuple[float, float]:
    """``(c1, c2)`` for forecasting step ``step`` from the full steps before it (see module doc)."""
    m = min(order, len(full_steps) - 1)
    if m <= 0:
        return 0.0, 0.0
    r0, r1 = full_steps[-1], full_steps[-2]
    h0 = r0 - r1
    a = (step - r0) / h0
    if m == 1:
        return a, 0.0
    r2 = full_steps[-3]
    h1 = r1 - r2
    b = (step - r0) * (step - r1) / (h0 + h1)
    return a + b / h0 - b / h1, b / h1


@dataclass(frozen=True)
class TaylorSeerConfig(PolicyConfig):
    """``interval``: full step every N; ``order``: 1 or 2 (differences kept);
    ``warmup``: first steps always computed (they also seed the differences)."""

    interval: int = 3
    order: int = 2
    warmup: int = 1
    granularity: str = "step"
    kind: ClassVar[str] = "static"

    def __post_init__(self):
        check_int(self, "interval", 1)
        if type(self.order) is not int or self.order not in (1, 2):  # not 1.0 or True
            raise ValueError(f"TaylorSeerConfig.order must be 1 or 2, got {self.order!r}")
        check_int(self, "warmup", 0)
        check_granularity(self, None)

    def plan(self, steps: int, blocks: int, granularity: str | None = None) -> CachePlan:
        g = check_granularity(self, granularity)
        full = refresh_steps(steps, self.interval, self.warmup)
        gamma, gamma2, done = [], [], []
        for i, f in enumerate(full):
            c1, c2 = (0.0, 0.0) if f else forecast_coefficients(done, i, self.order)
            gamma.append(c1)
            gamma2.append(c2)
            if f:
                done.append(i)
        compute = [[[f, f]] * blocks for f in full]
        return CachePlan(steps, blocks, g, compute, gamma, gamma2, meta=describe(self))
