"""What a run spent and did, the same in every engine: FLOPs from decisions, the run summary.

**FLOPs** (:func:`spent_flops`, the one rule): a call (one step of one cache context)
spends ``outside + signal + Σ_b Σ_k parts[b][k] · ran[b][k]``, where :class:`Costs` holds
what the engine measured or knows of the model (``outside``: the embedders and the final
layer; ``parts[b]``: block ``b``'s branches in order, then the rest of the block;
``signal``: a dynamic policy's signal where the engine computes it apart from the blocks)
and ``ran[b][k]`` is the share of the call's rows (or tokens) that ran the part. Uncached,
every part runs. ``compute_fraction = flops / flops_uncached``, never a count of blocks:
where an engine could not measure the costs (a call traced by ``torch.compile`` before any
eager call), it is None.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .decisions import per_sample_rel

__all__ = ["Costs", "spent_flops", "linear_flops", "RunSummary"]


@dataclasses.dataclass
class Costs:
    """FLOPs of one call by part (see the module docstring)."""

    outside: float
    parts: list
    signal: float = 0.0
    full: float | None = None  # the uncached call's FLOPs where these parts are a partial call's (ToCa)

    @property
    def uncached(self) -> float:
        return self.full if self.full is not None else self.outside + sum(sum(p) for p in self.parts)


def linear_flops(module: torch.nn.Linear, x: torch.Tensor) -> int:
    """FLOPs of one ``nn.Linear`` call: ``2 · in · out`` per row it processes (``x.numel() / in``
    rows); how an engine that cannot count its model analytically measures :class:`Costs`, and
    how the comparisons count every system alike."""
    return 2 * module.in_features * module.out_features * (x.numel() // module.in_features)


def spent_flops(costs: Costs, ran: list, signal: bool = False) -> float:
    """FLOPs a call spends: ``outside (+ signal) + Σ_b Σ_k parts[b][k] · ran[b][k]``."""
    total = costs.outside + (costs.signal if signal else 0.0)
    for part, share in zip(costs.parts, ran):
        total += sum(c * s for c, s in zip(part, share))
    return total


def _rel(stats: torch.Tensor, rows_per_sample: int, scalar: bool):
    """A ``[rows, 4]`` store's relative L1 change ``Σ|F_new - F_old| / Σ|F_old|``: per sample,
    or over every row (``scalar``: one decision for the whole call)."""
    if scalar:
        return (stats[:, 0].sum() / stats[:, 1].sum()).item()
    return per_sample_rel(stats, rows_per_sample).tolist()


def resolve_stats(raw: dict, batch: int, rows_per_sample: int, scalar: bool) -> dict:
    """One step's statistics as Python values (read back from the device here, once).

    ``residual_rel_l1``: static plans, the mean over the stored units (None where none was
    stored); dynamic policies, of the cached blocks' residual (None where a sample reused);
    per sample, or one value where one decision covers the call (``scalar``)."""
    out = {k: v for k, v in raw.items() if k not in ("stored", "rows")}
    stored, rows = raw.get("stored"), raw.get("rows")
    if isinstance(stored, (list, tuple)):  # static: every unit stored this step
        rels = [per_sample_rel(s, rows_per_sample) for s in stored if s is not None]
        if not rels:
            out["residual_rel_l1"] = None
        elif scalar or len({r.shape for r in rels}) > 1:  # units whose rows are not the samples (Latte)
            out["residual_rel_l1"] = float(torch.stack([r.mean() for r in rels]).mean())
        else:
            out["residual_rel_l1"] = torch.stack(rels).mean(0).tolist()
    elif "stored" in raw:  # dynamic: the cached blocks' residual
        if stored is None:
            out["residual_rel_l1"] = None if scalar else [None] * batch
        elif rows is not None:  # a sub-batch computed
            per = [None] * batch
            for s, v in zip(rows, per_sample_rel(stored, rows_per_sample).tolist()):
                per[s] = v
            out["residual_rel_l1"] = per
        else:
            out["residual_rel_l1"] = _rel(stored, rows_per_sample, scalar)
    return out


@dataclasses.dataclass
class RunSummary:
    """What a sampling run did, in any engine; every field means the same in each.

    ``decisions[i, b, k]``: the share of rows that computed branch ``k`` of block ``b`` at step
    ``i`` (the mean over cache contexts). ``flops`` / ``flops_uncached``: every context's calls
    (:func:`spent_flops`); ``compute_fraction`` their ratio. ``wall_s``: the run's wall time
    (from its first model call to the end of its last). ``batch``: samples a call runs;
    ``rows_per_sample``: rows a sample takes in a call (2 where the engine runs guidance's
    ``[cond; uncond]`` in one call). ``cache_bytes``: buffers held across steps.
    ``contexts[name]``: per cache context (a pipeline's ``"cond"``, ``"uncond"``; our
    runtime's one context ``None``): ``trace`` (per step, per block: computed, a share where
    only some rows did), ``stats`` (per step, see :func:`resolve_stats`), ``flops``,
    ``flops_uncached``, ``compute_fraction``, ``block_fraction`` (computed block calls ÷ all),
    for branch plans ``branch_trace`` and for static plans ``plan_compute_fraction`` (what the
    plan spends by the costs). ``stats``: the only context's statistics.
    ``flops_sub_batch`` (a dynamic policy's device mode): what the host mode's sub-batches
    would spend at the same decisions; ``flops`` counts what the device mode spent (every row
    of a step in which any sample computes).
    """

    policy: str
    granularity: str
    decisions: torch.Tensor
    flops: float | None
    flops_uncached: float | None
    wall_s: float
    cache_bytes: int
    batch: int
    rows_per_sample: int
    steps: int | None = None
    blocks: int | None = None
    kind: str = "static"
    contexts: dict = dataclasses.field(default_factory=dict)
    flops_sub_batch: float | None = None

    @property
    def compute_fraction(self) -> float | None:
        return self.flops / self.flops_uncached if self.flops is not None and self.flops_uncached else None

    @functools.cached_property
    def stats(self) -> list[dict]:
        """Per step: the statistics of the run's only cache context (``contexts[name]["stats"]``)."""
        if len(self.contexts) != 1:
            raise ValueError(f"RunSummary.stats: the run has {len(self.contexts)} cache contexts "
                             f"({', '.join(map(repr, self.contexts))}); read contexts[name]['stats']")
        return next(iter(self.contexts.values()))["stats"]
