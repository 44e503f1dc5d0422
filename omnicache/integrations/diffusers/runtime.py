"""Per-cache-context caching state of one diffusers transformer, over the cache core.

Each block's ``forward`` is wrapped (:mod:`.install`); the model's own block loop is
untouched. A *cache unit* is a run of blocks: the whole stack (``step`` granularity) or
one block (``block``). Every stream a block returns that it also takes
(``hidden_states`` and, for joint-attention blocks, ``encoder_hidden_states``;
:mod:`.adapters`) is cached as the unit's residual in a :class:`omnicache.cache.CacheUnit`:

- compute and store: the unit runs, then ``CacheUnit.store(out, inp)``;
- reuse: the unit's first block returns ``inp + F + gamma * D1 + gamma2 * D2``
  (``CacheUnit.reuse``), its other blocks return their inputs unchanged.

**Branch plans** (``granularity="branch"``: FORA, Learning-to-Cache) on models whose block
classes declare their attention and MLP submodules (:class:`.adapters.BlockIO` ``attn`` /
``mlp``): every block runs, and each branch submodule's ``forward`` is wrapped instead
(unit ``2b + k``, ``k`` = 0 attention, 1 MLP). Store: the submodule runs and its output,
taken before the block applies its adaLN gate, is stored (``CacheUnit.store(out)``, one unit
per tensor it returns). Reuse: the submodule returns ``F + γ1 D1 + γ2 D2``
(``CacheUnit.forecast``) and the block's own code applies the current step's gate, as FORA
and L2C specify. Cross-attention (PixArt's, Wan's ``attn2``) belongs to the attention branch.
Models with a block class that declares no branches run branch plans per block
(:meth:`CachePlan.to_block`).

**Static plans** become per-step action tuples before sampling
(:func:`omnicache.cache.unit_actions`): no host synchronisation; gamma is a
preallocated device scalar per step. **Dynamic policies** always compute the first
blocks, measure the relative L1 of their signal (:func:`omnicache.cache.relative_change`,
all-reduced over ``group`` under sequence parallelism) and compute or reuse the rest: one
decision for the whole batch (as diffusers' own FirstBlockCache), or with
``enable(..., per_sample=True)`` one per sample (batch row), as our runtime's executor: the
samples that compute run the remaining blocks as a sub-batch (each block's ``batched``
arguments ``index_select``-ed, :class:`.adapters.BlockIO`), the others reuse, and their
rows are joined again (``index_copy``) at each block's output.

Steps are counted per cache context: diffusers pipelines name their calls with
``transformer.cache_context("cond" | "uncond" | ...)`` and each name keeps its own
counter, buffers and decisions.

**FLOPs** are counted on the linear layers, per block and branch (:mod:`.accounting`,
which also builds the :class:`~omnicache.cache.RunSummary`).
"""

from __future__ import annotations

import dataclasses

import torch

from ...cache import REUSE, STORE, CacheUnit, RunSummary, plan_order, unit_actions
from ...plan import DEFAULT_BRANCHES, CachePlan
from ..distributed import context_parallel_group
from . import accounting
from .adapters import MODELS, model_blocks
from .branches import BranchMode
from .device import DeviceMode
from .dynamic import HostMode
from .tokens import TokenMode
from .video import grid_layout, video_grid

__all__ = ["Runtime", "video_grid"]


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
    branch_trace: list = dataclasses.field(default_factory=list)  # branch plans, per call: [attn, mlp] per block
    decider: object = None
    ref: torch.Tensor | None = None
    compute: bool = True
    rows: torch.Tensor | None = None  # per-sample mode: the rows that compute when only some do
    decisions: list | None = None  # per-sample mode: this call's decision per sample
    batch: int = 0  # per-sample mode: the batch the decider was started with
    row_stored: list | None = None  # per-sample mode: per sample, a residual is stored
    device: object = None  # mode="device": the decision's device state (omnicache.cache.DeviceDecisions)

    def __post_init__(self):
        self.units = [{} for _ in range(self.n_units)]
        self.stored = [False] * self.n_units


class Runtime(HostMode, DeviceMode, TokenMode, BranchMode):
    """Everything :func:`.install.enable` installs on one transformer (see the module docstring;
    dynamic policies' ``mode="device"``: :mod:`.device`)."""

    def __init__(self, transformer, pipe, config, steps, granularity, group, check_plan=True, per_sample=False):
        self.transformer, self.pipe, self.config, self.group = transformer, pipe, config, group
        self.check_plan, self.per_sample = check_plan, bool(per_sample)
        self.bound = model_blocks(transformer)
        self.blocks = [b.module for b in self.bound]
        self.n = len(self.blocks)
        spec = MODELS[type(transformer).__name__]
        if isinstance(config, CachePlan):
            self.kind = "static"
        elif getattr(config, "kind", None) in ("static", "dynamic", "token"):
            self.kind = config.kind
        else:
            raise TypeError(f"config must be a CachePlan or a policy config, got {type(config).__name__}")
        if getattr(config, "plan_path", "") is None and hasattr(config, "calibrate"):
            raise ValueError(f"{type(config).__name__} has no plan: calibrate it on this model first "
                             f"(plan = omnicache.integrations.diffusers.calibrate(pipe, config, ...) or "
                             f"train_router(...)), then enable(pipe, plan)")
        # branch caching needs every block class to declare its attention and MLP submodules
        self.has_branches = all(b.io.has_branches for b in self.bound)
        if granularity is None:
            granularity = getattr(config, "granularity", "step")
            if granularity == "branch" and not self.has_branches:
                granularity = "block"  # blocks without declared branches: per block (CachePlan.to_block)
        allowed = ("step", "block", "branch") if self.has_branches else ("step", "block")
        if granularity not in allowed:
            raise ValueError(f"omnicache.integrations.diffusers supports granularity "
                             f"{', '.join(map(repr, allowed))} on {type(transformer).__name__}, got {granularity!r}")
        self.granularity = granularity if self.kind == "static" else "block" if self.kind == "token" else "step"
        # the branch names of the plan's units (named branches: PAB, T-GATE; omnicache.plan)
        names = config.branches if isinstance(config, CachePlan) else getattr(config, "branches", DEFAULT_BRANCHES)
        self.branch_names = tuple(names) if self.granularity == "branch" else DEFAULT_BRANCHES
        self.nb = len(self.branch_names)
        if self.per_sample:
            undeclared = sorted({type(b.module).__name__ for b in self.bound if b.io.batched is None})
            if undeclared:
                raise TypeError(f"per_sample: block class(es) {', '.join(undeclared)} declare no batched "
                                f"arguments (adapters.BlockIO.batched)")
        self.device_mode = self.kind == "dynamic" and getattr(config, "mode", "host") in ("device", "device-where")
        self.device_where = self.device_mode and config.mode == "device-where"
        self.device_first, self.device_mask, self.device_any = False, None, None
        self.policy_name = (config.meta.get("policy", "CachePlan") if isinstance(config, CachePlan)
                            else type(config).__name__.removesuffix("Config"))
        self.steps = None
        self.contexts: dict = {}
        self.current = None
        self.step_actions = None
        self.norm1_out = self.inp0 = None
        self.last_rel, self.teacache, self.tail = None, False, 0
        # the (frames, rows, columns) token grid of a video model whose blocks lay out
        # (batch x frames, rows x columns) / (batch x rows x columns, frames): stage-aware filtering
        self.video_grid = video_grid(transformer)
        self.filtering = None
        # AdaCache's MoReg: frames of the first block's (batch x frames, tokens, channels) input
        self.moreg_frames = None
        if getattr(config, "moreg", False):
            if type(transformer).__name__ != "LatteTransformer3DModel" or self.per_sample:
                raise ValueError(f"{type(config).__name__}.moreg: motion regularisation needs a video model whose "
                                 f"first block sees the frames (LatteTransformer3DModel, whole-batch decisions); "
                                 f"got {type(transformer).__name__}" + (" with per_sample=True" if self.per_sample else ""))
            self.moreg_frames = transformer.config.video_length
        if self.kind == "dynamic":
            dec = config.decider(2**31 - 1, self.n)
            first, self.tail = dec.first_blocks, getattr(dec, "last_blocks", 0)
            self.teacache = first == 0  # TeaCache: decide on block 0's norm1 output, after block 0
            self.head = max(first, 1)
            end = self.n - self.tail  # the cached blocks: head .. end-1; the back blocks always run
            if self.head >= end:
                raise ValueError(f"{type(config).__name__}: the first {self.head} and last {self.tail} blocks "
                                 f"leave none of the model's {self.n} blocks to cache")
            if not spec.stack and spec.interleave and \
                    self.head % len(spec.blocks) != (end - 1) % len(spec.blocks):
                # one residual from block `head` to block `end - 1` may not cross a change of layout
                raise ValueError(f"{type(config).__name__}.first_blocks / last_blocks: on "
                                 f"{type(transformer).__name__} the cached blocks must start in the same block "
                                 f"list as they end ({spec.blocks[(end - 1) % len(spec.blocks)]}); got "
                                 f"first_blocks={self.head}, last_blocks={self.tail}")
            self.units = [(self.head, end)]
        elif self.granularity == "step" and spec.stack:
            self.units = [(0, self.n)]
        elif self.granularity == "branch":  # unit nb*b + k: branch k (branch_names[k]) of block b
            self.units = [(b, b + 1) for b in range(self.n) for _ in self.branch_names]
        else:  # per block (also ``step`` plans on models that reshape between blocks)
            self.units = [(b, b + 1) for b in range(self.n)]
        self.unit_of = [0] * self.n if len(self.units) == 1 else list(range(self.n))
        if self.granularity == "branch":
            self.unit_of = [self.nb * b for b in range(self.n)]
        self.inp = [None] * len(self.units)
        self.stats_out = [None] * len(self.units)
        # linear FLOPs: per block index (-1: outside the blocks), counted in eager calls
        self.block_cost = [None] * self.n
        self.call_flops = None
        self.fast_costs, self.call_key, self.call_costs = {}, None, None  # see before_call
        # calibration (.calibrate): at a reuse step, run the unit anyway and let ``fitting``
        # choose the forecast from the true output (closed-loop γ); None in normal use
        self.fitting = None
        # per block: [branch 0, ..., branch nb-1, rest] linear FLOPs (what a branch costs: by default
        # attention, MLP), and outside the blocks
        self.part_cost = [[None] * (self.nb + 1) for _ in range(self.n)]
        self.outside_cost = None
        self.call_parts = None
        self.branch_shape = {}  # (block, kind, j) -> None (a tensor) or the tuple length of its output
        self.skip_count = None  # a Linear branch submodule that returned its cache (its hook counts nothing)
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
        if self.kind == "token":  # ToCa: full steps; the others recompute a share of the tokens
            self.token_full = self.config.full_steps(steps)
        for ctx in self.contexts.values():
            self._restart(ctx)

    def _build_plan(self, steps):
        cfg = self.config
        plan = cfg if isinstance(cfg, CachePlan) else cfg.plan(steps, self.n, granularity=self.granularity)
        if plan.steps != steps:
            raise ValueError(f"CachePlan.steps: plan has {plan.steps} steps but sampling runs {steps}")
        if plan.granularity == "branch" and self.granularity == "block":
            plan = plan.to_block()
        if plan.granularity == "branch" and tuple(plan.branches) != self.branch_names:
            raise ValueError(f"CachePlan.branches: the plan has {plan.branches}, the runtime was set up for "
                             f"{list(self.branch_names)}")
        if plan.blocks != self.n:
            raise ValueError(f"CachePlan.blocks: plan has {plan.blocks} blocks but "
                             f"{type(self.transformer).__name__} has {self.n}")
        if plan.granularity == "branch" and not self.has_branches:
            raise ValueError(f"CachePlan.granularity: 'branch' needs every block class of "
                             f"{type(self.transformer).__name__} to declare its branches (adapters.BlockIO)")
        if plan.granularity != self.granularity:
            raise ValueError(f"CachePlan.granularity: plan is {plan.granularity!r}, "
                             f"enable(granularity={self.granularity!r})")
        if self.check_plan:
            plan.check_model(self.transformer, self.n)
        self.plan = plan
        self.order = plan_order(plan)
        setting = plan.meta.get("filter")
        self.filtering = None
        if setting and self.order >= 1:
            if self.video_grid is None or tuple(setting.get("grid", ())) != self.video_grid or plan.granularity == "branch":
                raise ValueError(f"CachePlan.meta.filter: stage-aware filtering needs a video model's token grid "
                                 f"(LatteTransformer3DModel, step/block plans); got grid {setting.get('grid')} on "
                                 f"{type(self.transformer).__name__} (grid {self.video_grid})")
            self.filtering = {k: v for k, v in setting.items() if k != "grid"}
        if self.granularity == "branch":
            comp = [[row[b][k] for b in range(self.n) for k in range(self.nb)] for row in plan.compute]
        else:
            comp = [[row[lo][0] for lo, _ in self.units] for row in plan.compute]
        self.actions = [tuple(row) for row in unit_actions(comp, self.order)]
        dev = next(self.transformer.parameters()).device
        # one float32 device scalar per step, each its own storage (read on device only)
        self.gamma = [torch.tensor(g, dtype=torch.float32, device=dev) for g in plan.gamma]
        self.gamma2 = [torch.tensor(g, dtype=torch.float32, device=dev) for g in plan.gamma2]

    def _restart(self, ctx):
        ctx.step, ctx.ref, ctx.compute = 0, None, True
        ctx.stored = [False] * len(self.units)
        ctx.trace, ctx.stats, ctx.flops, ctx.branch_trace = [], [], [], []
        ctx.rows, ctx.decisions, ctx.batch, ctx.row_stored = None, None, 0, None
        if self.kind == "dynamic":
            ctx.decider = self.config.decider(self.steps or 2**31 - 1, self.n)
            ctx.decider.start(1)  # one decision per call: the whole batch (per-sample: at the first call)
            if self.device_mode:
                self._device_restart(ctx)
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
        if self.device_mode:  # the first call (allocating) and the steady state: one variant each
            return ("device", ctx.device is not None)
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
    def before_call(self, key=None):
        """Start a call's FLOP count; ``key``: the shapes of its tensor arguments. Once a call
        of a whole-batch dynamic policy has computed every block with these shapes, later
        calls with the same shapes count from those per-block costs and the ``nn.Linear``
        hooks are detached (a hook puts every Linear call on torch's slow path: +4% per
        cached step on the Flux arena, measured); any other call re-attaches them."""
        known = self.fast_costs.get(key) if self._counts_from_costs() else None
        self.call_key, self.call_costs = key, known
        self.installer.linear_hooks(known is None)
        if known is None:
            self.call_flops = [0] * (self.n + 1)
            self.call_parts = [[0] * (self.nb + 1) for _ in range(self.n)]

    def _counts_from_costs(self) -> bool:
        return (self.kind == "dynamic" and not self.per_sample and not self.device_mode
                and self.fitting is None)

    def count_linear(self, index, flops, part=-1, module=None):
        """``flops`` of one ``nn.Linear`` call in block ``index`` (-1: outside the blocks), in its
        ``part`` (the branch's index, -1 the rest of the block)."""
        if module is not None and module is self.skip_count:  # a cached Linear branch: nothing ran
            self.skip_count = None
            return
        if self.call_flops is not None:
            self.call_flops[index] += flops
            if index >= 0:
                self.call_parts[index][part] += flops

    def after_call(self):
        """The call's bookkeeping (eager, after the transformer returns)."""
        ctx = self.current
        if self.steps is not None and len(ctx.trace) == self.steps:
            ctx.trace, ctx.stats, ctx.flops, ctx.branch_trace = [], [], [], []
        stats = self.stats_out[:]
        self.stats_out[:] = [None] * len(self.units)
        nb = self.nb
        parts = [[True] * (nb + 1)] * self.n  # per block: [branches..., rest] ran on every row
        if self.kind == "static":
            acts = self.step_actions
            if self.granularity == "branch":  # the block's own code (modulation, gates) always runs
                parts = [[acts[nb * b + k] != REUSE for k in range(nb)] + [True] for b in range(self.n)]
                ctx.branch_trace.append([p[:nb] for p in parts])
                computed = [any(p[:nb]) for p in parts]
            else:
                computed = [acts[self.unit_of[b]] != REUSE for b in range(self.n)]
                parts = [[c] * (nb + 1) for c in computed]
            ctx.stats.append({"residual": stats, "gamma": self.plan.gamma[ctx.step]})
            for u, a in enumerate(acts):
                ctx.stored[u] |= a == STORE
        elif self.kind == "token":  # every block ran, on all tokens (full step) or on a share of them
            full = self.token_full[ctx.step]
            computed, parts = [True] * self.n, [[full] * (nb + 1)] * self.n
            ctx.stats.append({"residual": stats, "full": full})
        elif self.device_mode:  # placeholders until the summary reads the device history
            computed, parts = [True] * self.n, [[True] * (nb + 1)] * self.n
            ctx.stats.append({"residual": stats})
        else:
            if ctx.decisions is not None:  # per-sample: the fraction of samples that ran the rest
                frac = sum(ctx.decisions) / len(ctx.decisions)
                computed = [True if b < self.head or b >= self.n - self.tail else frac for b in range(self.n)]
                compute = list(ctx.decisions)
            else:
                computed = [b < self.head or b >= self.n - self.tail or ctx.compute for b in range(self.n)]
                compute = ctx.compute
            parts = [[c == 1] * (nb + 1) for c in computed]
            ctx.stats.append({"signal_rel_l1": self.last_rel, "compute": compute,
                              **ctx.decider.record(), "residual": stats})
        ctx.trace.append(computed)
        if self.call_costs is not None:  # this call's shapes were measured: count from the costs
            blocks, outside = self.call_costs
            counts = [blocks[b] if c else 0 for b, c in enumerate(computed)] + [outside]
            self.call_flops = None
        else:
            counts = self.call_flops or [0] * (self.n + 1)
        for b, c in enumerate(computed):  # a fully computed block's count in an eager call is its cost
            if counts[b] > 0 and self.call_flops is not None:
                if all(parts[b]):
                    self.block_cost[b] = counts[b]
                for k in range(nb + 1):  # each part that ran on every row: its cost
                    if parts[b][k]:
                        self.part_cost[b][k] = self.call_parts[b][k]
        if self.call_flops is not None and any(counts[:-1]):
            self.outside_cost = counts[-1]
            if self._counts_from_costs() and all(c is True for c in computed) and all(counts[:-1]):
                self.fast_costs[self.call_key] = (list(counts[:-1]), counts[-1])
        ctx.flops.append(counts)
        self.call_flops = self.call_parts = None
        ctx.step += 1
        if self.steps is not None and ctx.step == self.steps:  # the run is over: the next call starts one
            trace, st, fl, bt = ctx.trace, ctx.stats, ctx.flops, ctx.branch_trace
            self._restart(ctx)
            ctx.trace, ctx.stats, ctx.flops, ctx.branch_trace = trace, st, fl, bt

    # ------------------------------------------------------------- inside the block loop
    def _unit(self, u, stream, like):
        units = self.current.units[u]
        if stream not in units or units[stream].F.shape != like.shape:
            # the first store of this context allocates (its own compiled variant); a run with
            # other shapes (another batch size or resolution) allocates anew
            filt = None
            if self.filtering is not None and stream == "hidden_states":
                filt = (self.video_grid, self.filtering, self._grid_layout(u))
            units[stream] = CacheUnit(self.order if self.kind == "static" else 0, filt).allocate(like)
        return units[stream]

    def _grid_layout(self, u):
        """``(to_grid, from_grid)`` between unit ``u``'s residual layout and ``[B, F*H*W, D]``
        (:func:`.video.grid_layout`)."""
        return grid_layout(self.video_grid, self.bound[self.units[u][0]].temporal)

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
            # the step is read only where a unit filters (its cut-off moves with the progress)
            progress = self.current.step / max((self.steps or 1) - 1, 1) if self.filtering is not None else 0.0
            stats = self._unit(u, name, x).store(x, ins[name], progress)
            if name == "hidden_states":
                self.stats_out[u] = stats
        self.inp[u] = None

    def block_forward(self, k, orig, *args, **kwargs):
        if self.device_mode:
            return self._device_block(k, orig, args, kwargs)
        if self.kind == "dynamic":
            return self._dynamic_block(k, orig, args, kwargs)
        if self.kind == "token":
            if self.steps is None:
                raise RuntimeError("omnicache: the number of steps is unknown; pass enable(..., steps=N) "
                                   "or call the pipeline (its scheduler's set_timesteps sets it)")
            return self._token_block(k, orig, args, kwargs)
        if self.step_actions is None:
            raise RuntimeError("omnicache: the number of steps is unknown; pass enable(..., steps=N) "
                               "or call the pipeline (its scheduler's set_timesteps sets it)")
        if self.granularity == "branch":  # the block runs; its branch submodules compute or reuse
            return orig(*args, **kwargs)
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

    # --------------------------------------------------------------------------- summary
    def plan_fraction(self) -> float | None:
        """The static plan's compute fraction from the measured linear FLOPs (:mod:`.accounting`)."""
        return accounting.plan_fraction(self)

    def summary(self) -> RunSummary:
        return accounting.summary(self)
