"""Installing caching on a diffusers transformer and taking it off again.

:func:`enable` wraps each block's ``forward`` (an instance attribute) and, for branch
plans, each branch submodule's (:class:`.adapters.BlockIO` ``attn`` / ``mlp``), wraps
``cache_context`` so each context keeps its own state, hooks the pipeline scheduler's
``set_timesteps`` (the number of steps, and a new run), registers the FLOP counters on
the ``nn.Linear`` layers (by block and branch), and installs the static plan's
``forward`` variants. Each distinct per-step pattern runs through its own copy of the
transformer's ``forward`` code object, installed before the call (outside any compiled region), so
``torch.compile(transformer, fullgraph=True)`` compiles each pattern once and never
recompiles from step to step. With diffusers hooks on the transformer (context
parallelism's input split, ...), the variant is installed beneath them, where the class
``forward`` was. :func:`disable` puts everything back as it was.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from ...cache import linear_flops
from ...plan import CachePlan
from .adapter import DiffusersAdapter
from .models import MODELS

__all__ = ["enable", "disable", "reset", "summary", "adapter_of"]

_ATTR = "_omnicache_runtime"


def split(obj):
    """``(transformer, pipeline or None)`` from a pipeline or a transformer."""
    if isinstance(obj, torch.nn.Module):
        return obj, None
    t = getattr(obj, "transformer", None)
    if isinstance(t, torch.nn.Module):
        return t, obj
    raise TypeError(f"expected a diffusers pipeline or transformer, got {type(obj).__name__}")


class _Installer:
    """The eager side of an adapter: forward variants, context switches, call hooks."""

    def __init__(self, rt: DiffusersAdapter):
        self.rt, self.variants, self.inner_saved = rt, {}, None
        # calibration may wrap each installed forward (e.g. to probe a reuse step): f -> f'
        self.wrap_forward, self.wrapped = None, []
        self.running = []  # per block: how many of its calls are running (while counting FLOPs)

    def switch(self, name):
        key = self.rt.prepare(self.rt.session.context(name))
        if key is None:
            return
        fwd = self.variants.get(key)
        if fwd is None:  # a distinct code object per pattern: compiled once each, never recompiled
            fn = self.class_forward
            code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_omnicache_{len(self.variants)}")
            f = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
            f.__kwdefaults__, f.__qualname__ = fn.__kwdefaults__, fn.__qualname__
            f.__dict__.update(fn.__dict__)
            fwd = self.variants[key] = types.MethodType(f, self.rt.transformer)
        self._install(fwd)

    def _install(self, fwd):
        """Make ``fwd`` the transformer's forward: an instance attribute or, when diffusers hooks
        wrap the forward (context parallelism's input split, ...), the innermost hook's."""
        transformer = self.rt.transformer
        if self.wrap_forward is not None:
            fwd = self.wrap_forward(fwd)
            self.wrapped.append(fwd)
        refs = getattr(vars(transformer).get("_diffusers_hook"), "_fn_refs", None)
        if not refs:
            transformer.forward = fwd
            return
        ref = refs[0]  # wraps what was the forward when the first hook was registered
        attr = "original_forward" if ref.original_forward is not None else "forward"
        old = getattr(ref, attr)
        if not self.is_variant(old) and self.inner_saved is None:
            self.inner_saved = (ref, attr, old)
        setattr(ref, attr, fwd)

    def is_variant(self, fn):
        return any(fn == v for v in self.variants.values()) or any(fn is w for w in self.wrapped)

    def before_call(self, module, args, kwargs=None):
        tensors = [(k, v) for k, v in (*enumerate(args), *(kwargs or {}).items()) if isinstance(v, torch.Tensor)]
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in tensors)
        self.rt.before_call(key, tensors[0][1].shape[0] if tensors and tensors[0][1].ndim else 0)

    def linear_hooks(self, on: bool):
        """Attach (``on``) or detach the ``nn.Linear`` FLOP-counting hooks."""
        if on and not self.linear_handles:
            self.linear_handles = [m.register_forward_hook(h) for m, h in self.linears]
            # a block's layer called from outside the block (DiT's final layer runs block 0's
            # norm1.emb) is counted outside: the count follows which block is running
            running = self.running = [0] * len(self.rt.blocks)
            for k, blk in enumerate(self.rt.blocks):
                self.linear_handles.append(blk.register_forward_pre_hook(
                    lambda m, a, k=k: running.__setitem__(k, running[k] + 1)))
                self.linear_handles.append(blk.register_forward_hook(
                    lambda m, a, o, k=k: running.__setitem__(k, running[k] - 1)))
        elif not on and self.linear_handles:
            for h in self.linear_handles:
                h.remove()
            self.linear_handles = []

    def after_call(self, module, args, output):
        self.rt.after_call()
        if self.rt.kind == "static" or self.rt.session.device_mode:
            self.switch(self.rt.current.name)
        return output


def _linear_hook(rt, index, part, module, args, output):
    """Count an ``nn.Linear`` call's FLOPs (eager calls only, :func:`omnicache.cache.linear_flops`)
    by block ``index`` (-1: outside the blocks, or its block is not running) and ``part`` (the
    branch's index, -1 the rest)."""
    if not torch.compiler.is_compiling():
        if index >= 0 and not rt.installer.running[index]:
            index = -1
        rt.count_linear(index, part, linear_flops(module, args[0]))


def enable(pipe_or_transformer, config, *, steps: int | None = None, granularity: str | None = None,
           group=None, check_plan: bool = True, per_sample: bool = False):
    """Enable feature caching on a diffusers transformer (or a pipeline's ``.transformer``).

    Args:
        pipe_or_transformer: a pipeline with a ``transformer`` or one of the transformers
            :data:`~omnicache.integrations.diffusers.MODELS` names.
        config: a :class:`~omnicache.plan.CachePlan` (e.g. from :func:`calibrate`) or a
            policy config (``FORAConfig``, ``TaylorSeerConfig``, ``DeltaDiTConfig``,
            ``NoCacheConfig``, ``TeaCacheConfig``, ``FirstBlockCacheConfig``, ...). A config
            that must be fitted on the model (``OmniCacheConfig``, ``L2CConfig`` without
            ``plan_path``) is refused here: calibrate it first.
        steps: sampling steps per run; with a pipeline, read from its scheduler if None.
            Without a pipeline, a plan's own steps, and any other static policy needs it here.
        granularity: ``"step"``, ``"block"`` or ``"branch"``; default the policy's. ``"branch"``
            (FORA's and Learning-to-Cache's plans) caches each block's attention and MLP
            submodule outputs before the block applies its gate (the branches each block class
            declares, :class:`.models.BlockIO`); on a model whose block classes declare none,
            a branch policy runs at ``"block"`` (a block computes where either branch does,
            :meth:`CachePlan.to_block`), as does a branch plan with ``granularity="block"``.
        group: a ``torch.distributed`` process group over which the sequence is sharded;
            dynamic policies sum their statistics over it so every rank decides alike. None:
            the group of diffusers' context parallelism when it is enabled on the
            transformer, else no reduction.
        check_plan: refuse a plan made for another model (class, block count, config
            fingerprint in ``plan.meta["model"]``). ``False`` is the documented override for
            deliberately reusing a plan on another model.
        per_sample: dynamic policies decide per sample (batch row): the samples that must
            compute run the remaining blocks as a sub-batch (the block arguments
            :class:`.models.BlockIO` declares ``batched``, ``index_select``-ed), the others
            reuse, as our runtime's executor does. Default False: one decision for the whole
            batch, as diffusers' own FirstBlockCache. No effect on static plans (every sample
            follows the plan).

    Raises:
        RuntimeError: caching is already enabled on this transformer.
        TypeError: the model class is not supported (the message lists the supported ones).
        ValueError: a plan that does not fit, or a static policy with no way to know the steps.
    """
    transformer, pipe = split(pipe_or_transformer)
    if hasattr(transformer, _ATTR):
        raise RuntimeError(f"omnicache is already enabled on this {type(transformer).__name__}; "
                           f"call omnicache.integrations.diffusers.disable(...) first")
    cls = type(transformer).__name__
    if cls not in MODELS:
        raise TypeError(f"omnicache.integrations.diffusers does not support {cls}; supported: "
                        f"{', '.join(MODELS)} (or declare it: omnicache.integrations.diffusers.register)")
    if steps is None and pipe is None and isinstance(config, CachePlan):
        steps = config.steps  # a bare transformer runs the plan's steps
    rt = DiffusersAdapter(transformer, pipe, config, steps, granularity, group, check_plan, per_sample=per_sample)
    if steps is None and rt.kind == "static" and getattr(pipe, "scheduler", None) is None:
        raise ValueError(f"steps: a static policy on a bare {cls} needs enable(..., steps=N) "
                         f"(with a pipeline, its scheduler gives the steps)")
    if check_plan and pipe is not None and isinstance(config, CachePlan):
        config.check_scheduler(getattr(pipe, "scheduler", None))
    inst = rt.installer = _Installer(rt)
    vt = vars(transformer)
    inst.saved = {name: vt[name] for name in ("forward", "cache_context") if name in vt}
    inst.class_forward = type(transformer).forward
    inst.saved_blocks = [vars(blk).get("forward") for blk in rt.blocks]
    for k, blk in enumerate(rt.blocks):
        blk.forward = functools.partial(rt.block_forward, k, blk.forward)
    # branch plans: each branch submodule's forward (its pre-gate output is cached)
    branch_subs = [(k, kind, j, sub) for k, bb in enumerate(rt.bound)
                   for kind, j, sub in bb.branches(rt.session.branches)]
    inst.saved_branches = []
    if rt.granularity == "branch":
        for k, kind, j, sub in branch_subs:
            inst.saved_branches.append((sub, vars(sub).get("forward")))
            sub.forward = functools.partial(rt.branch_forward, k, kind, j, sub.forward, sub)
    inst.handles = []
    if rt.kind == "dynamic" and rt.session.signal == "modulated_input":  # TeaCache: block 0's norm1
        inst.handles.append(getattr(rt.blocks[0], MODELS[cls].norm1).register_forward_hook(rt.capture_norm1))
    index = {id(m): (b, -1) for b, blk in enumerate(rt.blocks) for m in blk.modules()}
    index.update({id(m): (k, kind) for k, kind, _, sub in branch_subs for m in sub.modules()})
    inst.linears = [(m, functools.partial(_linear_hook, rt, *index.get(id(m), (-1, -1))))
                    for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    inst.linear_handles = []
    inst.linear_hooks(True)
    inst.handles.append(transformer.register_forward_pre_hook(torch.compiler.disable(inst.before_call),
                                                              with_kwargs=True))
    inst.handles.append(transformer.register_forward_hook(torch.compiler.disable(inst.after_call)))

    orig_cc = getattr(transformer, "cache_context", None)
    if orig_cc is not None:
        @contextlib.contextmanager
        def cache_context(name, **kwargs):
            with orig_cc(name, **kwargs):
                inst.switch(name)
                try:
                    yield
                finally:
                    inst.switch(None)
        transformer.cache_context = cache_context
    if pipe is not None and hasattr(pipe, "scheduler"):
        sched = pipe.scheduler
        inst.saved_sched = (sched, vars(sched).get("set_timesteps"))
        orig_st = sched.set_timesteps

        @functools.wraps(orig_st)
        def set_timesteps(*args, **kwargs):
            res = orig_st(*args, **kwargs)
            rt.set_steps(len(sched.timesteps))
            inst.switch(rt.current.name if rt.current is not None else None)
            return res
        sched.set_timesteps = set_timesteps
    setattr(transformer, _ATTR, rt)
    if rt.session.steps is not None or rt.kind == "dynamic":
        inst.switch(None)
    else:
        rt.current = rt.session.context(None)
    return transformer


def adapter_of(obj):
    """``(transformer, DiffusersAdapter)`` of a transformer or pipeline with caching enabled."""
    transformer, _ = split(obj)
    rt = getattr(transformer, _ATTR, None)
    if rt is None:
        raise RuntimeError(f"omnicache is not enabled on this {type(transformer).__name__}")
    return transformer, rt


def disable(pipe_or_transformer) -> None:
    """Remove everything :func:`enable` installed; the model is as it was before."""
    transformer, rt = adapter_of(pipe_or_transformer)
    inst = rt.installer
    for h in inst.handles:
        h.remove()
    inst.linear_hooks(False)
    for blk, fwd in [*zip(rt.blocks, inst.saved_blocks), *inst.saved_branches]:
        del blk.forward
        if fwd is not None:
            blk.forward = fwd
    refs = getattr(vars(transformer).get("_diffusers_hook"), "_fn_refs", None)
    if refs:  # a static variant beneath diffusers hooks: put back what it replaced
        ref = refs[0]
        for attr in ("original_forward", "forward"):
            if inst.is_variant(getattr(ref, attr)):
                saved = inst.inner_saved
                setattr(ref, attr, saved[2] if saved is not None and saved[:2] == (ref, attr) else
                        inst.saved.get("forward", types.MethodType(inst.class_forward, transformer)))
    for name in ("forward", "cache_context"):
        cur = vars(transformer).get(name)
        if name == "forward" and cur is not None and not inst.is_variant(cur) and cur is not inst.saved.get(name):
            continue  # installed after enable() (diffusers hooks): left in place
        vars(transformer).pop(name, None)
        if name in inst.saved:
            setattr(transformer, name, inst.saved[name])
    if hasattr(inst, "saved_sched"):
        sched, st = inst.saved_sched
        del sched.set_timesteps
        if st is not None:
            sched.set_timesteps = st
    delattr(transformer, _ATTR)


def reset(pipe_or_transformer, steps: int | None = None) -> None:
    """Start a new run in every cache context (optionally with a new number of steps)."""
    _, rt = adapter_of(pipe_or_transformer)
    rt.set_steps(steps if steps is not None else rt.session.steps)
    rt.installer.switch(rt.current.name if rt.current is not None else None)


def summary(pipe_or_transformer):
    """What the last run did: a :class:`omnicache.cache.RunSummary`.

    ``compute_fraction``: linear-layer FLOPs spent ÷ uncached, every context together;
    ``cache_bytes`` (buffers held across steps); ``steps``, ``blocks``, ``kind``,
    ``granularity``; ``contexts[name]`` with ``trace`` (per call, per block: computed),
    ``compute_fraction``, ``block_fraction`` (computed block calls ÷ all) and ``stats``
    (per call: ``residual_rel_l1`` of the stored residuals, ``Σ|F_new - F_old| / Σ|F_old|``;
    dynamic policies add ``signal_rel_l1``, ``compute`` and the decider's entries).
    """
    return adapter_of(pipe_or_transformer)[1].summary()
