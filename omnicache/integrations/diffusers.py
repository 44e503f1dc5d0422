"""Feature caching for diffusers transformers: ``enable(pipe, config)``, ``disable``, ``summary``.

Each transformer block's ``forward`` is wrapped (an instance attribute, removed by
:func:`disable`); the model's own block loop is untouched. A *cache unit* is a run of
blocks: the whole stack (``step`` granularity) or one block (``block``). Both streams a
block returns (``hidden_states`` and, for joint-attention blocks, ``encoder_hidden_states``)
are cached as residuals ``F = out - inp`` of the unit:

- compute and store: the unit runs, then ``store_residual_(F, D1, out, inp)``;
- reuse: the unit's first block returns ``inp + F + gamma * D1 + gamma2 * D2``
  (``apply_residual_``), its other blocks return their inputs unchanged.

**Static plans** (:class:`~omnicache.plan.CachePlan`, FORA, TaylorSeer, Δ-DiT, OmniCache
and L2C plans) are turned into per-step Python action tuples before sampling: no host
synchronisation. Each distinct per-step pattern runs through its own copy of the
transformer's ``forward`` code object, installed before the call (outside any compiled
region), so ``torch.compile(transformer, fullgraph=True)`` compiles each pattern once and
never recompiles from step to step; gamma is a preallocated device scalar per step.

**Dynamic policies** (TeaCache, FirstBlockCache) always compute the first blocks, measure
``Σ|s - s_ref| / Σ|s_ref|`` over the call's whole batch (``rel_l1``) and compute or reuse
the remaining blocks (one host sync per call). Under sequence parallelism both sums are
all-reduced over the ranks of ``group`` (:mod:`.distributed`; by default the group of
diffusers' context parallelism when it is enabled on the model), so every rank takes the
single-process decision. FirstBlockCache's signal is the first
blocks' residual of ``hidden_states`` (as diffusers' ``FirstBlockCacheConfig``);
TeaCache's is the output of block 0's ``norm1`` (the timestep-modulated input for
AdaLN-Zero blocks), and block 0 is computed before deciding.

With diffusers hooks on the transformer (context parallelism's input split, ...), a static
plan's ``forward`` variant is installed beneath them, where the class ``forward`` was.

Steps are counted per cache context: diffusers pipelines name their calls with
``transformer.cache_context("cond" | "uncond" | ...)`` and each name keeps its own
counter, buffers and decisions. The number of steps is ``enable(..., steps=N)`` or, for a
pipeline, read from its scheduler's ``set_timesteps``, which also starts a new run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types

import torch

from .. import ops
from ..plan import CachePlan
from ..runtime.executor import COMPUTE, REUSE, STORE
from .distributed import all_reduce_sums, context_parallel_group

__all__ = ["enable", "disable", "summary", "reset", "SUPPORTED_MODELS"]

# model class -> its ModuleLists of blocks, in the order the forward runs them
SUPPORTED_MODELS = {
    "DiTTransformer2DModel": ("transformer_blocks",),
    "PixArtTransformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "SD3Transformer2DModel": ("transformer_blocks",),
    "WanTransformer3DModel": ("blocks",),
    "CogVideoXTransformer3DModel": ("transformer_blocks",),
}
# block class -> None (returns hidden_states) or (index of hidden_states, of encoder_hidden_states)
_BLOCK_OUTPUTS = {
    "BasicTransformerBlock": None,
    "WanTransformerBlock": None,
    "FluxTransformerBlock": (1, 0),
    "FluxSingleTransformerBlock": (1, 0),
    "JointTransformerBlock": (1, 0),
    "CogVideoXBlock": (0, 1),
}
_ATTR = "_omnicache_runtime"


def _split(obj):
    """``(transformer, pipeline or None)`` from a pipeline or a transformer."""
    if isinstance(obj, torch.nn.Module):
        return obj, None
    t = getattr(obj, "transformer", None)
    if isinstance(t, torch.nn.Module):
        return t, obj
    raise TypeError(f"expected a diffusers pipeline or transformer, got {type(obj).__name__}")


def _arg_index(cls, name):
    params = list(inspect.signature(cls.forward).parameters)[1:]  # skip self
    return params.index(name) if name in params else None


@dataclasses.dataclass
class _Context:
    """State of one cache context (``"cond"``, ``"uncond"``, ... or ``None``)."""

    name: str | None
    n_units: int
    step: int = 0
    bufs: list = None  # per unit: [F_h, F_e, D1_h, D1_e, D2_h, D2_e]
    stored: list = None  # per unit: a value has been stored this run
    trace: list = dataclasses.field(default_factory=list)  # per call: computed flags per block
    stats: list = dataclasses.field(default_factory=list)  # per call: dict
    decider: object = None
    ref: torch.Tensor | None = None
    compute: bool = True

    def __post_init__(self):
        self.bufs = [[None] * 6 for _ in range(self.n_units)]
        self.stored = [False] * self.n_units


class _Runtime:
    """Everything :func:`enable` installs on one transformer (see the module docstring)."""

    def __init__(self, transformer, pipe, config, steps, granularity, group):
        cls = type(transformer).__name__
        self.transformer, self.pipe, self.config, self.group = transformer, pipe, config, group
        self.blocks = [blk for name in SUPPORTED_MODELS[cls] for blk in getattr(transformer, name)]
        self.n = len(self.blocks)
        self.ret, self.arg_h, self.arg_e = [], [], []
        for blk in self.blocks:
            bname = type(blk).__name__
            if bname not in _BLOCK_OUTPUTS:
                raise TypeError(f"omnicache: block class {bname} of {cls} is not supported "
                                f"(supported blocks: {', '.join(_BLOCK_OUTPUTS)})")
            spec = _BLOCK_OUTPUTS[bname]
            self.ret.append(spec)
            self.arg_h.append(_arg_index(type(blk), "hidden_states"))
            self.arg_e.append(_arg_index(type(blk), "encoder_hidden_states") if spec else None)
        if isinstance(config, CachePlan):
            self.kind = "static"
        elif getattr(config, "kind", None) in ("static", "dynamic"):
            self.kind = config.kind
        else:
            raise TypeError(f"config must be a CachePlan or a policy config, got {type(config).__name__}")
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
        self.variants: dict = {}
        self.handles: list = []
        self.inner_saved = None  # (hook reference, attribute, value) replaced by _install
        self.norm1_out = None
        self.last_rel, self.teacache, self.step_actions = None, False, None
        if self.kind == "dynamic":
            first = config.decider(2**31 - 1, self.n).first_blocks
            self.teacache = first == 0  # TeaCache: decide on block 0's norm1 output, after block 0
            self.head = max(first, 1)
            if self.head >= self.n:
                raise ValueError(f"{type(config).__name__}: the first {self.head} blocks leave none of the "
                                 f"model's {self.n} blocks to cache")
            self.units = [(self.head, self.n)]
        elif self.granularity == "step":
            self.units = [(0, self.n)]
        else:
            self.units = [(b, b + 1) for b in range(self.n)]
        self.unit_of = [0] * self.n if len(self.units) == 1 else list(range(self.n))
        self.inp = [None] * len(self.units)
        self.stats_out = [None] * len(self.units)
        if steps is not None:
            self.set_steps(steps)

    # ------------------------------------------------------------------ plan / steps
    def set_steps(self, steps: int):
        """Build the plan (static) for ``steps`` and start a new run in every context."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        if self.kind == "static":
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
            self.plan = plan
            self.order = 2 if any(plan.gamma2) else 1 if any(plan.gamma) else 0
            comp = [[row[lo][0] for lo, _ in self.units] for row in plan.compute]
            self.actions = []
            for i in range(steps):
                acts = []
                for u in range(len(self.units)):
                    reused = not all(c[u] for c in comp)
                    nxt_reuse = i + 1 < steps and not comp[i + 1][u]
                    acts.append(REUSE if not comp[i][u] else
                                STORE if reused and (self.order or nxt_reuse) else COMPUTE)
                self.actions.append(tuple(acts))
            dev = next(self.transformer.parameters()).device
            # one float32 device scalar per step, each its own storage (read on device only)
            self.gamma = [torch.tensor(g, dtype=torch.float32, device=dev) for g in plan.gamma]
            self.gamma2 = [torch.tensor(g, dtype=torch.float32, device=dev) for g in plan.gamma2]
        for ctx in self.contexts.values():
            self._restart(ctx)
        if self.contexts:
            self._prepare(self.current)

    def _restart(self, ctx):
        ctx.step, ctx.ref, ctx.compute = 0, None, True
        ctx.stored = [False] * len(self.units)
        ctx.trace, ctx.stats = [], []
        if self.kind == "dynamic":
            ctx.decider = self.config.decider(self.steps or 2**31 - 1, self.n)
            ctx.decider.start(1)  # one decision per call: the whole batch
        for unit in ctx.bufs:  # every run starts from empty (zero) caches, as the executor's
            for t in unit:
                if t is not None:
                    t.zero_()

    def context(self, name):
        ctx = self.contexts.get(name)
        if ctx is None:
            ctx = self.contexts[name] = _Context(name, len(self.units))
            self._restart(ctx)
        return ctx

    # ------------------------------------------------------- eager, outside compiled code
    def _prepare(self, ctx):
        """Set what the next call of ``ctx`` reads, and install its ``forward`` variant."""
        self.current = ctx
        self.bufs = ctx.bufs
        if self.kind != "static":
            return
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
        allocated = all(b[0] is not None for b, a in zip(ctx.bufs, self.step_actions) if a == STORE)
        key = (self.step_actions, self.use_g1, self.use_g2, allocated)
        fwd = self.variants.get(key)
        if fwd is None:  # a distinct code object per pattern: compiled once each, never recompiled
            fn = self.class_forward
            code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_omnicache_{len(self.variants)}")
            f = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
            f.__kwdefaults__, f.__qualname__ = fn.__kwdefaults__, fn.__qualname__
            f.__dict__.update(fn.__dict__)
            fwd = self.variants[key] = types.MethodType(f, self.transformer)
        self._install(fwd)

    def _install(self, fwd):
        """Make ``fwd`` the transformer's forward: an instance attribute or, when diffusers hooks
        wrap the forward (context parallelism's input split, ...), the innermost hook's."""
        refs = getattr(vars(self.transformer).get("_diffusers_hook"), "_fn_refs", None)
        if not refs:
            self.transformer.forward = fwd
            return
        ref = refs[0]  # wraps what was the forward when the first hook was registered
        attr = "original_forward" if ref.original_forward is not None else "forward"
        old = getattr(ref, attr)
        if not self._is_variant(old) and self.inner_saved is None:
            self.inner_saved = (ref, attr, old)
        setattr(ref, attr, fwd)

    def _is_variant(self, fn):
        return any(fn == v for v in self.variants.values())

    def resolve_group(self):
        """The group the dynamic statistics are summed over: ``enable(group=...)`` or that of
        diffusers' context parallelism on the transformer (None: no reduction)."""
        return self.group if self.group is not None else context_parallel_group(self.transformer)

    def switch(self, name):
        self._prepare(self.context(name))

    def after_call(self, module, args, output):
        ctx = self.current
        if self.steps is not None and len(ctx.trace) == self.steps:
            ctx.trace, ctx.stats = [], []
        stats = self.stats_out[:]
        self.stats_out[:] = [None] * len(self.units)
        if self.kind == "static":
            acts = self.step_actions
            ctx.trace.append([acts[self.unit_of[b]] != REUSE for b in range(self.n)])
            ctx.stats.append({"residual": stats, "gamma": self.plan.gamma[ctx.step]})
            for u, a in enumerate(acts):
                ctx.stored[u] |= a == STORE
        else:
            ctx.trace.append([b < self.head or ctx.compute for b in range(self.n)])
            ctx.stats.append({"signal_rel_l1": self.last_rel, "compute": ctx.compute,
                              **ctx.decider.record(), "residual": stats})
        ctx.step += 1
        if self.steps is not None and ctx.step == self.steps:  # the run is over: the next call starts one
            self._restart_counters(ctx)
        if self.kind == "static":
            self._prepare(ctx)
        return output

    def _restart_counters(self, ctx):
        trace, stats = ctx.trace, ctx.stats
        self._restart(ctx)
        ctx.trace, ctx.stats = trace, stats

    # ------------------------------------------------------------- inside the block loop
    def _io(self, k, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[self.arg_h[k]]
        e = None
        if self.ret[k] is not None:
            e = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[self.arg_e[k]]
        return h, e

    def _pack(self, k, h, e):
        spec = self.ret[k]
        if spec is None:
            return h
        out = [None, None]
        out[spec[0]], out[spec[1]] = h, e
        return tuple(out)

    def _unpack(self, k, out):
        spec = self.ret[k]
        return (out, None) if spec is None else (out[spec[0]], out[spec[1]])

    def _store(self, bufs, slot, order, out, inp):
        """``F = out - inp``, ``D1 = F_new - F_old``, ``D2 = D1_new - D1_old``; returns [rows, 4]."""
        if bufs[slot] is None:  # the first store of this context allocates (its own compiled variant)
            z = functools.partial(torch.zeros, out.shape, dtype=out.dtype, device=out.device)
            bufs[slot] = z()
            bufs[slot + 2] = z() if order >= 1 else None
            bufs[slot + 4] = z() if order >= 2 else None
        F, D1, D2 = bufs[slot], bufs[slot + 2], bufs[slot + 4]
        # D2 = D1_new - D1_old via a copy: inductor (torch 2.13) miscompiles the in-place
        # form ``torch.neg(D1, out=D2); store_residual_(...); D2.add_(D1)``
        old = D1.clone() if D2 is not None else None
        stats = ops.store_residual_(F, D1, out, inp)
        if D2 is not None:
            torch.sub(D1, old, out=D2)
        return stats

    def _reuse(self, x, F, D1, D2, g1, g2):
        """``x + F + gamma * D1 + gamma2 * D2`` into a fresh contiguous tensor."""
        out = torch.clone(x, memory_format=torch.contiguous_format)
        if g1:
            ops.apply_residual_(out, F, D1, self.gamma_t)
        else:
            ops.apply_residual_(out, F)
        if g2:
            out.add_(D2 * self.gamma2_t)
        return out

    def _reuse_unit(self, k, u, h, e, g1, g2):
        lo, hi = self.units[u]
        if k != lo:  # the unit's residual was applied at its first block
            return self._pack(k, h, e)
        bufs = self.bufs[u]
        h = self._reuse(h, bufs[0], bufs[2], bufs[4], g1, g2)
        if bufs[1] is not None:
            e = self._reuse(e, bufs[1], bufs[3], bufs[5], g1, g2)
        elif hi - lo == 1:
            e = None  # the block returns no encoder stream (SD3's last block)
        return self._pack(k, h, e)

    def _store_unit(self, k, u, out, order):
        (oh, oe), (ih, ie) = self._unpack(k, out), self.inp[u]
        bufs = self.bufs[u]
        self.stats_out[u] = self._store(bufs, 0, order, oh, ih)
        if oe is not None and ie is not None:
            self._store(bufs, 1, order, oe, ie)
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
        if act == REUSE:
            h, e = self._io(k, args, kwargs)
            return self._reuse_unit(k, u, h, e, self.use_g1, self.use_g2)
        if act == STORE and k == lo:
            self.inp[u] = self._io(k, args, kwargs)
        out = orig(*args, **kwargs)
        if act == STORE and k == hi - 1:
            self._store_unit(k, u, out, self.order)
        return out

    def _dynamic_block(self, k, orig, args, kwargs):
        ctx = self.current
        if k < self.head:
            if k == 0:
                self.inp0 = self._io(k, args, kwargs)[0]
            out = orig(*args, **kwargs)
            if k == self.head - 1:
                self._decide(ctx, self._unpack(k, out)[0])
            return out
        if not ctx.compute:
            h, e = self._io(k, args, kwargs)
            return self._reuse_unit(k, 0, h, e, False, False)
        if k == self.head:
            self.inp[0] = self._io(k, args, kwargs)
        out = orig(*args, **kwargs)
        if k == self.n - 1:
            self._store_unit(k, 0, out, 0)
        return out

    def _decide(self, ctx, h):
        """Signal, its relative L1 to the reference (over the group), the decision."""
        sig = self.norm1_out if self.teacache else h - self.inp0
        self.norm1_out = self.inp0 = None
        rel = None
        if ctx.ref is not None:
            sums = ops.rel_l1(sig, ctx.ref).sum(0)  # [2]: Σ|s - ref|, Σ|ref| over the local batch
            group = self.resolve_group()
            if group is not None:
                all_reduce_sums(sums, group)
            rel = (sums[0] / sums[1]).item()  # the call's one host sync
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
    def summary(self) -> dict:
        out = {"policy": self.policy_name, "kind": self.kind, "granularity": self.granularity,
               "steps": self.steps, "blocks": self.n, "contexts": {}}
        calls = computed = 0
        for name, ctx in self.contexts.items():
            steps = []
            for st in ctx.stats:
                d = {k: v for k, v in st.items() if k != "residual"}
                rel = [s[:, 0].sum() / s[:, 1].sum() for s in st["residual"] if s is not None]
                d["residual_rel_l1"] = torch.stack(rel).mean().item() if rel else None
                steps.append(d)
            n_comp = sum(map(sum, ctx.trace))
            n_all = len(ctx.trace) * self.n
            calls, computed = calls + n_all, computed + n_comp
            out["contexts"][name] = {"trace": ctx.trace, "compute_fraction": n_comp / n_all if n_all else None,
                                     "stats": steps}
        out["compute_fraction"] = computed / calls if calls else None
        out["cache_bytes"] = sum(t.nbytes for ctx in self.contexts.values() for unit in ctx.bufs
                                 for t in (*unit, ctx.ref) if t is not None)
        return out


# ------------------------------------------------------------------------------ public API
def enable(pipe_or_transformer, config, *, steps: int | None = None, granularity: str | None = None,
           group=None):
    """Enable feature caching on a diffusers transformer (or a pipeline's ``.transformer``).

    Args:
        pipe_or_transformer: a pipeline with a ``transformer`` or one of
            :data:`SUPPORTED_MODELS`.
        config: a :class:`~omnicache.plan.CachePlan` or a policy config
            (``FORAConfig``, ``TaylorSeerConfig``, ``DeltaDiTConfig``, ``NoCacheConfig``,
            ``TeaCacheConfig``, ``FirstBlockCacheConfig``, ...).
        steps: sampling steps per run; with a pipeline, read from its scheduler if None.
        granularity: ``"step"`` or ``"block"``; default the policy's (``"branch"``
            policies and plans, e.g. Learning-to-Cache's, run at ``"block"``: a block computes
            where either of its branches does, :meth:`CachePlan.to_block`).
        group: a ``torch.distributed`` process group over which the sequence is sharded;
            dynamic policies sum their statistics over it so every rank decides alike. None:
            the group of diffusers' context parallelism when it is enabled on the
            transformer (``enable_parallelism(config=ContextParallelConfig(...))``, before or
            after this call), else no reduction.

    Raises:
        RuntimeError: caching is already enabled on this transformer.
        TypeError: the model class is not supported (the message lists the supported ones).
    """
    transformer, pipe = _split(pipe_or_transformer)
    if hasattr(transformer, _ATTR):
        raise RuntimeError(f"omnicache is already enabled on this {type(transformer).__name__}; "
                           f"call omnicache.integrations.diffusers.disable(...) first")
    cls = type(transformer).__name__
    if cls not in SUPPORTED_MODELS:
        raise TypeError(f"omnicache.integrations.diffusers does not support {cls}; "
                        f"supported: {', '.join(SUPPORTED_MODELS)}")
    rt = _Runtime(transformer, pipe, config, steps, granularity, group)
    vt = vars(transformer)
    rt.saved = {name: vt[name] for name in ("forward", "cache_context") if name in vt}
    rt.class_forward = type(transformer).forward
    rt.saved_blocks = [vars(blk).get("forward") for blk in rt.blocks]
    for k, blk in enumerate(rt.blocks):
        blk.forward = functools.partial(rt.block_forward, k, blk.forward)
    rt.norm1_hook = None
    if rt.teacache:
        norm1 = getattr(rt.blocks[0], "norm1", None)
        if norm1 is None:
            raise TypeError(f"{type(config).__name__} needs block 0's norm1 on {cls}")
        rt.norm1_hook = norm1.register_forward_hook(rt.capture_norm1)
    rt.handles.append(transformer.register_forward_hook(torch.compiler.disable(rt.after_call)))

    orig_cc = getattr(transformer, "cache_context", None)
    if orig_cc is not None:
        @contextlib.contextmanager
        def cache_context(name, **kwargs):
            with orig_cc(name, **kwargs):
                rt.switch(name)
                try:
                    yield
                finally:
                    rt.switch(None)
        transformer.cache_context = cache_context
    if pipe is not None and hasattr(pipe, "scheduler"):
        sched = pipe.scheduler
        rt.saved_sched = (sched, vars(sched).get("set_timesteps"))
        orig_st = sched.set_timesteps

        @functools.wraps(orig_st)
        def set_timesteps(*args, **kwargs):
            res = orig_st(*args, **kwargs)
            rt.set_steps(len(sched.timesteps))
            return res
        sched.set_timesteps = set_timesteps
    setattr(transformer, _ATTR, rt)
    if rt.steps is not None or rt.kind == "dynamic":
        rt.switch(None)
    else:
        rt.current = rt.context(None)
    return transformer


def _runtime(obj):
    transformer, _ = _split(obj)
    rt = getattr(transformer, _ATTR, None)
    if rt is None:
        raise RuntimeError(f"omnicache is not enabled on this {type(transformer).__name__}")
    return transformer, rt


def disable(pipe_or_transformer) -> None:
    """Remove everything :func:`enable` installed; the model is as it was before."""
    transformer, rt = _runtime(pipe_or_transformer)
    for h in rt.handles:
        h.remove()
    if rt.norm1_hook is not None:
        rt.norm1_hook.remove()
    for blk, fwd in zip(rt.blocks, rt.saved_blocks):
        del blk.forward
        if fwd is not None:
            blk.forward = fwd
    refs = getattr(vars(transformer).get("_diffusers_hook"), "_fn_refs", None)
    if refs:  # a static variant beneath diffusers hooks: put back what it replaced
        ref = refs[0]
        for attr in ("original_forward", "forward"):
            if rt._is_variant(getattr(ref, attr)):
                saved = rt.inner_saved
                setattr(ref, attr, saved[2] if saved is not None and saved[:2] == (ref, attr) else
                        rt.saved.get("forward", types.MethodType(rt.class_forward, transformer)))
    for name in ("forward", "cache_context"):
        cur = vars(transformer).get(name)
        if name == "forward" and cur is not None and not rt._is_variant(cur) and cur is not rt.saved.get(name):
            continue  # installed after enable() (diffusers hooks): left in place
        vars(transformer).pop(name, None)
        if name in rt.saved:
            setattr(transformer, name, rt.saved[name])
    if hasattr(rt, "saved_sched"):
        sched, st = rt.saved_sched
        del sched.set_timesteps
        if st is not None:
            sched.set_timesteps = st
    delattr(transformer, _ATTR)


def reset(pipe_or_transformer, steps: int | None = None) -> None:
    """Start a new run in every cache context (optionally with a new number of steps)."""
    _, rt = _runtime(pipe_or_transformer)
    rt.set_steps(steps if steps is not None else rt.steps)


def summary(pipe_or_transformer) -> dict:
    """What the last run did, per cache context.

    Returns a dict: ``policy``, ``kind``, ``granularity``, ``steps``, ``blocks``,
    ``compute_fraction`` (computed block calls / all block calls, every context),
    ``cache_bytes`` (buffers held across steps), and ``contexts[name]`` with ``trace``
    (per call, per block: computed), ``compute_fraction`` and ``stats`` (per call:
    ``residual_rel_l1`` of the stored residuals, ``Σ|F_new - F_old| / Σ|F_old|``; dynamic
    policies add ``signal_rel_l1``, ``compute`` and the decider's entries).
    """
    return _runtime(pipe_or_transformer)[1].summary()
