"""One diffusers transformer under a caching policy: its blocks' I/O mapped onto the cache core.

The model's own block loop runs; each block's ``forward`` is wrapped (:mod:`.install`). The
policy, units, per-context buffers, decisions and accounting are the core's
(:class:`omnicache.cache.CacheSession`); the adapter reads each block's streams by name
(:mod:`.models`) and calls it. Static plans: a unit's first block returns ``inp + F + γ1 D1 +
γ2 D2`` per cached stream, its other blocks their inputs; branch plans wrap each branch
submodule, which returns its pre-gate forecast (the block applies the current gate).
Dynamic policies: the first blocks, the declared signal, host decisions (per sample: the
computing rows run as a sub-batch of the ``batched`` arguments) or device ones (``torch.cond``
per cached block). ToCa: each block's top tokens. Steps count per cache context. FLOPs: each
call shape's linear FLOPs per block and branch are measured once, on a call that ran
everything (``nn.Linear`` hooks, then detached); every call counts its decisions at them.
"""

from __future__ import annotations

import time

import torch

from ...cache import REUSE, STORE, CacheSession, Costs, ResolvedPolicy, compute_or_reuse, select_rows
from ...cache.policy import FOREVER
from ...filters import grid_layout
from ..distributed import context_parallel_group
from .models import MODELS, model_blocks, model_grid

__all__ = ["DiffusersAdapter"]

NO_STEPS = "omnicache: the number of steps is unknown; pass enable(..., steps=N) or call the pipeline " \
           "(its scheduler's set_timesteps sets it)"


def _plain(x):
    """A fresh contiguous copy: both ``torch.cond`` branches must return the same layout (Flux's
    single block returns views into one concatenated tensor) and none may alias an input."""
    return x.clone(memory_format=torch.contiguous_format)


class DiffusersAdapter:
    """Everything :func:`.install.enable` installs on one transformer (see the module docstring)."""

    def __init__(self, transformer, pipe, config, steps, granularity, group, check_plan=True, per_sample=False):
        cls = type(transformer).__name__
        self.transformer, self.pipe, self.group, self.check_plan = transformer, pipe, group, check_plan
        self.bound, self.spec, self.per_sample = model_blocks(transformer), MODELS[cls], bool(per_sample)
        self.blocks, self.n = [b.module for b in self.bound], len(self.bound)
        self.policy = ResolvedPolicy(config, blocks=self.n, granularity=granularity,
                                     has_branches=all(b.io.has_branches for b in self.bound),
                                     check=self._check_plan, where="omnicache.integrations.diffusers", model=cls)
        if self.per_sample:
            undeclared = sorted({type(b.module).__name__ for b in self.bound if b.io.batched is None})
            if not self.spec.batch_first:
                raise TypeError(f"per_sample: {cls}'s blocks do not run the batch on their first dimension "
                                f"(ModelSpec.batch_first is False: {self.spec.note or 'declared so'})")
            if undeclared:
                raise TypeError(f"per_sample: block class(es) {', '.join(undeclared)} declare no batched "
                                f"arguments (models.BlockIO.batched)")
        self.video_grid = model_grid(transformer)
        self.session = s = CacheSession(self.policy, self.n, device=next(transformer.parameters()).device,
                                        stack=self.spec.stack, min_head=1, per_sample=self.per_sample,
                                        group=self.resolve_group, filter_setting=self._filter_setting)
        self.kind, self.granularity, self.units, self.nb = s.kind, s.granularity, s.units, s.nb
        self.moreg_frames = None
        if self.kind == "dynamic":
            norm1 = self.spec.norm1
            if s.signal == "modulated_input" and not isinstance(getattr(self.blocks[0], norm1 or "", None),
                                                                 torch.nn.Module):
                raise TypeError(f"{self.policy.name}Config needs the model's modulated input (block 0's "
                                f"ModelSpec.norm1); {cls} declares "
                                + (f"{norm1!r}, which block 0 does not have" if norm1 else "none"))
            head, end = s.units[0]
            lists = self.spec.blocks
            if not self.spec.stack and self.spec.interleave and head % len(lists) != (end - 1) % len(lists):
                # one residual from block `head` to block `end - 1` may not cross a change of layout
                raise ValueError(f"{type(config).__name__}.first_blocks / last_blocks: on {cls} the cached blocks "
                                 f"must start in the same block list as they end ({lists[(end - 1) % len(lists)]}); "
                                 f"got first_blocks={head}, last_blocks={self.n - end}")
            if self.policy.decider(FOREVER).motion:  # AdaCache's MoReg: the first block's frames
                if cls != "LatteTransformer3DModel" or self.per_sample:
                    raise ValueError(f"{type(config).__name__}.moreg: motion regularisation needs a video model whose "
                                     f"first block sees the frames (LatteTransformer3DModel, whole-batch decisions); "
                                     f"got {cls}" + (" with per_sample=True" if self.per_sample else ""))
                self.moreg_frames = transformer.config.video_length
        self.current = self.step_actions = self.g1 = self.g2 = None
        self.inp, self.stats_out = [None] * len(self.units), {}
        self.inp0 = self.norm1_out = None
        self.some = self.rows = None  # host decisions of the current call
        self.device_first, self.share = False, [1.0] * self.n
        self.fitting = None  # calibration: at a reuse unit, (ctx, u, pairs) -> (g1, g2) from the true output
        self.branch_shape = {}  # (block, kind, j) -> None (a tensor) or the tuple length of its output
        self.call_key, self.counts, self.batch, self.wall = None, None, 0, None
        if steps is not None:
            self.set_steps(steps)

    # ------------------------------------------------------------------ plan, steps, contexts
    def _check_plan(self, plan):
        if self.check_plan:
            plan.check_model(self.transformer, self.n)

    def _filter_setting(self, plan, order):
        setting = plan.meta.get("filter")
        if not setting:
            return None
        if self.video_grid is None or tuple(setting.get("grid", ())) != self.video_grid or plan.granularity == "branch":
            raise ValueError(f"CachePlan.meta.filter: stage-aware filtering needs a video model's token grid "
                             f"(LatteTransformer3DModel, step/block plans); got grid {setting.get('grid')} on "
                             f"{type(self.transformer).__name__} (grid {self.video_grid})")
        return self.video_grid, {k: v for k, v in setting.items() if k != "grid"}

    def grid_layout(self, u):
        """``(to_grid, from_grid)`` between unit ``u``'s residual layout and ``[B, F*H*W, D]``."""
        return grid_layout(self.video_grid, self.bound[self.units[u][0]].temporal)

    def set_steps(self, steps: int):
        """Build what a run of ``steps`` follows and start a new run in every context."""
        self.session.set_steps(steps)

    @property
    def steps(self):
        return self.session.steps

    def resolve_group(self):
        """The group the dynamic statistics are summed over: ``enable(group=...)`` or that of
        diffusers' context parallelism on the transformer (None: no reduction)."""
        return self.group if self.group is not None else context_parallel_group(self.transformer)

    def prepare(self, ctx):
        """Set what the next call of ``ctx`` reads; returns its forward variant's key (or None)."""
        self.current, s = ctx, self.session
        if s.device_mode:  # the first call (allocating) and the steady state: one variant each
            return ("device", ctx.decisions is not None)
        if self.kind != "static":
            return None
        if s.steps is None:
            raise RuntimeError(NO_STEPS)
        self.step_actions = s.step_actions(ctx, ctx.step)
        self.g1, self.g2 = s.gammas(ctx.step)
        allocated = {u for u, _ in ctx.units}
        return (self.step_actions, self.g1 is not None, self.g2 is not None,
                all(u in allocated for u, a in enumerate(self.step_actions) if a == STORE))

    # ------------------------------------------------------------------ around a call (eager)
    def before_call(self, key, batch):
        """A call starts: its costs' key (its tensor arguments' shapes; a ToCa partial step's are
        its own) and batch; the Linear hooks count it when its costs are not known yet."""
        ctx = self.current
        if self.kind == "token" and ctx is not None and ctx.step > 0 and not self.session.full[ctx.step]:
            key = (key, "partial")  # its tokens' FLOPs: measured once, as it runs
        known = key in self.session.costs
        self.call_key, self.batch = key, batch
        self.installer.linear_hooks(not known)
        self.counts = None if known else [[0.0] * (self.nb + 1) for _ in range(self.n)] + [[0.0]]
        if self.wall is None or all(c.step == 0 for c in self.session.contexts.values()):
            self.wall = [time.perf_counter(), 0.0]  # a run starts

    def count_linear(self, index, part, flops):
        """``flops`` of one ``nn.Linear`` call in block ``index`` (-1: outside), branch ``part``."""
        if self.counts is not None:
            self.counts[index][part if index >= 0 else 0] += flops

    def after_call(self):
        """The call's bookkeeping: what it did, into the session; its costs, if it ran everything."""
        ctx, s = self.current, self.session
        if self.kind == "static":
            stats = {"stored": [self.stats_out.get(u) for u, a in enumerate(self.step_actions) if a == STORE]}
        elif self.kind == "dynamic" and not s.device_mode:
            dec = ctx.decisions.history[-1]["compute"]
            rows = [i for i, c in enumerate(dec) if c] if self.rows is not None else None
            stats = {"stored": self.stats_out.get(0), "rows": rows}
        else:
            stats = {}
        self.stats_out = {}
        s.record(ctx, ctx.step, stats, share=self.share, key=self.call_key,
                 measured=isinstance(self.call_key, tuple) and self.call_key[-1:] == ("partial",))
        call = ctx.log[ctx.step]
        full = self.device_first if s.device_mode else all(all(p == 1 for p in part) for part in call.ran)
        if self.counts is not None and full and any(map(sum, self.counts[:-1])):
            partial = s.costs.get(self.call_key[0]) if self.call_key[-1:] == ("partial",) else None
            s.costs[self.call_key] = Costs(self.counts[-1][0], [list(p) for p in self.counts[:-1]],
                                           full=partial.uncached if partial is not None else None)
        self.counts = None
        s.end_call(ctx)
        self.wall[1] = time.perf_counter()

    def summary(self):
        wall = self.wall[1] - self.wall[0] if self.wall else 0.0
        return self.session.summary(wall_s=wall, batch=self.batch, rows_per_sample=1)

    # ------------------------------------------------------------------ units
    def _reuse_unit(self, k, u, inputs, g1, g2):
        lo, hi = self.units[u]
        if k != lo:  # the unit's residual was applied at its first block
            return self.bound[k].pack(inputs)
        units, out, passed = self.current.units, {}, self.bound[k].io.passed
        for name, x in inputs.items():
            cu = units.get((u, name))
            if cu is not None and x is not None:
                out[name] = cu.reuse(x, g1, g2)
            else:  # None: the block returns no such stream (SD3's last)
                out[name] = None if hi - lo == 1 and name not in passed else x
        return self.bound[k].pack(out)

    def _store_unit(self, k, u, out):
        outs, ins, ctx = self.bound[k].outputs(out), self.inp[u], self.current
        layout = self.grid_layout(u) if self.session.filter is not None else None
        # the step is read only where a unit filters (its cut-off moves with the progress)
        progress = ctx.step / max((self.steps or 1) - 1, 1) if layout is not None else 0.0
        for name, x in outs.items():
            if x is not None and ins.get(name) is not None:
                stats = self.session.unit(ctx, u, name, x, layout).store(x, ins[name], progress)
                if name == "hidden_states":
                    self.stats_out[u] = stats
        self.inp[u] = None

    # ------------------------------------------------------------------ blocks
    def block_forward(self, k, orig, *args, **kwargs):
        if self.session.device_mode:
            return self._device_block(k, orig, args, kwargs)
        if self.kind == "dynamic":
            return self._dynamic_block(k, orig, args, kwargs)
        if self.session.steps is None or (self.kind == "static" and self.step_actions is None):
            raise RuntimeError(NO_STEPS)
        if self.kind == "token":
            return self._token_block(k, orig, args, kwargs)
        if self.granularity == "branch":  # the block runs; its branch submodules compute or reuse
            return orig(*args, **kwargs)
        u = self.session.unit_of[k]
        lo, hi = self.units[u]
        act = self.step_actions[u]
        if act == REUSE and self.fitting is None:
            return self._reuse_unit(k, u, self.bound[k].inputs(args, kwargs, passed=True), self.g1, self.g2)
        if k == lo and act != 0:  # STORE, or a reuse a calibration runs to see its true output
            self.inp[u] = self.bound[lo].inputs(args, kwargs)
        out = orig(*args, **kwargs)
        if k == hi - 1 and act == STORE:
            self._store_unit(k, u, out)
        elif k == hi - 1 and act == REUSE:
            return self._fit_unit(k, u, out)
        return out

    def _fit_unit(self, k, u, out):
        """Calibration at a reuse step: the unit ran (its true output); ``fitting`` chooses the
        coefficients against it and the unit returns the forecast it would reuse."""
        ins, outs, units = self.inp[u], self.bound[k].outputs(out), self.current.units
        self.inp[u] = None
        pairs = {n: (units[(u, n)], ins[n], x) for n, x in outs.items()
                 if x is not None and ins.get(n) is not None and (u, n) in units}
        g1, g2 = self.fitting(self.current, u, pairs, self.g1 is not None, self.g2 is not None)
        return self.bound[k].pack({n: pairs[n][0].reuse(pairs[n][1], g1, g2) if n in pairs else x
                                   for n, x in outs.items()})

    def branch_forward(self, k, kind, j, orig, module, *args, **kwargs):
        """Branch ``kind`` of block ``k`` (its ``j``-th submodule): at a reuse step its cached
        pre-gate output ``F + γ1 D1 + γ2 D2`` (the block applies the current gate); at a store
        step it runs and its output is stored."""
        u, key = self.nb * k + kind, (k, kind, j)
        act, ctx = self.step_actions[u], self.current
        if act == REUSE:
            n = self.branch_shape[key]
            if n is None:
                return ctx.units[(u, (j, 0))].forecast(self.g1, self.g2)
            return tuple(ctx.units[(u, (j, e))].forecast(self.g1, self.g2) if (u, (j, e)) in ctx.units else None
                         for e in range(n))
        out = orig(*args, **kwargs)
        if act == STORE:
            single = isinstance(out, torch.Tensor)
            self.branch_shape.setdefault(key, None if single else len(out))
            for e, x in enumerate((out,) if single else out):
                if isinstance(x, torch.Tensor):
                    stats = self.session.unit(ctx, u, (j, e), x).store(x)
                    if j == e == 0:
                        self.stats_out[u] = stats
        return out

    def _token_block(self, k, orig, args, kwargs):
        bb, ctx = self.bound[k], self.current
        if not bb.io.bare:
            raise TypeError(f"{self.policy.name}Config: token-wise caching needs blocks that return hidden_states "
                            f"alone; {type(bb.module).__name__} returns {bb.io.returns}")
        cache, h = self.session.tokens(ctx, k), bb.inputs(args, kwargs)["hidden_states"]
        if self.session.full[ctx.step] or cache.F is None or cache.F.shape != h.shape:
            self.share[k] = 1.0
            return cache.full(orig(*args, **kwargs), h)
        keep = self.policy.token_keep(h.shape[1])
        self.share[k] = keep / h.shape[1]

        def run(sub):
            a, kw = bb.with_input(args, kwargs, "hidden_states", sub)
            return orig(*a, **kw)

        return cache.partial(run, h, keep, self.policy.magnitude_weight)

    # ------------------------------------------------------------------ dynamic, host decisions
    def _head_block(self, k, orig, args, kwargs, decide):
        """A block before the cached ones: it runs; the last of them hands the signal to ``decide``."""
        bb = self.bound[k]
        if k == 0:
            self.inp0 = bb.inputs(args, kwargs)["hidden_states"]
        out = orig(*args, **kwargs)
        if k == self.units[0][0] - 1:
            h = bb.outputs(out)["hidden_states"]
            sig = self.norm1_out if self.session.signal == "modulated_input" else h - self.inp0
            motion = None
            if self.moreg_frames:  # AdaCache's MoReg: the clip's motion at this step (one more host read)
                x = self.inp0.reshape(-1, self.moreg_frames, *self.inp0.shape[1:]).float()
                motion = [((x[:, 1:] - x[:, :-1]).abs().mean() / x.abs().mean().clamp_min(1e-12)).item()]
            self.norm1_out = self.inp0 = None
            decide(self.current, sig, motion)
        return out

    def _host_decide(self, ctx, sig, motion):
        _, self.some = ctx.decisions.decide(sig, motion)
        self.rows = ctx.decisions.rows

    def _dynamic_block(self, k, orig, args, kwargs):
        head, end = self.units[0]
        if k < head:
            return self._head_block(k, orig, args, kwargs, self._host_decide)
        if k >= end:  # DBCache's back blocks: every call, on the computed or reused state
            return orig(*args, **kwargs)
        bb = self.bound[k]
        if not self.some:
            return self._reuse_unit(k, 0, bb.inputs(args, kwargs, passed=True), None, None)
        if self.rows is None:  # every sample computes
            if k == head:
                self.inp[0] = bb.inputs(args, kwargs)
            out = orig(*args, **kwargs)
            if k == end - 1:
                self._store_unit(k, 0, out)
            return out
        # some samples compute: the block runs on their rows; the other rows reuse (the cached
        # residual at the first cached block, unchanged through the others)
        rows, ctx, inputs = self.rows, self.current, bb.inputs(args, kwargs, passed=True)
        sub_args, sub_kwargs = bb.sub_batch(args, kwargs, rows, ctx.decisions.samples)
        out = bb.outputs(orig(*sub_args, **sub_kwargs))
        if k == head:
            self.inp[0] = {n: inputs[n] for n in bb.io.cached}
            base = bb.outputs(self._reuse_unit(k, 0, inputs, None, None))
        else:
            base = inputs
        full = {n: base[n] if n in bb.io.passed else None if x is None or base.get(n) is None
                else base[n].index_copy(0, rows, x) for n, x in out.items()}
        if k == end - 1:  # the computed rows' residual, into their rows of F
            ins = self.inp[0]
            for name, x in out.items():
                cu = ctx.units.get((0, name))
                if x is not None and cu is not None and ins.get(name) is not None:
                    stats = cu.store_rows(rows, x, ins[name].index_select(0, rows))
                    if name == "hidden_states":
                        self.stats_out[0] = stats
            self.inp[0] = None
        return bb.pack(full)

    def capture_norm1(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.norm1_out = out.detach()

    # ------------------------------------------------------------------ dynamic, device decisions
    def _device_decide(self, ctx, sig, motion):
        self.device_first = ctx.decisions is None
        self.session.device_decisions(ctx, sig).decide(sig)

    def _device_block(self, k, orig, args, kwargs):
        head, end = self.units[0]
        if k < head:
            return self._head_block(k, orig, args, kwargs, self._device_decide)
        if k >= end:
            return orig(*args, **kwargs)
        bb, ctx = self.bound[k], self.current
        inputs, dec = bb.inputs(args, kwargs), ctx.decisions  # the cached streams
        if k == head:
            self.inp[0] = inputs
        if self.device_first:  # nothing stored yet: every sample computes
            out = bb.outputs(orig(*args, **kwargs))
        else:
            names = [n for n, x in inputs.items() if x is not None]

            def reused():
                if k != head:
                    return {n: inputs[n] for n in names}
                return {n: inputs[n] + ctx.units[(0, n)].F if (0, n) in ctx.units else inputs[n] for n in names}

            def compute(mask):
                out, back = bb.outputs(orig(*args, **kwargs)), reused()
                if not self.per_sample:  # one decision for the whole batch: the block's output
                    return {n: _plain(out[n] if out.get(n) is not None else back[n]) for n in names}
                return {n: select_rows(mask, out[n], back[n]) if out.get(n) is not None else _plain(back[n])
                        for n in names}

            def reuse(mask):
                return {n: _plain(x) for n, x in reused().items()}

            result = compute_or_reuse(dec, compute, reuse, (dec.mask,), where=self.session.mode == "device-where",
                                      mix=False)
            out = {n: result.get(n) for n in inputs}
            if bb.io.passed:  # what the block returns unchanged
                given = bb.inputs(args, kwargs, passed=True)
                out.update({n: given[n] for n in bb.io.passed})
        if k == end - 1:  # F = where(compute, out - inp, F) per cached stream (allocated at the first call)
            for name, x in out.items():
                if x is not None and self.inp[0].get(name) is not None:
                    dec.store(self.session.unit(ctx, 0, name, x).F, x, self.inp[0][name])
            self.inp[0] = None
        return bb.pack(out)
