"""Dynamic policies with ``mode="device"`` on the cache executor: the decision on the device,
compute-or-reuse through ``torch.cond``, no host synchronisation (see
:mod:`omnicache.runtime.executor`'s module docstring)."""

from __future__ import annotations

import torch

from ..cache import RunSummary, select_rows
from .samplers import cfg_batch, cfg_combine

__all__ = ["DeviceMode"]


class DeviceMode:
    """``mode="device"`` / ``"device-where"`` (mixed into :class:`.executor.CacheExecutor`)."""

    def device_forward(self, x_model: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``mode="device"``: the model output at one step (guidance applied) from the sampler's
        model input, deciding and caching on the device; no value is read back to the host.

        The remaining blocks run inside ``torch.cond(any sample computes, ...)``; see the module
        docstring. ``torch.compile(ex.device_forward, fullgraph=True)`` and assign it back
        (``ex.device_forward = ...``) to run compiled."""
        if self._device is None:
            raise ValueError("device_forward needs a dynamic policy with mode='device'")
        dec, dd = self.decider, self._device
        if self.cfg:
            x_model, t = cfg_batch(x_model), cfg_batch(t)
        h, c = self.model.embed(x_model.to(self.dtype), t, self.y)
        h = h.contiguous()
        h0 = h
        for blk in self.blocks[: dec.first_blocks]:
            h = blk(h, c)
        compute, any_compute = dd.decide(dec.signal(self.model, h0, h, c))
        F = self._cache["rest"].F
        rest, back = self._middle_back()

        def run_rest(h, c, F, compute):  # the whole batch; the samples that reuse are mixed back
            out = h
            for blk in rest:
                out = blk(out, c)
            return select_rows(compute, out, h + F), select_rows(compute, out - h, F)

        def reuse(h, c, F, compute):
            return h + F, F.clone()

        if self.decider.mode == "device-where":  # no predicate to read: always compute, then select
            h, F_new = run_rest(h, c, F, compute)
        else:
            h, F_new = torch.cond(any_compute, run_rest, reuse, (h, c, F, compute))
        F.copy_(F_new)
        for blk in back:
            h = blk(h, c)
        out = self.model.final(h, c).float()
        return cfg_combine(out, self.guidance) if self.cfg else out

    def _device_summary(self, wall):
        """The device mode's summary: decisions read back here, once."""
        f, depth, rows, R = self.flops, len(self.blocks), self.rows, self.rows_per_sample
        dec, steps = self.decider, self.steps
        hist = self._device.history(steps)
        block = f["block_attn"] + f["block_mlp"] + f["block_modulation"]
        last = getattr(dec, "last_blocks", 0)
        per_step = f["embed"] + f["final"] + (dec.first_blocks + last) * block + dec.signal_flops(f, self.model.config)
        n_comp = [sum(d["compute"]) for d in hist]
        rest = (depth - dec.first_blocks - last) * block
        where = dec.mode == "device-where"  # the rest runs every step
        flops = float(steps * rows * per_step + sum(rows for n in n_comp if n or where) * rest)
        sub = float(steps * rows * per_step + sum(n * R for n in n_comp) * rest)
        decisions = torch.ones(steps, depth, 2)
        decisions[:, dec.first_blocks: depth - last] = torch.tensor(n_comp, dtype=torch.float32)[:, None, None] / self.batch
        raw = [{**d, "residual_rel_l1": None} for d in hist]
        return RunSummary(self.policy_name, self.granularity, decisions, flops, float(steps * rows * f["total"]),
                          wall, self.cache_bytes, self.batch, R, raw, flops_sub_batch=sub)
