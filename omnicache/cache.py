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
   group when the sequence is sharded: the one host sync of a dynamic step. Or, in a
   dynamic policy's ``mode="device"``, :class:`DeviceDecisions`: the same ratio, the
   decider's state, its threshold test and the reference update as device tensors, no
   value read back while sampling (the engines compute or reuse through ``torch.cond``
   and mix samples with ``torch.where``; :func:`select_rows`).

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
           "relative_change_device", "per_sample_rel", "DeviceDecisions", "select_rows", "RunSummary", "TokenCache"]

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


def relative_change_device(signal: torch.Tensor, ref: torch.Tensor, *, rows_per_sample: int = 1,
                           per_sample: bool = True, group=None) -> torch.Tensor:
    """``Σ|s - ref| / Σ|ref|`` per sample (``per_sample``: ``[B]``) or over the whole batch
    (``[1]``), a float32 device tensor. With ``group`` (a sharded sequence) the sums are
    all-reduced first, so every rank takes the single-process decision."""
    sums = ops.rel_l1(signal, ref)  # [rows, 2]
    if per_sample:
        sums = sums.reshape(rows_per_sample, -1, 2).sum(0)  # [B, 2]
    else:
        sums = sums.sum(0, keepdim=True)  # [1, 2]
    if group is not None:  # both sums over the ranks: every rank gets the unsharded ratio
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
    return sums[:, 0] / sums[:, 1]


def relative_change(signal: torch.Tensor, ref: torch.Tensor, *, rows_per_sample: int = 1,
                    per_sample: bool = True, group=None) -> list[float]:
    """:func:`relative_change_device` read back to the host: the dynamic step's one sync."""
    return relative_change_device(signal, ref, rows_per_sample=rows_per_sample, per_sample=per_sample,
                                  group=group).tolist()


def select_rows(mask: torch.Tensor, computed: torch.Tensor, reused: torch.Tensor) -> torch.Tensor:
    """``torch.where`` per sample: ``mask`` is ``[S]`` (one flag per sample, or ``[1]`` for the
    whole batch); rows of ``computed`` / ``reused`` are ``[cond; uncond]`` (``S`` divides the rows)."""
    rows = computed.shape[0]
    m = mask if mask.shape[0] in (1, rows) else mask.repeat(rows // mask.shape[0])
    return torch.where(m.view(-1, *([1] * (computed.dim() - 1))), computed, reused)


class DeviceDecisions:
    """A dynamic policy's decisions with no host sync (``mode="device"``), for either engine.

    Device state: the step counter, the reference signal, per sample whether a residual is
    stored, the decider's own state (:meth:`decider.device_state`, e.g. TeaCache's
    accumulator, float64 as the host mode's Python floats) and a per-step history (relative
    change, decision, the decider's recorded state) that :meth:`history` reads back once,
    when a summary is asked for. :meth:`decide` is the whole decision of one step:

        rel = Σ|s - ref| / Σ|ref|   (relative_change_device)
        forced = not stored | decider.device_forced(step)
        compute = decider.decide_device(rel, forced, state)   (state updated in place)
        ref = s (decider.ref_every_step) or where(compute, s, ref);  stored |= compute

    It returns ``compute`` (``[S]`` bool) and ``any(compute)`` (the ``torch.cond`` predicate).
    Every buffer is allocated here, once, so a compiled step sees fixed tensors.
    """

    def __init__(self, decider, steps: int, signal_like: torch.Tensor, samples: int, *,
                 rows_per_sample: int = 1, per_sample: bool = True, group=None):
        dev = signal_like.device
        self.decider, self.steps, self.samples = decider, steps, samples
        self.rows_per_sample, self.per_sample, self.group = rows_per_sample, per_sample, group
        self.step = torch.zeros((), dtype=torch.long, device=dev)
        self.ref = torch.zeros_like(signal_like, memory_format=torch.contiguous_format)
        self.stored = torch.zeros(samples, dtype=torch.bool, device=dev)
        self.state = decider.device_state(samples, dev)
        self.rel_hist = torch.zeros(steps, samples, dtype=torch.float32, device=dev)
        self.compute_hist = torch.zeros(steps, samples, dtype=torch.bool, device=dev)
        self.state_hist = {k: torch.zeros(steps, samples, dtype=v.dtype, device=dev) for k, v in self.state.items()}

    def tensors(self) -> list[torch.Tensor]:
        return [self.step, self.ref, self.stored, *self.state.values(), self.rel_hist, self.compute_hist,
                *self.state_hist.values()]

    @property
    def nbytes(self) -> int:
        """Bytes held across steps by the decision itself (the reference and the decider's state)."""
        return self.ref.nbytes + sum(t.nbytes for t in self.state.values())

    def reset(self) -> None:
        """Zero everything, the history included."""
        for t in self.tensors():
            t.zero_()

    def restart(self) -> None:
        """A new run: step, reference, stored flags and the decider's state back to zero; the
        history stays (a summary of the run that ended may still read it)."""
        for t in (self.step, self.ref, self.stored, *self.state.values()):
            t.zero_()

    def decide(self, signal: torch.Tensor):
        """One step's decision, on the device: ``(compute [S] bool, any(compute))``."""
        rel = relative_change_device(signal, self.ref, rows_per_sample=self.rows_per_sample,
                                     per_sample=self.per_sample, group=self.group)
        forced = ~self.stored | self.decider.device_forced(self.step)
        compute = self.decider.decide_device(rel, forced, self.state)
        if self.decider.ref_every_step:
            self.ref.copy_(signal)
        else:
            self.ref.copy_(select_rows(compute, signal, self.ref))
        self.stored.logical_or_(compute)
        # the history row of this step (clamped: a call past ``steps`` overwrites the last row)
        at = self.step.clamp(max=self.steps - 1).view(1)
        self.rel_hist.index_copy_(0, at, rel.view(1, -1))
        self.compute_hist.index_copy_(0, at, compute.view(1, -1))
        for k, v in self.state.items():
            self.state_hist[k].index_copy_(0, at, v.view(1, -1))
        self.step.add_(1)
        return compute, compute.any()

    def history(self, calls: int | None = None) -> list[dict]:
        """Per step (``calls`` steps, default every step taken): ``signal_rel_l1`` (None at the
        first step: no reference yet), ``compute`` and the decider's recorded state, as
        Python lists (read back from the device here, once)."""
        n = min(int(self.step) if calls is None else calls, self.steps)
        rel, comp = self.rel_hist[:n].tolist(), self.compute_hist[:n].tolist()
        state = {k: v[:n].tolist() for k, v in self.state_hist.items()}
        return [{"signal_rel_l1": None if i == 0 else rel[i], "compute": comp[i],
                 **{k: v[i] for k, v in state.items()}} for i in range(n)]


# ------------------------------------------------------------------ summary
@dataclasses.dataclass
class RunSummary:
    """What a sampling run did, in either engine.

    ``decisions[i, b, k]``: fraction of samples (rows) that computed branch ``k`` (0
    attention, 1 MLP) of block ``b`` at step ``i``. ``compute_fraction = flops /
    flops_uncached``: FLOPs from the model's per-part counts (our DiT) or the linear layers
    each block ran (diffusers), times the rows that ran each part. ``contexts``: per cache
    context (diffusers), its own trace, compute fraction and statistics.
    ``flops_sub_batch`` (a dynamic policy's ``mode="device"``): the FLOPs the host mode's
    sub-batches would spend at the same decisions; ``flops`` counts what the device mode
    spent (every row of a step in which any sample computes), so ``flops - flops_sub_batch``
    is what mixing samples with ``torch.where`` instead of a synced sub-batch costs.
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
    flops_sub_batch: float | None = None

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


class TokenCache:
    """One unit's per-token cache (ToCa, :class:`omnicache.policies.ToCaConfig`), shared by
    both engines: the residual ``F`` (rows, tokens, channels) and each token's staleness
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
