"""What the policy configs share: the declared interface, field validation, refresh schedules."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from ..plan import DEFAULT_BRANCHES, GRANULARITIES

__all__ = ["PolicyConfig", "check_int", "check_number", "check_granularity", "check_mode", "refresh_steps",
           "describe", "MODES"]

MODES = ("host", "device", "device-where")  # dynamic policies: where the decision is taken


class PolicyConfig:
    """What every policy config declares (:mod:`omnicache.cache.policy` reads it, no engine
    probes a config): ``kind`` (``"static"``, ``"calibrated"``, ``"dynamic"`` or ``"token"``)
    and ``branches``, the branch names of its branch-level plans."""

    kind: ClassVar[str] = "static"
    branches: ClassVar[tuple] = DEFAULT_BRANCHES


def check_int(config, name: str, lo: int = 0) -> None:
    """``config.<name>`` must be an int >= ``lo``; else ``ValueError`` naming the field."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{type(config).__name__}.{name} must be an int >= {lo}, got {value!r}")


def check_number(config, name: str, lo: float = -math.inf, hi: float = math.inf) -> None:
    """``config.<name>`` must be a finite number in ``[lo, hi]``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise ValueError(f"{type(config).__name__}.{name} must be a finite number in [{lo}, {hi}], got {value!r}")


def check_granularity(config, granularity, allowed=GRANULARITIES) -> str:
    """The granularity to use: the override if given (checked), else ``config.granularity``."""
    g = config.granularity if granularity is None else granularity
    if g not in allowed:
        field = f"{type(config).__name__}.granularity" if granularity is None else "granularity"
        raise ValueError(f"{field} must be one of {', '.join(allowed)}, got {g!r}")
    return g


def check_mode(config) -> None:
    """``config.mode``: ``"host"`` (one sync per step), ``"device"`` (the decision on the device,
    compute-or-reuse through ``torch.cond``) or ``"device-where"`` (the same decision; the rest
    always computed and selected with ``torch.where``: no predicate read anywhere, full FLOPs)."""
    if config.mode not in MODES:
        raise ValueError(f"{type(config).__name__}.mode must be one of {', '.join(map(repr, MODES))}, "
                         f"got {config.mode!r}")


def refresh_steps(steps: int, interval: int, warmup: int) -> list[bool]:
    """Full-compute steps: the first ``warmup`` steps, then every ``interval``-th step."""
    return [i < warmup or (i - warmup) % interval == 0 for i in range(steps)]


def describe(config) -> dict:
    """``{"policy": <Name>, "config": {...}}`` for a plan's ``meta``."""
    return {"policy": type(config).__name__.removesuffix("Config"), "config": dataclasses.asdict(config)}
