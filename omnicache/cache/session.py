"""The caching state of one model under one policy, for any engine.

An engine drives its model (our executor its own block loop; diffusers the model's
``forward``, through block wrappers) and, at each cache unit, asks a
:class:`CacheSession` what to do and hands it what it computed. The session holds what
every engine needs and no engine writes again:

- the resolved policy (:class:`.policy.ResolvedPolicy`) and, for a static plan, its
  per-step actions (:func:`.units.unit_actions`) and γ as device scalars;
- the cache units: a span of blocks each (``step`` granularity: the whole stack where one
  residual may span it; ``block``: each block; a dynamic policy: the blocks after its
  first ones and before its last ones), or each block's branches (``branch``: unit
  ``nb·b + k``, branch ``k`` of block ``b``);
- per cache context (:class:`CacheContext`; a pipeline's ``"cond"`` / ``"uncond"``, our
  runtime's one): the buffers (:class:`.units.CacheUnit`, per unit and stream), ToCa's
  per-token caches, the dynamic decisions (:mod:`.decisions`), and what each step did;
- the accounting: per step, the share of rows that computed each branch and ran each
  part, FLOPs by :func:`.summary.spent_flops`, and the :class:`.summary.RunSummary`.
"""

from __future__ import annotations

import dataclasses

import torch

from .decisions import DeviceDecisions, HostDecisions
from .policy import FOREVER, ResolvedPolicy
from .summary import Costs, RunSummary, resolve_stats, spent_flops
from .units import REUSE, STORE, CacheUnit, TokenCache, plan_order, unit_actions

__all__ = ["CacheContext", "CacheSession"]


@dataclasses.dataclass
class _Call:
    """One step of one context: per block, the share of rows that computed each branch
    (``computed``) and ran each part (``ran``: FLOPs), its raw statistics, its costs' key."""

    computed: list | None
    ran: list | None
    stats: dict
    key: object = None
    sub_batch: list | None = None  # device mode: what the host mode's sub-batches would run


class CacheContext:
    """One cache context's state (see the module docstring)."""

    def __init__(self, name):
        self.name, self.step = name, 0
        self.units: dict = {}  # (unit, stream) -> CacheUnit
        self.tokens: dict = {}  # unit -> TokenCache
        self.stored: list = []  # static: per unit, a value stored this run
        self.decisions = None  # HostDecisions | DeviceDecisions (dynamic policies)
        self.log: list = []  # this run's calls (the last run's, once it ended)

    @property
    def nbytes(self) -> int:
        held = sum(u.nbytes for u in self.units.values()) + sum(t.nbytes for t in self.tokens.values())
        return held + (self.decisions.nbytes if self.decisions is not None else 0)


class CacheSession:
    """Args:
        policy: a :class:`ResolvedPolicy`.
        blocks: the model's blocks, in the order its forward runs them.
        stack: one residual may span several blocks (False where the model changes its token
            layout between blocks: ``step`` plans then run per block).
        min_head: blocks a dynamic policy always computes first, at least (diffusers: 1, its
            signal is read inside block 0).
        rows_per_sample, per_sample, group: the dynamic decisions' layout (rows of a sample in a
            call, one decision per sample or per call, the process group of a sharded sequence, or
            a function returning it when a run's decisions are made).
        filter_setting: ``(plan, order) -> (grid, setting) | None``: the engine's reading of a
            plan's stage-aware filtering (``CachePlan.meta["filter"]``).
    """

    def __init__(self, policy: ResolvedPolicy, blocks: int, *, device=None, stack: bool = True, min_head: int = 0,
                 rows_per_sample: int = 1, per_sample: bool = True, group=None, filter_setting=None):
        self.policy, self.n, self.kind, self.device = policy, blocks, policy.kind, device
        self.granularity, self.branches, self.nb = policy.granularity, policy.branches, len(policy.branches)
        self.rows_per_sample, self.per_sample, self.group = rows_per_sample, per_sample, group
        self.filter_setting = filter_setting
        self.mode = "host"
        self.head = self.tail = 0
        if self.kind == "dynamic":
            dec = policy.decider(FOREVER)
            self.mode, self.signal, self.tail = dec.mode, dec.signal, dec.last_blocks
            self.head = max(dec.first_blocks, min_head)
            if self.head >= blocks - self.tail:
                raise ValueError(f"{type(policy.policy).__name__}: the first {self.head} and last {self.tail} blocks "
                                 f"leave none of the model's {blocks} blocks to cache")
            self.units = [(self.head, blocks - self.tail)]
        elif self.granularity == "step" and stack:
            self.units = [(0, blocks)]
        elif self.granularity == "branch":
            self.units = [(b, b + 1) for b in range(blocks) for _ in self.branches]
        else:  # per block (also step plans on models that change their layout between blocks)
            self.units = [(b, b + 1) for b in range(blocks)]
        self.unit_of = [0] * blocks if len(self.units) == 1 else \
            [self.nb * b for b in range(blocks)] if self.granularity == "branch" else list(range(blocks))
        self.device_mode = self.mode in ("device", "device-where")
        self.steps = self.plan = self.actions = self.full = None
        self.order, self.filter = 0, None
        self.contexts: dict = {}
        self.costs: dict = {}  # costs key -> Costs
        self.wall_s, self.batch = 0.0, 0

    # ------------------------------------------------------------------ runs
    def set_steps(self, steps: int) -> None:
        """Build what a run of ``steps`` follows (a static plan's actions and γ) and start a new
        run in every context."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        if self.kind == "static":
            plan = self.plan = self.policy.plan(steps)
            self.order = plan_order(plan)
            self.filter = self.filter_setting(plan, self.order) if self.filter_setting and self.order else None
            if self.granularity == "branch":
                comp = [[row[b][k] for b in range(self.n) for k in range(self.nb)] for row in plan.compute]
            else:
                comp = [[row[lo][0] for lo, _ in self.units] for row in plan.compute]
            self.actions = [tuple(row) for row in unit_actions(comp, self.order)]
            # one float32 scalar per step, each its own storage (read on the device only)
            self.gamma = [torch.tensor(g, dtype=torch.float32, device=self.device) for g in plan.gamma]
            self.gamma2 = [torch.tensor(g, dtype=torch.float32, device=self.device) for g in plan.gamma2]
        elif self.kind == "token":
            self.full = self.policy.full_steps(steps)
        for ctx in self.contexts.values():
            self.restart(ctx)

    def restart(self, ctx: CacheContext, keep_log: bool = False) -> None:
        """A new run in ``ctx``: step 0, empty (zero) caches, fresh decisions."""
        ctx.step = 0
        ctx.stored = [False] * len(self.units)
        if not keep_log:
            ctx.log = []
        for unit in ctx.units.values():
            unit.reset()
        for cache in ctx.tokens.values():
            cache.reset()
        if self.kind == "dynamic":
            if isinstance(ctx.decisions, DeviceDecisions) and ctx.decisions.steps == self.steps:
                ctx.decisions.restart()  # its history stays: a summary may still read it
            elif not self.device_mode:
                samples = ctx.decisions.samples if ctx.decisions is not None else 1
                ctx.decisions = HostDecisions(self.policy.decider(self.steps or FOREVER), samples,
                                              rows_per_sample=self.rows_per_sample, per_sample=self.per_sample,
                                              group=self._group())
            else:
                ctx.decisions = None  # allocated by the run's first call (device_decisions)

    def _group(self):
        return self.group() if callable(self.group) else self.group

    def context(self, name) -> CacheContext:
        ctx = self.contexts.get(name)
        if ctx is None:
            ctx = self.contexts[name] = CacheContext(name)
            self.restart(ctx)
        return ctx

    def device_decisions(self, ctx: CacheContext, signal: torch.Tensor) -> DeviceDecisions:
        """``mode="device"``: the context's decisions, allocated once a run knows the signal's shape."""
        if ctx.decisions is None:
            if self.steps is None:
                raise RuntimeError("omnicache: mode='device' needs the number of steps before the first call")
            samples = signal.shape[0] // self.rows_per_sample if self.per_sample else 1
            ctx.decisions = DeviceDecisions(self.policy.decider(self.steps), self.steps, signal, samples,
                                            rows_per_sample=self.rows_per_sample, per_sample=self.per_sample,
                                            group=self._group())
        return ctx.decisions

    # ------------------------------------------------------------------ static plans
    def step_actions(self, ctx: CacheContext, i: int) -> tuple:
        """Step ``i``'s action per unit; a reuse of a unit this context never stored is an error."""
        acts = self.actions[i]
        for u, a in enumerate(acts):
            if a == REUSE and not ctx.stored[u]:
                raise RuntimeError(f"omnicache: the plan reuses unit {u} at step {i} of context {ctx.name!r} "
                                   f"before computing it")
        return acts

    def gammas(self, i: int) -> tuple:
        """Step ``i``'s ``(γ1, γ2)`` as device scalars, None where the plan's term is 0."""
        return (self.gamma[i] if self.plan.gamma[i] else None, self.gamma2[i] if self.plan.gamma2[i] else None)

    def set_gamma(self, i: int, gamma: float, gamma2: float) -> None:
        """Change step ``i``'s coefficients in place (the plan and its device scalars)."""
        self.plan.gamma[i], self.plan.gamma2[i] = float(gamma), float(gamma2)
        self.gamma[i].fill_(float(gamma))
        self.gamma2[i].fill_(float(gamma2))

    def unit(self, ctx: CacheContext, u: int, stream, like: torch.Tensor, layout=None) -> CacheUnit:
        """Unit ``u``'s buffers for ``stream`` in ``ctx``, allocated like ``like`` when missing or
        of another shape (another batch size or resolution); ``layout``: the unit's
        ``(to_grid, from_grid)`` when its tokens are not laid out ``[B, grid tokens, D]``."""
        cu = ctx.units.get((u, stream))
        if cu is None or cu.F.shape != like.shape:
            filt = None
            if self.filter is not None and stream == "hidden_states":
                filt = (*self.filter, layout)
            cu = ctx.units[(u, stream)] = CacheUnit(self.order if self.kind == "static" else 0, filt).allocate(like)
        return cu

    def tokens(self, ctx: CacheContext, u: int) -> TokenCache:
        return ctx.tokens.setdefault(u, TokenCache())

    # ------------------------------------------------------------------ what a step did
    def record(self, ctx: CacheContext, i: int, stats: dict | None = None, *, share=None, key=None,
               measured: bool = False) -> None:
        """What step ``i`` of ``ctx`` did, from the policy's actions or decisions, with its raw
        statistics and costs' key. ``share``: the share of tokens a ToCa step ran (per block, or
        one for all); ``measured``: the key's costs are those of this very call (a ToCa partial
        step measured as it ran), so every part counts once."""
        n, nb, stats = self.n, self.nb, dict(stats or {})
        computed = ran = None
        if self.kind == "static":
            acts = self.actions[i]
            if self.granularity == "branch":  # the block's own code (modulation, gates) always runs
                computed = [[acts[nb * b + k] != REUSE for k in range(nb)] for b in range(n)]
                ran = [c + [True] for c in computed]
            else:
                computed = [[acts[self.unit_of[b]] != REUSE] * nb for b in range(n)]
                ran = [c + c[:1] for c in computed]
            for u, a in enumerate(acts):
                ctx.stored[u] = ctx.stored[u] or a == STORE
            stats["gamma"] = self.plan.gamma[i]
        elif self.kind == "token":
            shares = share if isinstance(share, (list, tuple)) else [share] * n
            computed = [[s] * nb for s in shares]
            ran = [[1.0 if measured else s] * (nb + 1) for s in shares]
            stats["full"] = bool(self.full[i])
        elif not self.device_mode:  # the device mode's are read back from its history (summary)
            dec = ctx.decisions.history[-1]["compute"]
            frac = dec if isinstance(dec, bool) else sum(dec) / len(dec)
            lo, hi = self.units[0]
            computed = [[1.0 if b < lo or b >= hi else frac] * nb for b in range(n)]
            ran = [c + c[:1] for c in computed]
            stats = {**ctx.decisions.history[-1], **stats}
        if i == 0:  # a new run: what the last one did is gone
            ctx.log = []
        while len(ctx.log) <= i:
            ctx.log.append(None)
        ctx.log[i] = _Call(computed, ran, stats, key)

    def end_call(self, ctx: CacheContext) -> None:
        """A context's call is over: its step advances; after the last step the run ends (state
        restarted, what it did kept for the summary)."""
        ctx.step += 1
        if self.steps is not None and ctx.step == self.steps:
            self.restart(ctx, keep_log=True)

    # ------------------------------------------------------------------ summary
    def _device_calls(self, ctx: CacheContext) -> None:
        """A device-mode context's calls, filled in from its decisions' history (the one read-back;
        steps driven outside the engine's loop, e.g. a CUDA-graph replay, included)."""
        dd = ctx.decisions
        hist = dd.history(max(len(ctx.log), int(dd.step))) if dd is not None else []
        key = next((c.key for c in ctx.log if c is not None), None)
        ctx.log[len(hist):] = []
        ctx.log += [_Call(None, None, {}, key) for _ in range(len(hist) - len(ctx.log))]
        lo, hi = self.units[0]
        where = self.mode == "device-where"
        for call, d in zip(ctx.log, hist):
            comp = d["compute"]
            frac = comp if isinstance(comp, bool) else sum(comp) / len(comp)
            spent = 1.0 if where or frac else 0.0  # the rest runs on every row when one sample computes
            call.computed = [[1.0 if b < lo or b >= hi else frac] * self.nb for b in range(self.n)]
            call.ran = [[1.0 if b < lo or b >= hi else spent] * (self.nb + 1) for b in range(self.n)]
            call.stats = {**d, **call.stats, "stored": None}
            call.sub_batch = [[1.0 if b < lo or b >= hi else frac] * (self.nb + 1) for b in range(self.n)]

    def _context_summary(self, ctx: CacheContext, batch: int) -> dict:
        calls = [c for c in ctx.log if c is not None]
        signal = self.kind == "dynamic" and self.signal == "modulated_input"
        costs = [self.costs.get(c.key) for c in calls]
        known = bool(calls) and all(c is not None for c in costs)
        spent = sum(spent_flops(k, c.ran, signal) for k, c in zip(costs, calls)) if known else None
        uncached = sum(k.uncached for k in costs) if known else None
        sub = sum(spent_flops(k, c.sub_batch, signal) for k, c in zip(costs, calls)) \
            if known and self.device_mode else None
        trace = [[c[0] if self.granularity != "branch" else any(c) for c in call.computed] for call in calls]
        n_all = len(trace) * self.n
        scalar = not self.per_sample  # one value per call where the decisions are not per sample
        out = _LazyStats(trace=trace, flops=spent, flops_uncached=uncached, flops_sub_batch=sub,
                         compute_fraction=spent / uncached if known and uncached else None,
                         block_fraction=float(sum(map(sum, trace)) / n_all) if n_all else None)
        out.resolve = lambda: [resolve_stats(c.stats, batch, self.rows_per_sample, scalar) for c in calls]
        if self.kind == "static" and self.granularity == "branch":
            out["branch_trace"] = [call.computed for call in calls]
        if self.kind == "static" and known:
            plan_spent = sum(spent_flops(costs[0], self._static_ran(i)) for i in range(self.steps))
            out["plan_compute_fraction"] = plan_spent / (costs[0].uncached * self.steps)
        return out

    def _static_ran(self, i: int) -> list:
        acts, nb = self.actions[i], self.nb
        if self.granularity == "branch":
            return [[acts[nb * b + k] != REUSE for k in range(nb)] + [True] for b in range(self.n)]
        return [[acts[self.unit_of[b]] != REUSE] * (nb + 1) for b in range(self.n)]

    def summary(self, *, wall_s: float, batch: int, rows_per_sample: int | None = None) -> RunSummary:
        """The last run of every context, as a :class:`RunSummary`."""
        contexts, decisions = {}, []
        flops = uncached = sub = 0.0
        known = True
        for name, ctx in self.contexts.items():
            if self.device_mode:
                self._device_calls(ctx)
            if not any(c is not None for c in ctx.log):  # a context no call ran in
                continue
            s = contexts[name] = self._context_summary(ctx, batch)
            if s["flops"] is None:
                known = False
            else:
                flops, uncached = flops + s["flops"], uncached + s["flops_uncached"]
                sub += s["flops_sub_batch"] or 0.0
            decisions.append(torch.tensor([c.computed for c in ctx.log if c is not None], dtype=torch.float32))
        shapes = {d.shape for d in decisions}
        dec = torch.stack(decisions).mean(0) if decisions and len(shapes) == 1 else torch.zeros(0, self.n, self.nb)
        cache_bytes = sum(ctx.nbytes for ctx in self.contexts.values())
        return RunSummary(self.policy.name if self.plan is None else str(self.plan.meta.get("policy", self.policy.name)),
                          self.granularity, dec, flops if known and contexts else None,
                          uncached if known and contexts else None, wall_s, cache_bytes, batch,
                          self.rows_per_sample if rows_per_sample is None else rows_per_sample,
                          steps=self.steps, blocks=self.n, kind=self.kind, contexts=contexts,
                          flops_sub_batch=sub if self.device_mode and known else None)


class _LazyStats(dict):
    """A context's summary: its ``stats`` are read back from the device on first access."""

    resolve = None

    def __missing__(self, key):
        if key != "stats" or self.resolve is None:
            raise KeyError(key)
        value = self["stats"] = self.resolve()
        return value

    def __contains__(self, key):
        return key == "stats" or super().__contains__(key)

