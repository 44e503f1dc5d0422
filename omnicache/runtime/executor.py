"""The cache executor: our DiT's sampling loop, computing or reusing per step, block, branch.

Classifier-free guidance runs the batch as ``[cond; uncond]`` (``2B`` rows); a *sample*
is its two rows together. Per step the executor embeds, drives the block loop, and asks
the cache core (:class:`omnicache.cache.CacheSession`) what each cache unit does:

- ``step``: one residual for the whole block stack. Compute: ``inp = h``, run every
  block, ``store_residual_(F, D1, h, inp)`` (``F = h - inp``). Reuse:
  ``apply_residual_(h, F, D1, gamma)``, i.e. ``h += F + gamma * D1``.
- ``block``: the same per block.
- ``branch``: attention and MLP separately; ``F`` is the PRE-gate branch output and a
  reuse applies the current step's adaLN gate: ``h += gate * (F + gamma * D1)``. The
  block's modulation is computed every step (cheap) and counted.

**Static plans** become per-step actions before the loop: the loop does no host
synchronisation (:func:`omnicache.runtime.syncguard.no_host_sync`) and ``step_fn(i)``
compiles with ``torch.compile(fullgraph=True)``; statistics stay device tensors until the
summary is read. **Dynamic policies** (``mode="host"``) compute the first blocks, the
decider's declared signal, and take the core's :class:`~omnicache.cache.HostDecisions`
(one host sync per step); the samples that compute run the remaining blocks as a
sub-batch, the others reuse. ``mode="device"``: :meth:`CacheExecutor.device_forward` is
one step's model pass with the decision on the device
(:class:`~omnicache.cache.DeviceDecisions`) and compute-or-reuse through ``torch.cond``
(:func:`~omnicache.cache.compute_or_reuse`; ``"device-where"``: ``torch.where`` alone);
its signature is fixed, so ``torch.compile(ex.device_forward, fullgraph=True)`` compiles
once for the whole run. **ToCa** recomputes a share of each block's tokens between full
steps (:class:`~omnicache.cache.TokenCache`).
"""

from __future__ import annotations

import functools
import time

import torch

from ..cache import COMPUTE, REUSE, STORE, CacheSession, Costs, ResolvedPolicy, RunSummary, compute_or_reuse
from ..filters import filter_delta
from ..plan import CachePlan
from .model import modulate
from .samplers import cfg_batch, cfg_combine, cfg_labels, make_sampler

__all__ = ["CacheExecutor", "RunSummary"]


class CacheExecutor:
    """Sampling with feature caching on a :class:`~omnicache.runtime.model.DiT`.

    Args:
        model: DiT in eval mode; its parameter dtype is the compute dtype.
        labels: ``(B,)`` long class ids on the model's device.
        policy: a :class:`CachePlan`, a policy config (:mod:`omnicache.policies`), or None
            (compute everything).
        steps, sampler: the sampler (``"flow"``, ``"ddim"`` or an object).
        guidance: CFG scale; ``1.0`` runs the conditional rows only.
        granularity: overrides the policy's default cache unit, if given.
        calibrate: ``(config, steps, granularity) -> CachePlan`` for a config fitted on the model
            (OmniCache, Learning-to-Cache) given without a saved plan, e.g.
            :func:`omnicache.runtime.engine.calibrator` (``generate`` passes it); None: such a
            config is refused.
    """

    def __init__(self, model, labels, policy=None, *, steps=50, sampler="flow", guidance=1.0,
                 granularity=None, calibrate=None):
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
        self.policy = ResolvedPolicy(policy, blocks=depth,
                                     granularity=granularity, named_branches=False, calibrate=calibrate,
                                     check=model_check(model), where="omnicache.runtime")
        self.session = CacheSession(self.policy, depth, device=self.device, rows_per_sample=self.rows_per_sample,
                                    filter_setting=self._filter_setting)
        if self.session.kind == "dynamic" and self.policy.decider(steps).motion:
            raise ValueError(f"{type(policy).__name__}.moreg: motion regularisation needs a video model; "
                             f"our DiT generates images")
        self.session.set_steps(steps)
        self.kind, self.granularity, self.policy_name = self.session.kind, self.session.granularity, self.policy.name
        self.ctx = self.session.context(None)
        f, r = self.flops, self.rows
        self.session.costs[None] = Costs(r * (f["embed"] + f["final"]),
                                         [[r * f["block_attn"], r * f["block_mlp"], r * f["block_modulation"]]] * depth,
                                         signal=r * (f["block_modulation"] + 2 * cfg.num_tokens * cfg.hidden_size))
        like = torch.zeros(self.hidden_shape, device=self.device, dtype=self.dtype)
        self._units = {}  # every buffer allocated once, before the loop: a compiled step sees fixed tensors
        if self.kind == "static":
            for u in range(len(self.session.units)):
                if any(acts[u] == REUSE for acts in self.session.actions):
                    self._units[u] = self.session.unit(self.ctx, u, "hidden_states", like)
            self.policy_name = self.session.plan.meta.get("policy", self.policy_name)
        elif self.kind == "dynamic":
            self._units[0] = self.session.unit(self.ctx, 0, "hidden_states", like)
            if self.session.device_mode:
                self.session.device_decisions(self.ctx, like)
        self._wall = None

    # ------------------------------------------------------------------ state
    @property
    def plan(self) -> CachePlan | None:
        """The static plan the run follows (None for dynamic and token policies)."""
        return self.session.plan

    @property
    def cache_units(self) -> dict:
        """The cache core's units (:class:`omnicache.cache.CacheUnit`), by unit index."""
        return self._units

    def cache_tensors(self) -> list:
        """Every buffer held across steps (cache units, incl. filtered drifts)."""
        return [t for unit in self._units.values() for t in unit.tensors()]

    @property
    def cache_bytes(self) -> int:
        """Bytes held across steps: cache buffers, plus a dynamic policy's reference signal."""
        return self.ctx.nbytes

    def reset_cache(self) -> None:
        """A new run: zero every cache buffer, restart the decisions."""
        self.session.restart(self.ctx)

    def set_gamma(self, i: int, gamma: float, gamma2: float) -> None:
        """Change step ``i``'s forecast coefficients in place (the plan and its device scalar)."""
        self.session.set_gamma(i, gamma, gamma2)

    def _filter_setting(self, plan, order):
        """``plan.meta["filter"]`` (stage-aware filtering of D1/D2 over the token grid), checked."""
        setting = plan.meta.get("filter")
        if setting is None:
            return None
        if plan.granularity == "branch":
            raise ValueError("CachePlan.meta.filter: filtering needs granularity 'step' or 'block'")
        setting, tokens = dict(setting), self.hidden_shape[1]
        grid = tuple(setting.pop("grid", ()))
        if len(grid) != 2 or grid[0] * grid[1] != tokens:
            raise ValueError(f"CachePlan.meta.filter.grid: must be [H, W] with H * W = {tokens} tokens, got {list(grid)}")
        try:  # check the cut-offs now, not at the first full step
            filter_delta(torch.zeros(1, tokens, 1), grid, 0.0, **setting)
        except (TypeError, ValueError) as e:
            raise ValueError(f"CachePlan.meta.filter: {e}") from None
        return grid, setting

    # ------------------------------------------------ the step's parts (engine interface for methods)
    def embed(self, i: int, x: torch.Tensor):
        """``(h, c)``: the block stack's input and the conditioning at step ``i`` from latent ``x``."""
        x_model, t = self.sampler.model_input(i, x)
        if self.cfg:
            x_model, t = cfg_batch(x_model), cfg_batch(t)
        h, c = self.model.embed(x_model.to(self.dtype), t, self.y)
        return h.contiguous(), c  # in-place cache ops need a contiguous hidden state

    def finish(self, i: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The next latent from the block stack's output ``h``: final layer, guidance, sampler step."""
        out = self.model.final(h, c).float()
        if self.cfg:
            out = cfg_combine(out, self.guidance)
        return self.sampler.step(i, x, out)

    def step(self, i: int, x: torch.Tensor):
        """Step ``i`` under the policy: ``(x_next, raw statistics)`` (not recorded in the summary)."""
        if self.kind == "static":
            x, stored = self._static_step(i, x)
            return x, {"stored": stored}
        if self.kind == "token":
            return self._token_step(i, x)
        if self.session.device_mode:
            x_model, t = self.sampler.model_input(i, x)
            return self.sampler.step(i, x, self.device_forward(x_model, t)), {}
        return self._dynamic_step(i, x)

    def step_fn(self, i: int):
        """``x -> (x_next, stats)`` for step ``i`` of the static plan (``stats``: the ``[rows, 4]``
        statistics of each unit it stores); every decision in it is a Python constant, so
        ``torch.compile(step_fn(i), fullgraph=True)`` has no graph break."""
        if self.kind != "static":
            raise ValueError("step_fn needs a static plan; dynamic policies decide online")
        return functools.partial(self._static_step, i)

    # --------------------------------------------------------------------- static
    def _static_step(self, i, x):
        h, c = self.embed(i, x)
        acts, (g1, g2), stored = self.session.actions[i], self.session.gammas(i), []
        if self.granularity == "branch":
            for b, blk in enumerate(self.blocks):
                if acts[2 * b] == acts[2 * b + 1] == COMPUTE:
                    h = blk(h, c)
                    continue
                mod = blk.modulation(c)
                for k, gate, branch in ((0, mod[2], blk.attn_branch), (1, mod[5], blk.mlp_branch)):
                    u = 2 * b + k
                    if acts[u] == REUSE:
                        h = self._units[u].reuse_(h, g1, g2, gate=gate)
                        continue
                    out = branch(h, mod)
                    if acts[u] == STORE:
                        self._units[u].store(out)
                    h = h + gate.unsqueeze(1) * out
        else:
            for u, (lo, hi) in enumerate(self.session.units):
                if acts[u] == REUSE:  # h += F + γ1 D1 + γ2 D2 (D1, D2 filtered if the plan filters)
                    self._units[u].reuse_(h, g1, g2)
                    continue
                inp = h
                for blk in self.blocks[lo:hi]:
                    h = blk(h, c)
                if acts[u] == STORE:
                    stored.append(self._units[u].store(h, inp, progress=i / max(self.steps - 1, 1)))
        return self.finish(i, x, h, c), tuple(stored)

    def _token_step(self, i, x):
        """ToCa's step ``i``: every block on every token (full) or on the top share of its
        tokens, the others reusing their cached residual."""
        h, c = self.embed(i, x)
        full, keep = self.session.full[i], self.policy.token_keep(h.shape[1])
        for b, blk in enumerate(self.blocks):
            cache = self.session.tokens(self.ctx, b)
            if full or cache.F is None:
                h = cache.full(blk(h, c), h)
            else:
                h = cache.partial(lambda sub, blk=blk: blk(sub, c), h, keep, self.policy.magnitude_weight)
        return self.finish(i, x, h, c), {}

    # -------------------------------------------------------------------- dynamic
    def _signal(self, h0, h, c):
        """The decider's declared signal: block 0's modulated input, or the first blocks' residual."""
        if self.session.signal == "modulated_input":
            blk = self.blocks[0]
            mod = blk.modulation(c)
            return modulate(blk.norm1(h), mod[0], mod[1])
        return h - h0  # a fresh tensor (h is later updated in place)

    def _dynamic_step(self, i, x):
        """One step under host decisions: the samples that compute run the rest as a sub-batch."""
        h, c = self.embed(i, x)
        h0, (lo, hi), dec, unit = h, self.session.units[0], self.ctx.decisions, self._units[0]
        for blk in self.blocks[:lo]:
            h = blk(h, c)
        compute, some = dec.decide(self._signal(h0, h, c))  # the step's one host sync
        rows = dec.rows
        if rows is None and some:  # every sample computes
            inp = h
            for blk in self.blocks[lo:hi]:
                h = blk(h, c)
            stored = unit.store(h, inp)
        elif rows is None:  # every sample reuses
            unit.reuse_(h)
            stored = None
        else:
            sub = out = h.index_select(0, rows)
            c_sub = c.index_select(0, rows)
            for blk in self.blocks[lo:hi]:
                out = blk(out, c_sub)
            stored = unit.store_rows(rows, out, sub)
            unit.reuse_(h)  # every row; the computed rows are overwritten next
            h.index_copy_(0, rows, out)
        for blk in self.blocks[hi:]:  # DBCache's Bn blocks: every step, on the computed or reused state
            h = blk(h, c)
        partial = [s for s, v in enumerate(compute) if v] if rows is not None else None
        return self.finish(i, x, h, c), {"stored": stored, "rows": partial}

    def device_forward(self, x_model: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``mode="device"``: the model output at one step (guidance applied) from the sampler's
        model input, deciding and caching on the device; no value is read back to the host.
        ``torch.compile(ex.device_forward, fullgraph=True)`` and assign it back
        (``ex.device_forward = ...``) to run compiled."""
        if not self.session.device_mode:
            raise ValueError("device_forward needs a dynamic policy with mode='device'")
        if self.cfg:
            x_model, t = cfg_batch(x_model), cfg_batch(t)
        h, c = self.model.embed(x_model.to(self.dtype), t, self.y)
        h = h.contiguous()
        h0, (lo, hi), dec, F = h, self.session.units[0], self.ctx.decisions, self._units[0].F
        for blk in self.blocks[:lo]:
            h = blk(h, c)
        dec.decide(self._signal(h0, h, c))

        def compute(h, c, F):  # the whole batch; the samples that reuse are mixed back
            for blk in self.blocks[lo:hi]:
                h = blk(h, c)
            return h

        def reuse(h, c, F):
            return h + F

        out = compute_or_reuse(dec, compute, reuse, (h, c, F), where=self.session.mode == "device-where")
        dec.store(F, out, h)  # F = where(compute, out - h, F)
        h = out
        for blk in self.blocks[hi:]:
            h = blk(h, c)
        out = self.model.final(h, c).float()
        return cfg_combine(out, self.guidance) if self.cfg else out

    # ------------------------------------------------------------------------ run
    def init_noise(self, seed: int = 0) -> torch.Tensor:
        cfg = self.model.config
        shape = (self.batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        return self.sampler.init_noise(shape, generator=torch.Generator().manual_seed(seed), device=self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def summary(self, wall_s: float | None = None) -> RunSummary:
        """The last run's summary (a device mode's decisions are read back from the device now);
        ``wall_s``: the wall time of steps driven outside :meth:`run` (e.g. a CUDA-graph replay)."""
        wall = self._wall if wall_s is None else wall_s
        if wall is None:
            raise ValueError("summary(): only after a run (or pass the wall time of the steps you drove)")
        return self.session.summary(wall_s=wall, batch=self.batch)

    @torch.no_grad()
    def run(self, seed: int = 0, x: torch.Tensor | None = None, summary: bool = True):
        """Sample from noise drawn with ``seed`` (or from ``x``); returns ``(x_final, RunSummary)``.

        ``summary=False``: return ``(x_final, None)`` without reading anything back;
        :meth:`summary` reads the decisions later."""
        x = self.init_noise(seed) if x is None else x
        self.reset_cache()  # every run starts from empty (zero) caches
        self._sync()
        t0 = time.perf_counter()
        for i in range(self.steps):
            x, stats = self.step(i, x)
            tokens = self.hidden_shape[1]
            share = 1.0 if self.kind != "token" or self.session.full[i] else self.policy.token_keep(tokens) / tokens
            self.session.record(self.ctx, i, stats, share=share)
        self._sync()
        self._wall = time.perf_counter() - t0
        return x, self.summary() if summary else None


def model_check(model):
    """The plan check of our runtime: a plan calibrated for another model is refused."""
    return lambda plan: plan.check_model(model)
