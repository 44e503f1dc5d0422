"""The cache core: what both engines (our runtime and diffusers transformers) call.

Three jobs, written once:

1. **A plan becomes actions.** :func:`unit_actions` turns a static plan's per-unit compute
   flags into, per step and cache unit, ``COMPUTE`` (run, keep nothing), ``STORE`` (run
   and store) or ``REUSE`` (apply the cache). A unit is stored only when a later step
   reads it: the next step reuses it, or the differences ``D1``/``D2`` need every value.
2. **Per-unit buffers** (:class:`CacheUnit`): the cached value ``F``, its first and
   second differences ``D1 = F_new - F_old`` and ``D2 = D1_new - D1_old``, and, when a
   plan filters, their filtered copies. ``store`` / ``reuse`` / ``reset`` / ``nbytes``, all
   through :mod:`omnicache.ops`; a unit is either a residual (``F = out - inp``, reuse
   ``h += F + γ1 D1 + γ2 D2``) or a branch output (``F = out``, reuse
   ``h += gate * (F + γ1 D1 + γ2 D2)``, the current step's adaLN gate).
3. **The dynamic decision** (:func:`relative_change`): ``Σ|s - s_ref| / Σ|s_ref|`` of a
   signal, summed over a sample's rows (or the whole batch), all-reduced over a process
   group when the sequence is sharded: the one host sync of a dynamic step.

Plus the run summary both engines return (:class:`RunSummary`): ``compute_fraction`` is
FLOPs spent ÷ uncached FLOPs in both.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import ops
from .filters import filter_delta

__all__ = ["COMPUTE", "STORE", "REUSE", "unit_actions", "plan_order", "CacheUnit", "relative_change",
           "per_sample_rel", "RunSummary"]

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
    filtered ``D1``/``D2`` when ``filtering=(grid, setting)``.

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
            grid, setting = self.filtering
            for raw, filtered in ((self.D1, self.D1f), (self.D2, self.D2f)):
                if filtered is not None:
                    filtered.copy_(filter_delta(raw, grid, progress, **setting))
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


# ------------------------------------------------------------------ dynamic decision
def per_sample_rel(stats: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """``[rows, k]`` sums -> ``[B]`` relative L1 ``(Σ col0) / (Σ col1)`` over a sample's rows
    (rows ordered ``[cond; uncond]``, ``rows = rows_per_sample * B``)."""
    s = stats.reshape(rows_per_sample, -1, stats.shape[1]).sum(0)
    return s[:, 0] / s[:, 1]


def relative_change(signal: torch.Tensor, ref: torch.Tensor, *, rows_per_sample: int = 1,
                    per_sample: bool = True, group=None) -> list[float]:
    """``Σ|s - ref| / Σ|ref|`` per sample (``per_sample``) or over the whole batch, read back to
    the host: the dynamic step's one sync. With ``group`` (a sharded sequence) the sums are
    all-reduced first, so every rank takes the single-process decision."""
    sums = ops.rel_l1(signal, ref)  # [rows, 2]
    if per_sample:
        sums = sums.reshape(rows_per_sample, -1, 2).sum(0)  # [B, 2]
    else:
        sums = sums.sum(0, keepdim=True)  # [1, 2]
    if group is not None:  # both sums over the ranks: every rank gets the unsharded ratio
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
    return (sums[:, 0] / sums[:, 1]).tolist()


# ------------------------------------------------------------------ summary
@dataclasses.dataclass
class RunSummary:
    """What a sampling run did, in either engine.

    ``decisions[i, b, k]``: fraction of samples (rows) that computed branch ``k`` (0
    attention, 1 MLP) of block ``b`` at step ``i``. ``compute_fraction = flops /
    flops_uncached``: FLOPs from the model's per-part counts (our DiT) or the linear layers
    each block ran (diffusers), times the rows that ran each part. ``contexts``: per cache
    context (diffusers), its own trace, compute fraction and statistics.
    """

    policy: str
    granularity: str
    decisions: torch.Tensor
    flops: float
    flops_uncached: float
    wall_s: float
    cache_bytes: int
    batch: int
    rows_per_sample: int
    raw_stats: list = dataclasses.field(repr=False, default_factory=list)
    steps: int | None = None
    blocks: int | None = None
    kind: str = "static"
    contexts: dict = dataclasses.field(default_factory=dict)

    @property
    def compute_fraction(self) -> float | None:
        return self.flops / self.flops_uncached if self.flops_uncached else None

    @functools.cached_property
    def stats(self) -> list[dict]:
        """Per step, per-sample lists (read back from the device here, once).

        Static plans: ``residual_rel_l1`` (at steps that stored a residual): mean over the
        stored units of ``Σ|F_new - F_old| / Σ|F_old|``. Dynamic policies: ``signal_rel_l1``
        (None at step 0), ``compute``, ``residual_rel_l1`` of the remaining blocks' residual
        (None where the sample reused), plus the decider's own entries.
        """
        out = []
        for d in self.raw_stats:
            if isinstance(d, tuple):  # static: the [rows, 4] stats of each stored unit
                rel = [per_sample_rel(s, self.rows_per_sample) for s in d]
                out.append({"residual_rel_l1": torch.stack(rel).mean(0).tolist()} if rel else {})
                continue
            d = dict(d)
            store = d["residual_rel_l1"]
            per = [None] * self.batch
            if isinstance(store, tuple):  # a sub-batch computed
                for s, v in zip(store[0], per_sample_rel(store[1], self.rows_per_sample).tolist()):
                    per[s] = v
            elif store is not None:
                per = per_sample_rel(store, self.rows_per_sample).tolist()
            d["residual_rel_l1"] = per
            out.append(d)
        return out
