"""Dynamic policies with ``mode="device"`` on a diffusers transformer: no host sync.

The :class:`.runtime.Runtime` methods for this mode, kept apart from the host mode's
(:meth:`Runtime._dynamic_block` / ``_decide``). The decision is the cache core's
:class:`omnicache.cache.DeviceDecisions` (the same code as our runtime's executor): after
the first ``head`` blocks, the signal's relative L1 to the reference, the decider's state
and threshold test, the reference update, all device tensors. Each remaining block then
runs inside ``torch.cond(any sample computes, ...)`` (the model's own block loop calls each
block, so there is one ``torch.cond`` per remaining block):

- compute: the block runs on the whole batch; with ``per_sample=True`` the rows of the
  samples that reuse are replaced by what they reuse (``torch.where``,
  :func:`omnicache.cache.select_rows`);
- reuse: the first remaining block returns ``inp + F`` per cached stream, the others their
  inputs unchanged (as the host mode's reuse).

``mode="device-where"``: no ``torch.cond`` (outside a CUDA-graph capture ``torch.cond`` reads
its predicate on the host: the dense kernel's ``if pred``, inductor's ``pred.item()``); every
block runs and ``torch.where`` selects, per sample or for the whole batch: no read at all, at
the full compute's FLOPs.

After the last block, ``F = where(compute, out - inp, F)`` per stream. The first call of a
context (nothing stored: every sample computes) runs the blocks directly and allocates the
buffers: it is its own forward variant (:mod:`.install`), so a compiled transformer compiles
it once and the steady state once, with no recompile from step to step. The step counter is
a device tensor; the decisions are read back by :meth:`Runtime.summary` only.

FLOPs: ``compute_fraction`` counts what the mode spends (every row of the remaining blocks
whenever one sample computes); ``RunSummary.flops_sub_batch`` what ``per_sample`` sub-batches
would spend at the same decisions.
"""

from __future__ import annotations

import torch

from ...cache import CacheUnit, DeviceDecisions, select_rows

__all__ = ["DeviceMode"]


def _plain(x):
    """A fresh contiguous copy: both ``torch.cond`` branches must return the same layout
    (Flux's single block returns views at an offset into one concatenated tensor) and none
    may alias an input. One copy of the stream per remaining block and step."""
    return x.clone(memory_format=torch.contiguous_format)


class DeviceMode:
    """Mixed into :class:`.runtime.Runtime`: the ``mode="device"`` half of dynamic policies."""

    def _device_block(self, k, orig, args, kwargs):
        ctx, bb = self.current, self.bound[k]
        if k < self.head:
            if k == 0:
                self.inp0 = bb.inputs(args, kwargs)["hidden_states"]
            out = orig(*args, **kwargs)
            if k == self.head - 1:
                self._device_decide(ctx, bb.outputs(out)["hidden_states"])
            return out
        if k >= self.n - self.tail:  # DBCache's back blocks: every call
            return orig(*args, **kwargs)
        inputs = bb.inputs(args, kwargs)
        if k == self.head:
            self.inp[0] = inputs
        if self.device_first:  # nothing stored yet: every sample computes
            out = bb.outputs(orig(*args, **kwargs))
        else:
            out = self._device_cond(k, orig, args, kwargs, inputs)
        if k == self.n - self.tail - 1:
            self._device_store(ctx, out)
        return bb.pack(out)

    def _device_cond(self, k, orig, args, kwargs, inputs):
        """The block's outputs through ``torch.cond``: computed (mixed per sample) or reused."""
        bb, units, mask = self.bound[k], self.current.units[0], self.device_mask
        names = [n for n, x in inputs.items() if x is not None]

        def reused():
            if k != self.head:
                return {n: inputs[n] for n in names}
            return {n: inputs[n] + units[n].F if n in units else inputs[n] for n in names}

        def compute(mask):
            out = bb.outputs(orig(*args, **kwargs))
            if not self.per_sample:  # one decision for the whole batch: the block's output
                return {n: _plain(out[n] if out.get(n) is not None else inputs[n]) for n in names}
            back = reused()
            return {n: select_rows(mask, out[n], back[n]) if out.get(n) is not None else _plain(back[n])
                    for n in names}

        def reuse(mask):
            return {n: _plain(x) for n, x in reused().items()}

        if self.device_where:  # mode="device-where": no predicate; computed, then selected per sample
            out = bb.outputs(orig(*args, **kwargs))
            back = reused()
            return {n: select_rows(mask, out[n], back[n]) if out.get(n) is not None and n in back else back.get(n)
                    for n in inputs}
        result = torch.cond(self.device_any, compute, reuse, (mask,))
        return {n: result.get(n) for n in inputs}

    def _device_store(self, ctx, out):
        """``F = where(compute, out - inp, F)`` per cached stream (allocated at the first call)."""
        ins, mask = self.inp[0], self.device_mask
        for name, x in out.items():
            if x is None or ins.get(name) is None:
                continue
            units = ctx.units[0]
            if name not in units:
                units[name] = CacheUnit(0).allocate(x)
            F = units[name].F
            F.copy_(select_rows(mask, x - ins[name], F))
        self.inp[0] = None

    def _device_decide(self, ctx, h):
        sig = self.norm1_out if self.teacache else h - self.inp0
        self.norm1_out = self.inp0 = None
        self.device_first = ctx.device is None
        if self.device_first:  # the run's first call: allocate the decision's buffers
            if self.steps is None:
                raise RuntimeError("omnicache: mode='device' needs the number of steps before the first call; "
                                   "pass enable(..., steps=N) or call the pipeline")
            samples = sig.shape[0] if self.per_sample else 1
            ctx.device = DeviceDecisions(ctx.decider, self.steps, sig, samples, per_sample=self.per_sample,
                                         group=self.resolve_group())
        self.device_mask, self.device_any = ctx.device.decide(sig)

    def _device_restart(self, ctx):
        """A new run: the decision's state (not its history, which the summary may still read)
        back to zero; a different number of steps reallocates at the next call."""
        if ctx.device is not None:
            if ctx.device.steps != self.steps:
                ctx.device = None
            else:
                ctx.device.restart()

    def _device_resolve(self, ctx):
        """Fill the context's trace and stats (placeholders until now) from the device history:
        the one read-back. Returns ``(spent, sub_batch, uncached)`` FLOPs of its calls, or None
        when the blocks' costs were never counted (a compiled first call)."""
        hist = ctx.device.history(len(ctx.trace)) if ctx.device is not None else []
        spent = sub = uncached = 0.0
        cost = self.block_cost
        known = all(c is not None for c in cost)
        for n, d in enumerate(hist):
            comp = d["compute"]
            frac = sum(comp) / len(comp)
            end = self.n - self.tail
            ctx.trace[n] = [True if b < self.head or b >= end else (frac if self.per_sample else bool(comp[0]))
                            for b in range(self.n)]
            extra = {key: v for key, v in d.items() if key not in ("signal_rel_l1", "compute")}
            if self.per_sample:
                st = {"signal_rel_l1": d["signal_rel_l1"], "compute": list(comp), **extra}
            else:
                rel = d["signal_rel_l1"]
                st = {"signal_rel_l1": None if rel is None else rel[0], "compute": bool(comp[0]), **extra}
            ctx.stats[n] = {**st, "residual": ctx.stats[n]["residual"]}
            if known:
                outside = self.outside_cost or 0
                head = sum(cost[: self.head]) + sum(cost[end:])  # the blocks every call runs
                rest = sum(cost[self.head: end])
                uncached += outside + head + rest
                spent += outside + head + (rest if any(comp) or self.device_where else 0)
                sub += outside + head + frac * rest
        return (spent, sub, uncached) if known and hist else None
