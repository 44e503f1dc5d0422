"""ToCa, token-wise feature caching (Zou et al., 2024).

Every ``interval`` steps (and the first ``warmup``) a full step computes every token of
every block and caches each block's residual per token. At the steps between, each block
recomputes only the share ``1 - ratio`` of its tokens that most need it and reuses the
cached residual of the others (``ratio`` = R, the reused share; the paper's setting R =
85%). The recomputed tokens run through the block on their own (its attention among them),
as in ToCa; their new residual replaces theirs in the cache, in one fused op
(:func:`omnicache.ops.gather_tokens`, :func:`omnicache.ops.token_update_`).

Which tokens: ToCa scores tokens by their influence in self-attention, the entropy of their
cross-attention, how long ago they were computed (cache frequency) and spatial spread. An
engine that runs attention through the model's own code sees no attention maps, so the
score here is what it observes::

    score = staleness / max staleness + magnitude_weight * |F_n| / mean |F|

(``staleness``: steps since the token was last computed; ``|F_n|``: its cached residual's
mean absolute value, large residuals standing for influential tokens), ties broken toward
the lower token index; the top ``ceil((1 - ratio) N)`` tokens of each row recompute.
Selection runs on the device (``topk``): no host sync. The diffusers engine, blocks that
return one stream (``hidden_states``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .common import PolicyConfig, check_int, check_number, refresh_steps

__all__ = ["ToCaConfig"]


@dataclass(frozen=True)
class ToCaConfig(PolicyConfig):
    """``interval``: full steps every N; ``ratio``: the reused share of tokens at the other
    steps (R); ``warmup``: first steps full; ``magnitude_weight``: the residual magnitude's
    weight in the score."""

    interval: int = 3
    ratio: float = 0.85
    warmup: int = 1
    magnitude_weight: float = 1.0
    kind: ClassVar[str] = "token"
    granularity: ClassVar[str] = "block"

    def __post_init__(self):
        check_int(self, "interval", 1)
        check_number(self, "ratio", 0.0, 1.0)
        if self.ratio >= 1.0:
            raise ValueError(f"ToCaConfig.ratio must be < 1 (some tokens recompute), got {self.ratio!r}")
        check_int(self, "warmup", 1)
        check_number(self, "magnitude_weight", 0.0)

    def full_steps(self, steps: int) -> list[bool]:
        return refresh_steps(steps, self.interval, self.warmup)
