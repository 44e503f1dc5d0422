"""Dynamic policies with ``mode="host"`` (the default) on a diffusers transformer.

The :class:`.runtime.Runtime` methods for this mode. After the first ``head`` blocks the
signal's relative L1 to the reference is read back (the call's one host sync,
:func:`omnicache.cache.relative_change`, all-reduced over the group under sequence
parallelism) and the decider decides: for the whole batch (as diffusers' own
FirstBlockCache), or per sample with ``enable(..., per_sample=True)``, where the samples
that compute run the remaining blocks as a sub-batch (each block's ``batched`` arguments
``index_select``-ed, :class:`.adapters.BlockIO`) and the others reuse.
"""

from __future__ import annotations

import torch

from ...cache import CacheUnit, relative_change

__all__ = ["HostMode"]


class HostMode:
    """Host-decision dynamic caching (mixed into :class:`.runtime.Runtime`)."""

    def _dynamic_block(self, k, orig, args, kwargs):
        ctx = self.current
        if k < self.head:
            if k == 0:
                self.inp0 = self.bound[0].inputs(args, kwargs)["hidden_states"]
            out = orig(*args, **kwargs)
            if k == self.head - 1:
                self._decide(ctx, self.bound[k].outputs(out)["hidden_states"])
            return out
        if k >= self.n - self.tail:  # DBCache's back blocks: every call, on the computed or reused state
            return orig(*args, **kwargs)
        if not ctx.compute:
            return self._reuse_unit(k, 0, self.bound[k].inputs(args, kwargs), False, False)
        if ctx.rows is not None:
            return self._rows_block(k, orig, args, kwargs)
        if k == self.head:
            self.inp[0] = self.bound[k].inputs(args, kwargs)
        out = orig(*args, **kwargs)
        if k == self.n - self.tail - 1:
            self._store_unit(k, 0, out)
        return out

    def _rows_block(self, k, orig, args, kwargs):
        """Per-sample mode, some samples compute: the block runs on their rows (``index_select``
        of its batched arguments); the other rows reuse, as a whole-batch reuse does (the cached
        residual at the first remaining block, unchanged through the others)."""
        ctx, bb = self.current, self.bound[k]
        rows = ctx.rows
        inputs = bb.inputs(args, kwargs)
        sub_args, sub_kwargs = bb.sub_batch(args, kwargs, rows, ctx.batch)
        out = bb.outputs(orig(*sub_args, **sub_kwargs))
        if k == self.head:
            self.inp[0] = inputs
            base = bb.outputs(self._reuse_unit(k, 0, inputs, False, False))
        else:
            base = inputs
        full = {}
        for name, x in out.items():
            full[name] = None if x is None or base.get(name) is None else base[name].index_copy(0, rows, x)
        if k == self.n - self.tail - 1:  # the computed rows' residual, into their rows of F
            ins = self.inp[0]
            for name, x in out.items():
                cu = ctx.units[0].get(name)
                if x is None or cu is None or ins.get(name) is None:
                    continue
                res = CacheUnit(0)
                res.F = cu.F.index_select(0, rows)
                stats = res.store(x, ins[name].index_select(0, rows))
                cu.F.index_copy_(0, rows, res.F)
                if name == "hidden_states":
                    self.stats_out[0] = stats
            self.inp[0] = None
        return bb.pack(full)

    def _decide(self, ctx, h):
        """Signal, its relative L1 to the reference (over the group), the decision."""
        sig = self.norm1_out if self.teacache else h - self.inp0
        if self.moreg_frames:  # AdaCache's MoReg: the clip's motion at this step (one more host read)
            x = self.inp0.reshape(-1, self.moreg_frames, *self.inp0.shape[1:]).float()
            ctx.decider.observe_motion([((x[:, 1:] - x[:, :-1]).abs().mean() / x.abs().mean().clamp_min(1e-12)).item()])
        self.norm1_out = self.inp0 = None
        if self.per_sample:
            return self._decide_rows(ctx, sig)
        rel = None
        if ctx.ref is not None:  # the call's one host sync
            rel = relative_change(sig, ctx.ref, per_sample=False, group=self.resolve_group())[0]
        ctx.compute = ctx.decider.decide(ctx.step, [rel])[0]
        if not ctx.compute and not ctx.stored[0]:
            ctx.compute = True  # nothing cached yet
        if ctx.compute:
            ctx.stored[0] = True
        if ctx.compute or ctx.decider.ref_every_step:
            ctx.ref = sig
        self.last_rel = rel

    def _decide_rows(self, ctx, sig):
        """Per-sample mode: one decision per sample (batch row), as our runtime's executor takes."""
        batch = sig.shape[0]
        if ctx.batch != batch:  # the first call of a run (or a new batch size): per-sample state
            ctx.decider.start(batch)
            ctx.batch, ctx.row_stored, ctx.ref = batch, [False] * batch, None
        rel = None
        if ctx.ref is not None:  # the call's one host sync
            rel = relative_change(sig, ctx.ref, per_sample=True, group=self.resolve_group())
        dec = [bool(d) or not st for d, st in zip(ctx.decider.decide(ctx.step, rel), ctx.row_stored)]
        ctx.decisions, ctx.compute = dec, any(dec)
        ctx.rows = None
        if ctx.compute and not all(dec):
            ctx.rows = torch.tensor([s for s in range(batch) if dec[s]], device=sig.device)
        ctx.row_stored = [a or d for a, d in zip(ctx.row_stored, dec)]
        if ctx.compute:
            ctx.stored[0] = True
        if ctx.decider.ref_every_step or all(dec):
            ctx.ref = sig
        elif ctx.rows is not None:  # the reference of the samples that computed
            ctx.ref = ctx.ref.index_copy(0, ctx.rows, sig.index_select(0, ctx.rows))
        self.last_rel = rel

    def capture_norm1(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.norm1_out = out.detach()
