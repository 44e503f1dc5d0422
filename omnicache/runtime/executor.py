"""The cache executor: a DiT sampling loop that computes or reuses per step, block, branch.

Classifier-free guidance runs the batch as ``[cond; uncond]`` (``2B`` rows); a *sample*
is its two rows together. Per step the executor embeds, drives the block loop, and
either computes a cache unit (and stores it) or reuses it:

- ``step``: one residual for the whole block stack. Compute: ``inp = h``, run every
  block, ``store_residual_(F, D1, h, inp)`` (``F = h - inp``). Reuse:
  ``apply_residual_(h, F, D1, gamma)``, i.e. ``h += F + gamma * D1``.
- ``block``: the same per block.
- ``branch``: attention and MLP separately; ``F`` is the PRE-gate branch output and a
  reuse applies the current step's adaLN gate: ``h += gate * (F + gamma * D1)``. The
  block's modulation is computed every step (cheap) and counted.

``D1`` (and the second difference ``D2``) exist only when the plan's ``gamma``/``gamma2``
use them (see :mod:`omnicache.plan`). Every buffer is allocated once, contiguous, before
the loop; a unit is stored only when a later step reads it.

**Static plans** (a :class:`CachePlan`) are turned into Python lists of actions before
the loop: the loop does no host synchronisation (checked by
:func:`omnicache.runtime.syncguard.no_host_sync`) and ``step_fn(i)`` compiles with
``torch.compile(fullgraph=True)``; statistics stay device tensors until the summary is read.

**Dynamic policies** (a *decider*, see :mod:`omnicache.policies`) compute the first
``decider.first_blocks`` blocks, a signal tensor (``decider.signal``), its relative L1
``Σ|s - s_ref| / Σ|s_ref|`` to a reference (``rel_l1``, cond and uncond rows summed per
sample: the one host sync per step), and ask ``decider.decide(i, rel)`` per sample.
Samples that compute run the remaining blocks as a sub-batch (``index_select`` /
``index_copy_``); the others reuse the residual of the remaining blocks.

**Dynamic policies, ``mode="device"``** (no host sync): :meth:`CacheExecutor.device_forward`
is one step's model pass with the decision on the device
(:class:`omnicache.cache.DeviceDecisions`: state, threshold test, reference update) and
compute-or-reuse through ``torch.cond``: when any sample computes, the remaining blocks run
on the whole batch and each sample's rows are mixed with ``torch.where`` (the samples that
reuse get ``h + F``, their ``F`` is kept), else every row reuses. The signature is fixed
(``x_model``, ``t`` tensors; the step counter is a device tensor), so
``torch.compile(ex.device_forward, fullgraph=True)`` compiles once for the whole run.
``mode="device-where"`` skips ``torch.cond`` (whose predicate ``torch.cond`` itself reads on
the host outside a CUDA-graph capture): the rest runs every step and ``torch.where`` selects.
Decisions are read back only by the summary; ``RunSummary.flops`` is what the mode spent
(the whole batch whenever one sample computes) and ``flops_sub_batch`` what the host
mode's sub-batches would spend at the same decisions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import torch

from ..cache import (COMPUTE, REUSE, STORE, CacheUnit, DeviceDecisions, RunSummary, TokenCache, plan_order,
                     relative_change, unit_actions)
from ..filters import filter_delta
from ..plan import DEFAULT_BRANCHES, CachePlan
from .device import DeviceMode
from .samplers import cfg_batch, cfg_combine, cfg_labels, make_sampler

__all__ = ["CacheExecutor", "RunSummary"]

class CacheExecutor(DeviceMode):
    """Sampling with feature caching on a :class:`~omnicache.runtime.model.DiT`.

    Args:
        model: DiT in eval mode; its parameter dtype is the compute dtype.
        labels: ``(B,)`` long class ids on the model's device.
        policy: a :class:`CachePlan`, a static policy config (``.plan(steps, blocks,
            granularity)``), a dynamic one (``.decider(steps, blocks, granularity)``), or
            None (compute everything).
        steps, sampler: the sampler (``"flow"``, ``"ddim"`` or an object).
        guidance: CFG scale; ``1.0`` runs the conditional rows only.
        granularity: overrides the policy's default cache unit, if given.
    """

    def __init__(self, model, labels, policy=None, *, steps=50, sampler="flow", guidance=1.0,
                 granularity=None):
        self.model, self.blocks = model, list(model.blocks)
        self.sampler = make_sampler(sampler, steps) if isinstance(sampler, str) else sampler
        if self.sampler.steps != steps:
            raise ValueError(f"steps ({steps}) must equal sampler.steps ({self.sampler.steps})")
        self.steps, self.guidance = steps, float(guidance)
        self.cfg = self.guidance != 1.0
        self.rows_per_sample = 2 if self.cfg else 1
        self.batch = labels.shape[0]
        self.rows = self.batch * self.rows_per_sample
        self.y = cfg_labels(labels, model.config.num_classes) if self.cfg else labels
        self.device, self.dtype = labels.device, next(model.parameters()).dtype
        cfg = model.config
        self.hidden_shape = (self.rows, cfg.num_tokens, cfg.hidden_size)
        self.flops = model.flops_per_sample()
        depth = len(self.blocks)
        if policy is None:
            policy = CachePlan.full(steps, depth)
        if isinstance(policy, CachePlan):
            if granularity is not None and granularity != policy.granularity:
                policy = dataclasses.replace(policy, granularity=granularity)  # validated again
            self.plan, self.decider = policy, None
            policy.check_matches(model, steps)
        elif getattr(policy, "kind", None) not in ("static", "dynamic", "token"):
            raise TypeError(f"policy must be a CachePlan, a policy config or None, got {type(policy).__name__}")
        elif policy.kind == "static":
            if hasattr(policy, "calibrate"):  # plans fitted on the model itself (OmniCache)
                plan = policy.calibrate(model, steps=steps, sampler=sampler, guidance=guidance,
                                        granularity=granularity)
            else:
                plan = policy.plan(steps, depth, granularity=granularity)
            self.plan, self.decider = plan, None
            self.plan.check_matches(model, steps)
        elif policy.kind == "token":  # ToCa: full steps, and steps that recompute a share of the tokens
            self.plan, self.decider = None, None
        else:
            if getattr(policy, "moreg", False):
                raise ValueError(f"{type(policy).__name__}.moreg: motion regularisation needs a video model; "
                                 f"our DiT generates images")
            self.plan, self.decider = None, policy.decider(steps, depth, granularity=granularity)
        self.policy_name = type(policy).__name__.removesuffix("Config")
        self._device, self._device_wall = None, None  # mode="device": the decision's device state
        self.token = policy if self.plan is None and self.decider is None else None
        if self.token is not None:
            self.granularity, self._token_full = "block", policy.full_steps(steps)
            self._cache = {b: TokenCache() for b in range(depth)}
        elif self.plan is not None:
            self.policy_name = self.plan.meta.get("policy", self.policy_name)
            # named branches (PAB, T-GATE): our DiT's blocks have one self-attention and an MLP
            self.plan = self.plan.for_branches(DEFAULT_BRANCHES) if self.plan.granularity == "branch" else self.plan
            self._prepare_static()
        else:
            self._prepare_dynamic()

    # ------------------------------------------------------------------ buffers
    def _zeros(self):
        return torch.zeros(self.hidden_shape, device=self.device, dtype=self.dtype)

    @property
    def cache_units(self) -> dict:
        """The cache core's units (:class:`omnicache.cache.CacheUnit`), by unit key."""
        return self._cache

    def cache_tensors(self) -> list:
        """Every buffer held across steps (cache units, incl. filtered drifts)."""
        return [t for unit in self._cache.values() for t in unit.tensors()]

    @property
    def cache_bytes(self) -> int:
        """Bytes held across steps: cache buffers, plus a dynamic policy's reference signal."""
        ref = self._ref.nbytes if self.decider is not None and self._ref is not None else 0
        if self._device is not None:
            ref = self._device.nbytes
        return ref + sum(unit.nbytes for unit in self._cache.values())

    def _prepare_static(self):
        """Turn the plan into per-step action lists and allocate only the buffers it reads."""
        plan, depth = self.plan, len(self.blocks)
        self.granularity = plan.granularity
        if plan.granularity == "step":
            keys = [0]
            comp = [[row[0][0]] for row in plan.compute]
        elif plan.granularity == "block":
            keys = list(range(depth))
            comp = [[row[b][0] for b in range(depth)] for row in plan.compute]
        else:
            keys = [(b, k) for b in range(depth) for k in (0, 1)]
            comp = [[row[b][k] for b in range(depth) for k in (0, 1)] for row in plan.compute]
        order = plan_order(plan)
        acts = unit_actions(comp, order)
        self._actions = [dict(zip(keys, row)) for row in acts]
        self._filter = self._filter_setting(plan, order)
        like = self._zeros()
        self._cache = {u: CacheUnit(order, self._filter).allocate(like) for n, u in enumerate(keys)
                       if not all(row[n] for row in comp)}
        # gamma as preallocated float32 device scalars (apply_residual_ reads them on device)
        g = torch.tensor([plan.gamma, plan.gamma2], dtype=torch.float32, device=self.device)
        self._gamma = [g[0, i] for i in range(self.steps)]
        self._gamma2 = [g[1, i] for i in range(self.steps)]

    def _filter_setting(self, plan, order):
        """``plan.meta["filter"]`` (stage-aware filtering of D1/D2 over the token grid), checked."""
        setting = plan.meta.get("filter")
        if setting is None or order == 0:
            return None
        if plan.granularity == "branch":
            raise ValueError("CachePlan.meta.filter: filtering needs granularity 'step' or 'block'")
        setting = dict(setting)
        grid = tuple(setting.pop("grid", ()))
        if len(grid) != 2 or grid[0] * grid[1] != self.hidden_shape[1]:
            raise ValueError(f"CachePlan.meta.filter.grid: must be [H, W] with H * W = {self.hidden_shape[1]} "
                             f"tokens, got {list(grid)}")
        try:  # check the cut-offs now, not at the first full step
            filter_delta(torch.zeros(1, self.hidden_shape[1], 1), grid, 0.0, **setting)
        except (TypeError, ValueError) as e:
            raise ValueError(f"CachePlan.meta.filter: {e}") from None
        return grid, setting

    def _prepare_dynamic(self):
        self.granularity = "step"
        self._cache = {"rest": CacheUnit(0).allocate(self._zeros())}
        self._ref = None  # the decider's reference signal (rows, T, D)
        if getattr(self.decider, "mode", "host") in ("device", "device-where"):  # every device buffer, once
            self._device = DeviceDecisions(self.decider, self.steps, self._zeros(), self.batch,
                                           rows_per_sample=self.rows_per_sample)

    # ---------------------------------------------------------------- shared step parts
    # ------------------------------------------------ the engine interface for methods
    # Calibration (OmniCache's γ fits, replays) drives a run step by step through these.
    def embed(self, i: int, x: torch.Tensor):
        """``(h, c)``: the block stack's input and the conditioning at step ``i`` from latent ``x``."""
        return self._embed(i, x)

    def finish(self, i: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The next latent from the block stack's output ``h``: final layer, guidance, sampler step."""
        return self._finish(i, x, h, c)

    def step(self, i: int, x: torch.Tensor):
        """One step of the static plan: ``(x_next, stats)``."""
        return self._static_step(i, x)

    def reset_cache(self) -> None:
        """Zero every cache buffer (a run starts from empty caches)."""
        for unit in self._cache.values():
            unit.reset()
        if self._device is not None:
            self._device.reset()

    def set_gamma(self, i: int, gamma: float, gamma2: float) -> None:
        """Change step ``i``'s forecast coefficients in place (the plan and its device scalar)."""
        self.plan.gamma[i], self.plan.gamma2[i] = float(gamma), float(gamma2)
        self._gamma[i].fill_(float(gamma))
        self._gamma2[i].fill_(float(gamma2))

    def _embed(self, i, x):
        x_model, t = self.sampler.model_input(i, x)
        if self.cfg:
            x_model, t = cfg_batch(x_model), cfg_batch(t)
        h, c = self.model.embed(x_model.to(self.dtype), t, self.y)
        return h.contiguous(), c  # in-place cache ops need a contiguous hidden state

    def _finish(self, i, x, h, c):
        out = self.model.final(h, c).float()
        if self.cfg:
            out = cfg_combine(out, self.guidance)
        return self.sampler.step(i, x, out)

    # --------------------------------------------------------------------- static
    def step_fn(self, i: int):
        """``x -> (x_next, stats)`` for step ``i`` of the static plan; every decision in it is
        a Python constant, so ``torch.compile(step_fn(i), fullgraph=True)`` has no graph break."""
        if self.plan is None:
            raise ValueError("step_fn needs a static plan; dynamic policies decide online")
        return functools.partial(self._static_step, i)

    def _static_step(self, i, x):
        h, c = self._embed(i, x)
        acts, stats = self._actions[i], []
        if self.granularity == "branch":
            for b, blk in enumerate(self.blocks):
                a_act, m_act = acts[(b, 0)], acts[(b, 1)]
                if a_act == m_act == COMPUTE:
                    h = blk(h, c)
                    continue
                mod = blk.modulation(c)
                h = self._branch(i, (b, 0), a_act, h, mod, mod[2], blk.attn_branch)
                h = self._branch(i, (b, 1), m_act, h, mod, mod[5], blk.mlp_branch)
        else:
            segments = [(0, len(self.blocks), 0)] if self.granularity == "step" else \
                [(b, b + 1, b) for b in range(len(self.blocks))]
            for lo, hi, u in segments:
                if acts[u] == REUSE:
                    self._reuse_residual(i, u, h)
                    continue
                inp = h
                for blk in self.blocks[lo:hi]:
                    h = blk(h, c)
                if acts[u] == STORE:
                    stats.append(self._store_residual(i, u, h, inp))
        return self._finish(i, x, h, c), tuple(stats)

    def _token_step(self, i, x):
        """ToCa's step ``i``: every block on every token (full) or on the top share of its
        tokens, the others reusing their cached residual (:class:`omnicache.cache.TokenCache`)."""
        h, c = self._embed(i, x)
        for b, blk in enumerate(self.blocks):
            cache = self._cache[b]
            if self._token_full[i] or cache.F is None:
                h = cache.full(blk(h, c), h)
            else:
                h = cache.partial(lambda sub, blk=blk: blk(sub, c), h, self._token_keep, self.token.magnitude_weight)
        return self._finish(i, x, h, c), ()

    @property
    def _token_keep(self) -> int:
        return max(1, math.ceil((1.0 - self.token.ratio) * self.model.config.num_tokens))

    def _reuse_residual(self, i, u, h):
        """``h += F + gamma * D1 + gamma2 * D2`` in place (D1, D2 filtered if the plan filters)."""
        self._cache[u].reuse_(h, *self._gammas(i))

    def _gammas(self, i):
        """Step ``i``'s ``(γ1, γ2)`` as device scalars, None where the plan's term is 0."""
        return (self._gamma[i] if self.plan.gamma[i] else None, self._gamma2[i] if self.plan.gamma2[i] else None)

    def _store_residual(self, i, u, out, inp):
        """``F = out - inp``; ``D1 = F_new - F_old``; ``D2 = D1_new - D1_old``; returns [rows, 4] stats."""
        return self._cache[u].store(out, inp, progress=i / max(self.steps - 1, 1))

    def _branch(self, i, u, act, h, mod, gate, branch):
        """One branch: compute ``h + gate * branch(h, mod)`` (storing the pre-gate output), or reuse."""
        if act == REUSE:
            return self._cache[u].reuse_(h, *self._gammas(i), gate=gate)
        out = branch(h, mod)
        if act == STORE:
            self._cache[u].store(out)
        return h + gate.unsqueeze(1) * out

    # -------------------------------------------------------------------- dynamic
    def _dynamic_step(self, i, x):
        """One step under a decider; returns ``(x_next, rows that ran the rest, stats)``."""
        dec, B, R = self.decider, self.batch, self.rows_per_sample
        h, c = self._embed(i, x)
        h0 = h
        mid, back = self._middle_back()
        for blk in self.blocks[: dec.first_blocks]:
            h = blk(h, c)
        sig = dec.signal(self.model, h0, h, c)  # a fresh tensor (h is later updated in place)
        rel = None
        if self._ref is not None:
            rel = relative_change(sig, self._ref, rows_per_sample=R)  # the step's one host sync
        compute = dec.decide(i, rel)
        samples = [s for s in range(B) if compute[s]]
        unit = self._cache["rest"]
        F = unit.F
        if len(samples) == B:
            inp = h
            for blk in mid:
                h = blk(h, c)
            store = unit.store(h, inp)
            self._ref = sig
        elif not samples:
            unit.reuse_(h)
            store = None
            if dec.ref_every_step:
                self._ref = sig
        else:
            rows = torch.tensor([s + r * B for r in range(R) for s in samples])
            if rows.device != self.device:  # pinned + non_blocking: no second sync on CUDA
                rows = rows.pin_memory().to(self.device, non_blocking=True)
            sub, c_sub = h.index_select(0, rows), c.index_select(0, rows)
            out = sub
            for blk in mid:
                out = blk(out, c_sub)
            res = CacheUnit(0)
            res.F = F.index_select(0, rows)
            store = (samples, res.store(out, sub))
            unit.reuse_(h)  # every row; the computed rows are overwritten next
            h.index_copy_(0, rows, out)
            F.index_copy_(0, rows, res.F)
            if dec.ref_every_step:
                self._ref = sig
            else:
                self._ref.index_copy_(0, rows, sig.index_select(0, rows))
        for blk in back:  # DBCache's Bn blocks: every step, on the computed or reused state
            h = blk(h, c)
        stats = {"signal_rel_l1": rel, "compute": compute, **dec.record(), "residual_rel_l1": store}
        return self._finish(i, x, h, c), len(samples) * R, stats

    def _middle_back(self):
        """The blocks a dynamic policy caches (after its first blocks) and the back blocks it
        always computes (``last_blocks``, DBCache's Bn; none for the other policies)."""
        dec, n = self.decider, len(self.blocks)
        last = getattr(dec, "last_blocks", 0)
        return self.blocks[dec.first_blocks: n - last], self.blocks[n - last:]

    # ------------------------------------------------------------------------ run
    def init_noise(self, seed: int = 0) -> torch.Tensor:
        cfg = self.model.config
        shape = (self.batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        return self.sampler.init_noise(shape, generator=torch.Generator().manual_seed(seed), device=self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def summary(self) -> RunSummary:
        """``mode="device"``: the last run's summary (its decisions read back from the device now)."""
        if self._device is None or self._device_wall is None:
            raise ValueError("summary(): only after a run with a dynamic policy in mode='device'")
        return self._device_summary(self._device_wall)

    @torch.no_grad()
    def run(self, seed: int = 0, x: torch.Tensor | None = None, summary: bool = True):
        """Sample from noise drawn with ``seed`` (or from ``x``); returns ``(x_final, RunSummary)``.

        ``summary=False`` (``mode="device"``): return ``(x_final, None)`` without reading anything
        back; :meth:`summary` reads the decisions later."""
        x = self.init_noise(seed) if x is None else x
        self.reset_cache()  # every run starts from empty (zero) caches
        f, depth, rows, steps = self.flops, len(self.blocks), self.rows, self.steps
        raw, ran_rest = [], []
        self._sync()
        t0 = time.perf_counter()
        if self._device is not None:  # no host sync until the summary
            for i in range(steps):
                x_model, t = self.sampler.model_input(i, x)
                x = self.sampler.step(i, x, self.device_forward(x_model, t))
            self._sync()
            self._device_wall = time.perf_counter() - t0
            return x, self.summary() if summary else None
        if self.plan is not None or self.token is not None:
            step = self._static_step if self.token is None else self._token_step
            for i in range(steps):
                x, stats = step(i, x)
                raw.append(stats)
        else:
            self._ref = None
            self.decider.start(self.batch)
            for i in range(steps):
                x, n_rows, stats = self._dynamic_step(i, x)
                ran_rest.append(n_rows)
                raw.append(stats)
        self._sync()
        wall = time.perf_counter() - t0

        uncached = float(steps * rows * f["total"])
        if self.plan is not None:
            flops = self.plan.compute_fraction(f) * uncached
            decisions = self.plan.compute_tensor().float()
        elif self.token is not None:  # a partial step runs the share of the tokens through every block
            share = [1.0 if full else self._token_keep / self.model.config.num_tokens for full in self._token_full]
            block = f["block_attn"] + f["block_mlp"] + f["block_modulation"]
            flops = float(rows * sum(f["embed"] + f["final"] + depth * block * s for s in share))
            decisions = torch.tensor(share, dtype=torch.float32)[:, None, None].expand(steps, depth, 2).clone()
        else:
            dec = self.decider
            block = f["block_attn"] + f["block_mlp"] + f["block_modulation"]
            last = getattr(dec, "last_blocks", 0)
            per_step = f["embed"] + f["final"] + (dec.first_blocks + last) * block + \
                dec.signal_flops(f, self.model.config)
            flops = float(steps * rows * per_step + sum(ran_rest) * (depth - dec.first_blocks - last) * block)
            decisions = torch.ones(steps, depth, 2)
            decisions[:, dec.first_blocks: depth - last] = \
                torch.tensor(ran_rest, dtype=torch.float32)[:, None, None] / rows
        return x, RunSummary(self.policy_name, self.granularity, decisions, flops, uncached, wall,
                             self.cache_bytes, self.batch, self.rows_per_sample, raw)
