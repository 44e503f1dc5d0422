"""Per-cache-context caching state of one diffusers transformer, over the cache core.

Each block's ``forward`` is wrapped (:mod:`.install`); the model's own block loop is
untouched. A *cache unit* is a run of blocks: the whole stack (``step`` granularity) or
one block (``block``). Every stream a block returns that it also takes
(``hidden_states`` and, for joint-attention blocks, ``encoder_hidden_states``;
:mod:`.adapters`) is cached as the unit's residual in a :class:`omnicache.cache.CacheUnit`:

- compute and store: the unit runs, then ``CacheUnit.store(out, inp)``;
- reuse: the unit's first block returns ``inp + F + gamma * D1 + gamma2 * D2``
  (``CacheUnit.reuse``), its other blocks return their inputs unchanged.

**Static plans** become per-step action tuples before sampling
(:func:`omnicache.cache.unit_actions`): no host synchronisation; gamma is a
preallocated device scalar per step. **Dynamic policies** always compute the first
blocks, measure the relative L1 of their signal (:func:`omnicache.cache.relative_change`,
all-reduced over ``group`` under sequence parallelism) and compute or reuse the rest.

Steps are counted per cache context: diffusers pipelines name their calls with
``transformer.cache_context("cond" | "uncond" | ...)`` and each name keeps its own
counter, buffers and decisions.

**FLOPs.** Every ``nn.Linear`` of the transformer counts ``2 · in · out`` per row it
processes, per block (and outside the blocks), in eager calls. A block's count when it
computes is its cost ``W_b``; ``compute_fraction`` is the FLOPs a run spent ÷ the FLOPs it
would spend computing every block (calls traced by ``torch.compile`` or replayed in CUDA
graphs count their computed blocks at ``W_b``).
"""

from __future__ import annotations

import dataclasses

import torch

from ...cache import REUSE, STORE, CacheUnit, RunSummary, plan_order, relative_change, unit_actions
from ...plan import CachePlan
from ..distributed import context_parallel_group
from .adapters import MODELS, model_blocks

__all__ = ["Runtime"]


@dataclasses.dataclass
class _Context:
    """State of one cache context (``"cond"``, ``"uncond"``, ... or ``None``)."""

    name: str | None
    n_units: int
    step: int = 0
    units: list = None  # per unit: {stream name: CacheUnit}
    stored: list = None  # per unit: a value has been stored this run
    trace: list = dataclasses.field(default_factory=list)  # per call: computed flags per block
    stats: list = dataclasses.field(default_factory=list)  # per call: dict
    flops: list = dataclasses.field(default_factory=list)  # per call: linear FLOPs per block (+ outside)
    decider: object = None
    ref: torch.Tensor | None = None
    compute: bool = True

    def __post_init__(self):
        self.units = [{} for _ in range(self.n_units)]
        self.stored = [False] * self.n_units


class Runtime:
    """Everything :func:`.install.enable` installs on one transformer (see the module docstring)."""

    def __init__(self, transformer, pipe, config, steps, granularity, group, check_plan=True):
        self.transformer, self.pipe, self.config, self.group = transformer, pipe, config, group
        self.check_plan = check_plan
        self.bound = model_blocks(transformer)
        self.blocks = [b.module for b in self.bound]
        self.n = len(self.blocks)
        spec = MODELS[type(transformer).__name__]
        if isinstance(config, CachePlan):
            self.kind = "static"
        elif getattr(config, "kind", None) in ("static", "dynamic"):
            self.kind = config.kind
        else:
            raise TypeError(f"config must be a CachePlan or a policy config, got {type(config).__name__}")
        if getattr(config, "plan_path", "") is None and hasattr(config, "calibrate"):
            raise ValueError(f"{type(config).__name__} has no plan: calibrate it on this model first "
                             f"(plan = omnicache.integrations.diffusers.calibrate(pipe, config, ...) or "
                             f"train_router(...)), then enable(pipe, plan)")
        if granularity is None:
            granularity = getattr(config, "granularity", "step")
            if granularity == "branch":  # diffusers blocks expose no shared attention/MLP branch API:
                granularity = "block"  # branch plans (FORA, L2C) run per block (CachePlan.to_block)
        if granularity not in ("step", "block"):
            raise ValueError(f"omnicache.integrations.diffusers supports granularity 'step' or 'block', "
                             f"got {granularity!r}")
        self.granularity = granularity if self.kind == "static" else "step"
        self.policy_name = (config.meta.get("policy", "CachePlan") if isinstance(config, CachePlan)
                            else type(config).__name__.removesuffix("Config"))
        self.steps = None
        self.contexts: dict = {}
        self.current = None
        self.step_actions = None
        self.norm1_out = self.inp0 = None
        self.last_rel, self.teacache = None, False
        if self.kind == "dynamic":
            first = config.decider(2**31 - 1, self.n).first_blocks
            self.teacache = first == 0  # TeaCache: decide on block 0's norm1 output, after block 0
            self.head = max(first, 1)
            if self.head >= self.n:
                raise ValueError(f"{type(config).__name__}: the first {self.head} blocks leave none of the "
                                 f"model's {self.n} blocks to cache")
            self.units = [(self.head, self.n)]
        elif self.granularity == "step" and spec.stack:
            self.units = [(0, self.n)]
        else:  # per block (also ``step`` plans on models that reshape between blocks)
            self.units = [(b, b + 1) for b in range(self.n)]
        self.unit_of = [0] * self.n if len(self.units) == 1 else list(range(self.n))
        self.inp = [None] * len(self.units)
        self.stats_out = [None] * len(self.units)
        # linear FLOPs: per block index (-1: outside the blocks), counted in eager calls
        self.block_cost = [None] * self.n
        self.call_flops = None
        # calibration (.calibrate): at a reuse step, run the unit anyway and let ``fitting``
        # choose the forecast from the true output (closed-loop γ); None in normal use
        self.fitting = None
        if steps is not None:
            self.set_steps(steps)

    # ------------------------------------------------------------------ plan / steps
    def set_steps(self, steps: int):
        """Build the plan (static) for ``steps`` and start a new run in every context."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        if self.kind == "static":
            self._build_plan(steps)
        for ctx in self.contexts.values():
            self._restart(ctx)

    def _build_plan(self, steps):
        cfg = self.config
        plan = cfg if isinstance(cfg, CachePlan) else cfg.plan(steps, self.n, granularity=self.granularity)
        if plan.steps != steps:
            raise ValueError(f"CachePlan.steps: plan has {plan.steps} steps but sampling runs {steps}")
        if plan.granularity == "branch" and self.granularity == "block":
            plan = plan.to_block()
        if plan.blocks != self.n:
            raise ValueError(f"CachePlan.blocks: plan has {plan.blocks} blocks but "
                             f"{type(self.transformer).__name__} has {self.n}")
        if plan.granularity not in ("step", "block"):
            raise ValueError(f"CachePlan.granularity: the diffusers integration supports 'step' or "
                             f"'block', got {plan.granularity!r}")
        if plan.granularity != self.granularity:
            raise ValueError(f"CachePlan.granularity: plan is {plan.granularity!r}, "
                             f"enable(granularity={self.granularity!r})")
        if self.check_plan:
            plan.check_model(self.transformer, self.n)
        self.plan = plan
        self.order = plan_order(plan)
        comp = [[row[lo][0] for lo, _ in self.units] for row in plan.compute]
        self.actions = [tuple(row) for row in unit_actions(comp, self.order)]
        dev = next(self.transformer.parameters()).device
        # one float32 device scalar per step, each its own storage (read on device only)
        self.gamma = [torch.tensor(g, dtype=torch.float32, device=dev) for g in plan.gamma]
        self.gamma2 = [torch.tensor(g, dtype=torch.float32, device=dev) for g in plan.gamma2]

    def _restart(self, ctx):
        ctx.step, ctx.ref, ctx.compute = 0, None, True
        ctx.stored = [False] * len(self.units)
        ctx.trace, ctx.stats, ctx.flops = [], [], []
        if self.kind == "dynamic":
            ctx.decider = self.config.decider(self.steps or 2**31 - 1, self.n)
            ctx.decider.start(1)  # one decision per call: the whole batch
        for unit in ctx.units:  # every run starts from empty (zero) caches, as the executor's
            for cu in unit.values():
                cu.reset()

    def context(self, name):
        ctx = self.contexts.get(name)
        if ctx is None:
            ctx = self.contexts[name] = _Context(name, len(self.units))
            self._restart(ctx)
        return ctx

    def prepare(self, ctx):
        """Set what the next call of ``ctx`` reads; returns the static pattern key (or None)."""
        self.current = ctx
        if self.kind != "static":
            return None
        if self.steps is None:
            raise RuntimeError("omnicache: the number of steps is unknown; pass enable(..., steps=N) "
                               "or call the pipeline (its scheduler's set_timesteps sets it)")
        i = ctx.step
        self.step_actions = self.actions[i]
        for u, a in enumerate(self.step_actions):
            if a == REUSE and not ctx.stored[u]:
                raise RuntimeError(f"omnicache: the plan reuses unit {u} at step {i} of context "
                                   f"{ctx.name!r} before computing it")
        self.use_g1, self.use_g2 = bool(self.plan.gamma[i]), bool(self.plan.gamma2[i])
        self.gamma_t, self.gamma2_t = self.gamma[i], self.gamma2[i]
        allocated = all(bool(ctx.units[u]) for u, a in enumerate(self.step_actions) if a == STORE)
        return (self.step_actions, self.use_g1, self.use_g2, allocated)

    def resolve_group(self):
        """The group the dynamic statistics are summed over: ``enable(group=...)`` or that of
        diffusers' context parallelism on the transformer (None: no reduction)."""
        return self.group if self.group is not None else context_parallel_group(self.transformer)

    # ------------------------------------------------------- eager, outside compiled code
    def before_call(self):
        self.call_flops = [0] * (self.n + 1)

    def count_linear(self, index, flops):
        if self.call_flops is not None:
            self.call_flops[index] += flops

    def after_call(self):
        """The call's bookkeeping (eager, after the transformer returns)."""
        ctx = self.current
        if self.steps is not None and len(ctx.trace) == self.steps:
            ctx.trace, ctx.stats, ctx.flops = [], [], []
        stats = self.stats_out[:]
        self.stats_out[:] = [None] * len(self.units)
        if self.kind == "static":
            acts = self.step_actions
            computed = [acts[self.unit_of[b]] != REUSE for b in range(self.n)]
            ctx.stats.append({"residual": stats, "gamma": self.plan.gamma[ctx.step]})
            for u, a in enumerate(acts):
                ctx.stored[u] |= a == STORE
        else:
            computed = [b < self.head or ctx.compute for b in range(self.n)]
            ctx.stats.append({"signal_rel_l1": self.last_rel, "compute": ctx.compute,
                              **ctx.decider.record(), "residual": stats})
        ctx.trace.append(computed)
        counts = self.call_flops or [0] * (self.n + 1)
        for b, c in enumerate(computed):  # a computed block's count in an eager call is its cost
            if c and counts[b] > 0:
                self.block_cost[b] = counts[b]
        ctx.flops.append(counts)
        self.call_flops = None
        ctx.step += 1
        if self.steps is not None and ctx.step == self.steps:  # the run is over: the next call starts one
            trace, st, fl = ctx.trace, ctx.stats, ctx.flops
            self._restart(ctx)
            ctx.trace, ctx.stats, ctx.flops = trace, st, fl

    # ------------------------------------------------------------- inside the block loop
    def _unit(self, u, stream, like):
        units = self.current.units[u]
        if stream not in units:  # the first store of this context allocates (its own compiled variant)
            units[stream] = CacheUnit(self.order if self.kind == "static" else 0).allocate(like)
        return units[stream]

    def _reuse_unit(self, k, u, inputs, g1, g2):
        lo, hi = self.units[u]
        bb = self.bound[k]
        if k != lo:  # the unit's residual was applied at its first block
            return bb.pack(inputs)
        units = self.current.units[u]
        out = {}
        for name, x in inputs.items():
            cu = units.get(name)
            if cu is not None and x is not None:
                out[name] = cu.reuse(x, self.gamma_t if g1 else None, self.gamma2_t if g2 else None)
            elif hi - lo == 1:
                out[name] = None  # the block returns no such stream (SD3's last block)
            else:
                out[name] = x
        return bb.pack(out)

    def _store_unit(self, k, u, out):
        outs, ins = self.bound[k].outputs(out), self.inp[u]
        for name, x in outs.items():
            if x is None or ins.get(name) is None:
                continue
            stats = self._unit(u, name, x).store(x, ins[name])
            if name == "hidden_states":
                self.stats_out[u] = stats
        self.inp[u] = None

    def block_forward(self, k, orig, *args, **kwargs):
        if self.kind == "dynamic":
            return self._dynamic_block(k, orig, args, kwargs)
        if self.step_actions is None:
            raise RuntimeError("omnicache: the number of steps is unknown; pass enable(..., steps=N) "
                               "or call the pipeline (its scheduler's set_timesteps sets it)")
        u = self.unit_of[k]
        lo, hi = self.units[u]
        act = self.step_actions[u]
        if act == REUSE and self.fitting is not None:
            return self._fit_block(k, u, orig, args, kwargs)
        if act == REUSE:
            return self._reuse_unit(k, u, self.bound[k].inputs(args, kwargs), self.use_g1, self.use_g2)
        if act == STORE and k == lo:
            self.inp[u] = self.bound[lo].inputs(args, kwargs)
        out = orig(*args, **kwargs)
        if act == STORE and k == hi - 1:
            self._store_unit(k, u, out)
        return out

    def _fit_block(self, k, u, orig, args, kwargs):
        """Calibration at a reuse step: the unit runs (its true output), ``fitting`` fits the
        forecast coefficients against it, and the unit returns the forecast it would reuse."""
        lo, hi = self.units[u]
        if k == lo:
            self.inp[u] = self.bound[k].inputs(args, kwargs)
        out = orig(*args, **kwargs)
        if k != hi - 1:
            return out
        ins, outs = self.inp[u], self.bound[k].outputs(out)
        self.inp[u] = None
        units = self.current.units[u]
        pairs = {n: (units[n], ins[n], x) for n, x in outs.items()
                 if x is not None and ins.get(n) is not None and n in units}
        g1, g2 = self.fitting(self.current, u, pairs, self.use_g1, self.use_g2)
        values = {}
        for n, x in outs.items():
            if n in pairs:
                cu, x_in, _ = pairs[n]
                values[n] = cu.reuse(x_in, g1, g2)
            else:
                values[n] = x
        return self.bound[k].pack(values)

    def _dynamic_block(self, k, orig, args, kwargs):
        ctx = self.current
        if k < self.head:
            if k == 0:
                self.inp0 = self.bound[0].inputs(args, kwargs)["hidden_states"]
            out = orig(*args, **kwargs)
            if k == self.head - 1:
                self._decide(ctx, self.bound[k].outputs(out)["hidden_states"])
            return out
        if not ctx.compute:
            return self._reuse_unit(k, 0, self.bound[k].inputs(args, kwargs), False, False)
        if k == self.head:
            self.inp[0] = self.bound[k].inputs(args, kwargs)
        out = orig(*args, **kwargs)
        if k == self.n - 1:
            self._store_unit(k, 0, out)
        return out

    def _decide(self, ctx, h):
        """Signal, its relative L1 to the reference (over the group), the decision."""
        sig = self.norm1_out if self.teacache else h - self.inp0
        self.norm1_out = self.inp0 = None
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

    def capture_norm1(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.norm1_out = out.detach()

    # --------------------------------------------------------------------------- summary
    def _flops(self, ctx):
        """``(spent, uncached)`` linear FLOPs of a context's calls."""
        spent = uncached = 0.0
        for computed, counts in zip(ctx.trace, ctx.flops):
            cost = [c if c is not None else 0 for c in self.block_cost]
            eager = any(counts[b] > 0 for b, c in enumerate(computed) if c)
            spent += counts[-1] + (sum(counts[:-1]) if eager else sum(w for w, c in zip(cost, computed) if c))
            uncached += counts[-1] + sum(cost)
        return spent, uncached

    def summary(self) -> RunSummary:
        contexts, spent, uncached, decisions = {}, 0.0, 0.0, []
        calls = computed = 0
        for name, ctx in self.contexts.items():
            steps = []
            for st in ctx.stats:
                d = {k: v for k, v in st.items() if k != "residual"}
                rel = [s[:, 0].sum() / s[:, 1].sum() for s in st["residual"] if s is not None]
                d["residual_rel_l1"] = torch.stack(rel).mean().item() if rel else None
                steps.append(d)
            s, u = self._flops(ctx)
            n_comp, n_all = sum(map(sum, ctx.trace)), len(ctx.trace) * self.n
            calls, computed = calls + n_all, computed + n_comp
            spent, uncached = spent + s, uncached + u
            contexts[name] = {"trace": ctx.trace, "compute_fraction": s / u if u else None,
                              "block_fraction": n_comp / n_all if n_all else None, "stats": steps,
                              "flops": s, "flops_uncached": u}
            if ctx.trace:
                decisions.append(torch.tensor(ctx.trace, dtype=torch.float32))
        if uncached == 0.0 and calls:  # no eager call counted a block: fall back to block calls
            spent, uncached = float(computed), float(calls)
        cache_bytes = sum(cu.nbytes for ctx in self.contexts.values() for unit in ctx.units for cu in unit.values())
        cache_bytes += sum(ctx.ref.nbytes for ctx in self.contexts.values() if ctx.ref is not None)
        dec = torch.stack(decisions).mean(0) if decisions and len({d.shape for d in decisions}) == 1 else \
            torch.zeros(0, self.n)
        return RunSummary(self.policy_name, self.granularity, dec.unsqueeze(-1).expand(*dec.shape, 2).clone(),
                          spent, uncached, 0.0, cache_bytes, 0, 1, steps=self.steps, blocks=self.n,
                          kind=self.kind, contexts=contexts)
