"""Dynamic decisions: compute or reuse, per step, from the change of a signal.

A dynamic policy's *decider* (:mod:`omnicache.policies`) declares what it needs:
``signal`` (``"residual"``: the first blocks' residual ``h_Fn - h_0``; ``"modulated_input"``:
block 0's timestep-modulated input), ``first_blocks`` (computed before deciding),
``last_blocks`` (computed after, every step), ``ref_every_step`` (compare with the
previous step, else with the last computed one), ``motion`` (the clip's motion is
observed first) and ``mode`` (where the decision is taken). The engine computes the
signal; the decision is written once, here, for every engine:

- :class:`HostDecisions` (``mode="host"``): ``Σ|s - s_ref| / Σ|s_ref|`` per sample
  (:func:`relative_change`, summed over a sample's rows and, with ``group``, over the ranks
  of a sharded sequence: the step's one host sync), the decider's rule, the reference
  update; the samples that compute are ``rows`` (a sub-batch the engine runs).
- :class:`DeviceDecisions` (``mode="device"`` / ``"device-where"``): the same on device
  tensors, no value read back while sampling; the engine computes or reuses through
  :func:`compute_or_reuse` (``torch.cond``, or ``torch.where`` alone) and mixes samples
  with :func:`select_rows`.

Both have ``decide(signal) -> (compute, any)``, ``restart()``, ``history()`` and ``nbytes``.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from .. import ops

__all__ = ["relative_change", "relative_change_device", "per_sample_rel", "select_rows", "compute_or_reuse",
           "HostDecisions", "DeviceDecisions"]


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


def compute_or_reuse(decisions: DeviceDecisions, compute, reuse, operands: tuple, *, where: bool = False,
                     mix: bool = True):
    """The device mode's compute-or-reuse, no host sync: ``compute(*operands)`` for the samples
    that compute (``decisions.mask``) and ``reuse(*operands)`` for the others.

    ``torch.cond(any sample computes, compute then mix, reuse)``; ``where=True``: no predicate
    is read at all (outside a CUDA-graph capture ``torch.cond`` reads it on the host): both run
    and :func:`select_rows` mixes. ``mix=False`` (one decision for the whole batch): the compute
    branch returns ``compute``'s outputs as they are. Both functions return fresh tensors (a
    tensor, or a tuple / dict of tensors of the same structure; ``torch.cond`` forbids outputs
    that alias an input)."""
    mask = decisions.mask

    def mixed(*args):
        return tree_map(lambda a, b: select_rows(mask, a, b), compute(*args), reuse(*args))

    if where:
        return mixed(*operands)
    return torch.cond(decisions.any, mixed if mix else compute, reuse, operands)


def _entries(rel, compute, state: dict, scalar: bool) -> dict:
    """One step's statistics: per sample lists, or (``scalar``: one decision for the whole
    batch) the single value."""
    if scalar:
        rel = None if rel is None else rel[0]
        compute = bool(compute[0])
    return {"signal_rel_l1": rel, "compute": compute, **state}


class HostDecisions:
    """A dynamic policy's decisions on the host (``mode="host"``), for any engine.

    Per step, :meth:`decide` measures the signal's relative L1 to the reference (one host
    sync; None at the first step), asks the decider per sample, forces a compute where
    nothing is stored yet, and updates the reference: the new signal where every sample
    computes (or ``decider.ref_every_step``), else the computing samples' rows of it. It
    returns ``(compute, any(compute))``; ``rows`` holds the rows that compute when only
    some samples do (``[cond; uncond]`` layout, ``rows_per_sample`` rows a sample), else
    None. A signal with another number of samples than the last restarts the decisions.
    """

    def __init__(self, decider, samples: int = 1, *, rows_per_sample: int = 1, per_sample: bool = True,
                 group=None):
        self.decider, self.rows_per_sample, self.per_sample, self.group = decider, rows_per_sample, per_sample, group
        self.restart(samples)

    def restart(self, samples: int | None = None) -> None:
        """A new run: no reference, nothing stored, the decider started, an empty history."""
        self.samples = self.samples if samples is None else samples
        self.decider.start(self.samples)
        self.ref, self.rows, self.step, self.history = None, None, 0, []
        self.stored = [False] * self.samples
        self.last_rel = None

    @property
    def nbytes(self) -> int:
        return self.ref.nbytes if self.ref is not None else 0

    def decide(self, signal: torch.Tensor, motion: list | None = None):
        """One step's decision: ``(compute [S] list of bool, any(compute))``."""
        samples = signal.shape[0] // self.rows_per_sample if self.per_sample else 1
        if samples != self.samples:  # another batch size: a new run
            self.restart(samples)
        if self.decider.motion:
            self.decider.observe_motion(motion)
        rel = None
        if self.ref is not None:  # the step's one host sync
            rel = relative_change(signal, self.ref, rows_per_sample=self.rows_per_sample,
                                  per_sample=self.per_sample, group=self.group)
        compute = [bool(d) or not s for d, s in zip(self.decider.decide(self.step, rel), self.stored)]
        self.stored = [s or c for s, c in zip(self.stored, compute)]
        some = [s for s in range(self.samples) if compute[s]]
        self.rows = None
        if 0 < len(some) < self.samples:
            rows = torch.tensor([s + r * self.samples for r in range(self.rows_per_sample) for s in some])
            if rows.device != signal.device:  # pinned + non_blocking: no second sync on CUDA
                rows = rows.pin_memory().to(signal.device, non_blocking=True)
            self.rows = rows
        if self.decider.ref_every_step or len(some) == self.samples:
            self.ref = signal
        elif self.rows is not None:
            self.ref = self.ref.index_copy(0, self.rows, signal.index_select(0, self.rows))
        self.history.append(_entries(rel, compute, self.decider.record(), not self.per_sample))
        self.last_rel = rel
        self.step += 1
        return compute, bool(some)


class DeviceDecisions:
    """A dynamic policy's decisions with no host sync (``mode="device"``), for any engine.

    Device state: the step counter, the reference signal, per sample whether a residual is
    stored, the decider's own state (:meth:`decider.device_state`, e.g. TeaCache's
    accumulator, float64 as the host mode's Python floats) and a per-step history (relative
    change, decision, the decider's recorded state) that :meth:`history` reads back once,
    when a summary is asked for. :meth:`decide` is the whole decision of one step:

        rel = Σ|s - ref| / Σ|ref|   (relative_change_device)
        forced = not stored | decider.device_forced(step)
        compute = decider.decide_device(rel, forced, state)   (state updated in place)
        ref = s (decider.ref_every_step) or where(compute, s, ref);  stored |= compute

    It returns ``compute`` (``[S]`` bool) and ``any(compute)`` (the ``torch.cond`` predicate),
    also kept as ``mask`` / ``any`` for :func:`compute_or_reuse` and :meth:`store`.
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
        self.mask = self.any = None

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
        self.mask, self.any = compute, compute.any()
        return self.mask, self.any

    def store(self, F: torch.Tensor, out: torch.Tensor, inp: torch.Tensor) -> None:
        """``F = where(compute, out - inp, F)`` per sample: the computed samples' residual."""
        F.copy_(select_rows(self.mask, out - inp, F))

    def history(self, calls: int | None = None) -> list[dict]:
        """Per step (``calls`` steps, default every step taken): ``signal_rel_l1`` (None at the
        first step: no reference yet), ``compute`` and the decider's recorded state, as
        Python lists (scalars where one decision covers the batch), read back here, once."""
        n = min(int(self.step) if calls is None else calls, self.steps)
        rel, comp = self.rel_hist[:n].tolist(), self.compute_hist[:n].tolist()
        state = {k: v[:n].tolist() for k, v in self.state_hist.items()}
        return [_entries(None if i == 0 else rel[i], comp[i], {k: v[i] for k, v in state.items()},
                         not self.per_sample) for i in range(n)]
