"""Cache units: what a plan reuses, and the buffers that hold it.

1. **A plan becomes actions.** :func:`unit_actions` turns a static plan's per-unit compute
   flags into, per step and cache unit, ``COMPUTE`` (run, keep nothing), ``STORE`` (run
   and store) or ``REUSE`` (apply the cache). A unit is stored only when a later step
   reads it: the next step reuses it, or the differences ``D1``/``D2`` need every value.
2. **Per-unit buffers** (:class:`CacheUnit`): the cached value ``F``, its first and
   second differences ``D1 = F_new - F_old`` and ``D2 = D1_new - D1_old``, and, when a
   plan filters, their filtered copies. ``store`` / ``store_rows`` / ``reuse`` / ``reset`` /
   ``nbytes``, all through :mod:`omnicache.ops`; a unit is either a residual
   (``F = out - inp``, reuse ``h += F + γ1 D1 + γ2 D2``) or a branch output (``F = out``,
   reuse ``h += gate * (F + γ1 D1 + γ2 D2)``, the current step's adaLN gate).
3. **Per-token buffers** (:class:`TokenCache`, ToCa) and the number of tokens a partial
   step recomputes (:func:`token_keep`).
"""

from __future__ import annotations

import functools
import math

import torch

from .. import ops
from ..filters import filter_delta

__all__ = ["COMPUTE", "STORE", "REUSE", "unit_actions", "plan_order", "CacheUnit", "TokenCache", "token_keep"]

COMPUTE, STORE, REUSE = 0, 1, 2  # static actions per cache unit and step


# ------------------------------------------------------------------ plan -> actions
def plan_order(plan) -> int:
    """The differences a plan's forecast reads: 2 (``D1`` and ``D2``), 1 (``D1``) or 0."""
    return 2 if any(plan.gamma2) else 1 if any(plan.gamma) else 0


def unit_actions(compute: list[list[bool]], order: int) -> list[list[int]]:
    """``compute[i][u]`` (step ``i`` computes unit ``u``) -> ``actions[i][u]``.

    ``REUSE`` where the unit is not computed; ``STORE`` where it is computed and some step
    reuses it and (the forecast needs every computed value, or the next step reuses it);
    else ``COMPUTE``.
    """
    steps = len(compute)
    units = len(compute[0]) if steps else 0
    out = [[COMPUTE] * units for _ in range(steps)]
    for u in range(units):
        col = [row[u] for row in compute]
        reused = not all(col)
        for i, c in enumerate(col):
            nxt_reuse = i + 1 < steps and not col[i + 1]
            out[i][u] = REUSE if not c else STORE if reused and (order or nxt_reuse) else COMPUTE
    return out


# ------------------------------------------------------------------ buffers
class CacheUnit:
    """The buffers of one cache unit: ``F``, ``D1`` (order >= 1), ``D2`` (order 2), and the
    filtered ``D1``/``D2`` when ``filtering=(grid, setting)`` or ``(grid, setting, (to_grid,
    from_grid))``, the last for units whose tokens are not laid out ``[B, grid tokens, D]``
    (a video model's temporal blocks).

    Buffers are allocated by :meth:`allocate` (before a loop, so a compiled step sees
    fixed tensors) or on the first :meth:`store` (``like`` gives shape, dtype, device).
    """

    def __init__(self, order: int = 0, filtering=None):
        if order not in (0, 1, 2):
            raise ValueError(f"order must be 0, 1 or 2, got {order!r}")
        self.order, self.filtering = order, filtering
        self.F = self.D1 = self.D2 = None
        self.D1f = self.D2f = None

    def allocate(self, like: torch.Tensor) -> CacheUnit:
        """Zeroed buffers shaped like ``like`` (contiguous)."""
        z = functools.partial(torch.zeros, like.shape, dtype=like.dtype, device=like.device)
        self.F = z()
        self.D1 = z() if self.order >= 1 else None
        self.D2 = z() if self.order >= 2 else None
        if self.filtering is not None and self.order >= 1:
            self.D1f = z()
            self.D2f = z() if self.order >= 2 else None
        return self

    @property
    def allocated(self) -> bool:
        return self.F is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.F, self.D1, self.D2, self.D1f, self.D2f) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def reset(self) -> None:
        """Every run starts from empty (zero) caches."""
        for t in self.tensors():
            t.zero_()

    def store(self, out: torch.Tensor, inp: torch.Tensor | None = None, progress: float = 0.0) -> torch.Tensor:
        """``F = out - inp`` (``out`` alone for a branch output), ``D1 = F_new - F_old``,
        ``D2 = D1_new - D1_old``, in one ``store_residual_`` pass; returns its ``[rows, 4]``
        statistics. With filtering, the filtered drifts are refreshed (``progress`` = step /
        (steps - 1))."""
        if self.F is None:
            self.allocate(out)
        stats = ops.store_residual_(self.F, self.D1, out, inp, self.D2)
        if self.D1f is not None:  # once per full step; D1/D2 stay raw for the next differences
            grid, setting, *layout = self.filtering
            # layout: (to_grid, from_grid) when the unit's tokens are not laid out [B, grid tokens, D]
            to_grid, from_grid = layout[0] if layout and layout[0] else (None, None)
            for raw, filtered in ((self.D1, self.D1f), (self.D2, self.D2f)):
                if filtered is not None:
                    if to_grid is None:
                        filtered.copy_(filter_delta(raw, grid, progress, **setting))
                    else:
                        filtered.copy_(from_grid(filter_delta(to_grid(raw), grid, progress, **setting)))
        return stats

    def store_rows(self, rows: torch.Tensor, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """``F[rows] = out - inp`` for the rows ``rows`` alone (a dynamic step in which only
        some samples computed: ``out``/``inp`` are theirs); returns their ``[len(rows), 4]``
        statistics. Plain units only (order 0, no filtering)."""
        if self.order or self.filtering is not None:
            raise ValueError("CacheUnit.store_rows: only units without differences (order 0) store a subset of rows")
        part = CacheUnit(0)
        part.F = self.F.index_select(0, rows)
        stats = part.store(out, inp)
        self.F.index_copy_(0, rows, part.F)
        return stats

    def drifts(self):
        """``(D1, D2)`` as a reuse reads them (filtered if the plan filters)."""
        return (self.D1f, self.D2f) if self.D1f is not None else (self.D1, self.D2)

    def reuse_(self, h: torch.Tensor, gamma=None, gamma2=None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``h += F + γ1 D1 + γ2 D2`` in place, one ``apply_residual_`` pass; with the adaLN
        ``gate`` ``[rows, D]`` (branch reuse), ``h += gate * (F + γ1 D1 + γ2 D2)``.

        ``gamma`` / ``gamma2``: float32 device scalars, or None where the term is off.
        """
        D1, D2 = self.drifts()
        if gamma2 is not None:  # both terms: the op takes the pair (γ1, γ2)
            g = torch.stack([gamma if gamma is not None else torch.zeros_like(gamma2), gamma2])
            ops.apply_residual_(h, self.F, D1, g, D2, gate)
        elif gamma is not None:
            ops.apply_residual_(h, self.F, D1, gamma, None, gate)
        else:
            ops.apply_residual_(h, self.F, None, None, None, gate)
        return h

    def reuse(self, x: torch.Tensor, gamma=None, gamma2=None) -> torch.Tensor:
        """``x + F + γ1 D1 + γ2 D2`` into a fresh contiguous tensor (``x`` untouched)."""
        return self.reuse_(torch.clone(x, memory_format=torch.contiguous_format), gamma, gamma2)

    def forecast(self, gamma=None, gamma2=None) -> torch.Tensor:
        """``F + γ1 D1 + γ2 D2`` into a fresh tensor: a branch output at a reuse step, for an
        engine whose block applies the current gate itself (diffusers' branch caching)."""
        D1, D2 = self.drifts()
        out = self.F.clone()
        for coef, d in ((gamma, D1), (gamma2, D2)):
            if coef is None:
                continue
            if isinstance(coef, torch.Tensor):
                out.add_(d * coef)
            else:
                out.add_(d, alpha=coef)
        return out


# ------------------------------------------------------------------ tokens (ToCa)
def token_keep(ratio: float, tokens: int) -> int:
    """The tokens a ToCa partial step recomputes: ``ceil((1 - ratio) * tokens)``, at least 1."""
    return max(1, math.ceil((1.0 - ratio) * tokens))


class TokenCache:
    """One unit's per-token cache (ToCa, :class:`omnicache.policies.ToCaConfig`), shared by
    every engine: the residual ``F`` (rows, tokens, channels) and each token's staleness
    (steps since it was last computed).

    ``full(out, inp)`` stores a full step; ``partial(run, h, keep, weight)`` recomputes the
    ``keep`` tokens of each row with the highest score ``staleness / max staleness + weight
    * |F_n| / mean |F|`` (ties toward the lower index; ``topk`` on the device, no host
    sync): ``run`` gets them gathered (:func:`omnicache.ops.gather_tokens`) and returns
    its output for them; :func:`omnicache.ops.token_update_` writes their new residuals
    and returns every token's output (the others: ``h + F``)."""

    def __init__(self):
        self.F = self.stale = None

    def reset(self):
        self.F = self.stale = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list:
        return [t for t in (self.F, self.stale) if t is not None]

    def full(self, out, inp):
        self.F = (out - inp).contiguous()
        self.stale = torch.zeros(inp.shape[:2], dtype=torch.float32, device=inp.device)
        return out

    def select(self, keep: int, weight: float):
        n = self.F.shape[1]
        mag = self.F.abs().mean(dim=-1, dtype=torch.float32)
        score = self.stale / self.stale.amax(dim=1, keepdim=True).clamp_min(1.0) \
            + weight * mag / mag.mean(dim=1, keepdim=True).clamp_min(1e-12)
        score = score - torch.arange(n, device=score.device, dtype=torch.float32) * 1e-7  # ties: lower index
        return score.topk(keep, dim=1, sorted=True).indices.sort(dim=1).values

    def partial(self, run, h, keep: int, weight: float):
        h = h.contiguous()
        idx = self.select(keep, weight)
        out = ops.token_update_(self.F, idx, run(ops.gather_tokens(h, idx)).contiguous(), h)
        self.stale += 1
        self.stale.scatter_(1, idx, 0.0)
        return out
