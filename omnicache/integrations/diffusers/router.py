"""Learning-to-Cache on the user's own diffusers model: ``oc.train_router``.

    plan = oc.train_router(pipe, L2CConfig(compute_fraction=0.6), **pipe_call_kwargs)
    oc.enable(pipe, plan)              # a branch-level plan: attention / MLP per block

The router ``θ[steps, blocks, 2]`` (``β = sigmoid(θ)``) is trained on the frozen model
as on our runtime (:mod:`omnicache.policies.l2c`): refresh steps every ``refresh`` steps
compute everything; at the cache steps between, each branch submodule (the attention
and MLP submodules :class:`.adapters.BlockIO` declares, outputs taken before the block's
gate) returns ``β·f(x) + (1−β)·cache``, and that mixture is the cache the next cache step
reads. The inputs are teacher-forced: every call of the uncached recording run (each
cache context its own stream) is replayed with its recorded arguments. Per cache step
``t`` the loss is ``s_t² · mean((o_β − o_full)²)``, ``o`` the transformer's output and
``s_t`` the sensitivity of the scheduler's step to it (probed, as calibration does; 1
with ``run=``), so the loss weighs the error each step leaves in the next latent; plus
``λ · Σβ``. The optimisation (AdamW, clamp, progress bar, seed) and the export
(threshold or compute fraction, FLOPs measured per block and branch on this model's
linear layers) are the runtime's own (:func:`~omnicache.policies.l2c.router.optimize_router`,
:func:`~omnicache.policies.l2c.export.export_plan`).
"""

from __future__ import annotations

import torch

from .calibrate import DiffusersEngine
from .install import split

__all__ = ["train_router", "RouterEngine"]


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _mix(out, cache, beta):
    if isinstance(out, torch.Tensor):
        return beta * out + (1 - beta) * cache
    return type(out)(_mix(o, c, beta) if isinstance(o, torch.Tensor) else o for o, c in zip(out, cache))


class RouterEngine(DiffusersEngine):
    """:class:`.calibrate.DiffusersEngine` that also records every transformer call (its
    arguments and output, per context and step) and the linear FLOPs of each block's
    attention and MLP branch."""

    def _extra_hooks(self, rt) -> list:
        self.calls = {}  # context -> step -> (args, kwargs, output)

        def pre(module, args, kwargs):
            self._pending = (rt.current.name, rt.current.step, _clone(args), _clone(kwargs))

        def post(module, args, kwargs, out):
            name, step, a, kw = self._pending
            o = out[0] if isinstance(out, tuple) else out.sample
            self.calls.setdefault(name, {})[step] = (a, kw, o.detach().float().clone())

        return [self.transformer.register_forward_pre_hook(pre, with_kwargs=True),
                self.transformer.register_forward_hook(post, with_kwargs=True)]

    def _after_record(self, rt) -> None:
        self.bound = rt.bound
        if rt.outside_cost is None or any(c is None for p in rt.part_cost for c in p):
            raise RuntimeError("train_router: the recording run did not measure every block's branch FLOPs")
        rest = sum(p[-1] for p in rt.part_cost)
        self.flops = {"fixed": float(rt.outside_cost + rest), "block_attn": [float(p[0]) for p in rt.part_cost],
                      "block_mlp": [float(p[1]) for p in rt.part_cost],
                      "total": float(rt.outside_cost + sum(map(sum, rt.part_cost)))}


def train_router(pipe_or_transformer, config, *, run=None, steps: int | None = None, progress: bool = True,
                 **pipe_call_kwargs):
    """Train a Learning-to-Cache router on this model and export its branch-level ``CachePlan``.

    Args:
        pipe_or_transformer: a diffusers pipeline (its call is the training run) or a
            supported transformer driven by ``run``; its blocks must declare attention and
            MLP branches (:class:`.adapters.BlockIO`).
        config: ``L2CConfig``: ``refresh``, ``lam``, ``iters``, ``lr``, ``init``,
            ``weight_decay``, ``seed``; ``threshold`` or ``compute_fraction`` for the export.
            ``correction=True``: OmniCache's closed-loop ``(γ1, γ2)`` fitted on the exported
            plan (:meth:`.calibrate.DiffusersEngine.fit_plan`, on the same run), "L2C + γ";
            it needs a pipeline (the fit is against the uncached next latent, through the
            pipeline's scheduler).
        run, steps, **pipe_call_kwargs: the training run, as for :func:`.calibrate.calibrate`.
    """
    from ...plan import model_fingerprint
    from ...policies import L2CConfig
    from ...policies.l2c.export import export_plan
    from ...policies.l2c.router import optimize_router, refresh_mask

    if not isinstance(config, L2CConfig):
        raise TypeError(f"config must be an L2CConfig, got {type(config).__name__}")
    if config.plan_path is not None:
        raise ValueError("L2CConfig.plan_path: a saved plan needs no training; oc.enable(pipe, CachePlan.load(...))")
    transformer, pipe = split(pipe_or_transformer)
    if config.correction and pipe is None:  # refused before the training run
        raise ValueError("L2CConfig.correction: γ on a branch plan is fitted against the uncached next latent "
                         "through the pipeline's scheduler; pass a pipeline (not a bare transformer with run=...)")
    engine = RouterEngine(pipe_or_transformer, run=run, steps=steps, progress=progress, **pipe_call_kwargs)
    if not all(bb.io.has_branches for bb in engine.bound):
        missing = sorted({type(bb.module).__name__ for bb in engine.bound if not bb.io.has_branches})
        raise TypeError(f"train_router needs attention/MLP branches on every block; {', '.join(missing)} declare none")
    if engine.steps < 2:
        raise ValueError(f"steps: Learning-to-Cache needs >= 2 steps, got {engine.steps}")
    mask = refresh_mask(engine.steps, config.refresh)
    segments, cur = [], None
    for i, full in enumerate(mask):
        if full:
            cur = [i]
            segments.append(cur)
        else:
            cur.append(i)
    weights = [s * s for s in engine.scale]
    cache_steps = sum(len(s) - 1 for s in segments) * len(engine.calls)
    if not cache_steps:
        raise ValueError(f"L2CConfig.refresh={config.refresh} leaves no cache steps in {engine.steps} steps")

    state = {"mode": None, "beta": None, "cache": {}}
    saved = []
    for k, bb in enumerate(engine.bound):
        for kind, j, sub in bb.branches():
            saved.append((sub, vars(sub).get("forward")))

            def fwd(*args, _k=k, _kind=kind, _j=j, _orig=sub.forward, **kwargs):
                out = _orig(*args, **kwargs)
                key = (_k, _kind, _j)
                if state["mode"] == "record":
                    state["cache"][key] = _clone(out)
                elif state["mode"] == "mix":
                    out = _mix(out, state["cache"][key], state["beta"][_k, _kind])
                    state["cache"][key] = out
                return out
            sub.forward = fwd

    def loss_fn(theta, idx):
        beta = torch.sigmoid(theta)
        mse = beta.new_zeros(())
        for name, calls in engine.calls.items():
            for seg in segments:
                a, kw, _ = calls[seg[0]]
                state["mode"], state["cache"] = "record", {}
                with torch.no_grad():
                    transformer(*a, **kw)
                for t in seg[1:]:
                    a, kw, target = calls[t]
                    state["mode"], state["beta"] = "mix", beta[t]
                    out = transformer(*a, **kw)
                    o = out[0] if isinstance(out, tuple) else out.sample
                    mse = mse + weights[t] * (o.float() - target).square().mean()
        state["mode"] = None
        mse = mse / cache_steps
        penalty = beta[[i for i, full in enumerate(mask) if not full]].sum() / (cache_steps / len(engine.calls))
        return mse + config.lam * penalty, mse

    try:
        result = optimize_router(loss_fn, transformer, (engine.steps, engine.blocks, 2), 1, mask, engine.flops,
                                 iters=config.iters, lr=config.lr, batch=1, init=config.init,
                                 weight_decay=config.weight_decay, seed=config.seed, progress=progress,
                                 device=next(transformer.parameters()).device)
    finally:
        state["cache"] = {}
        for sub, f in saved:
            del sub.forward
            if f is not None:
                sub.forward = f
    loss, mse, expected = result.history[-1]
    meta = dict(lam=config.lam, final_loss=loss, final_mse=mse, expected_compute=expected,
                train_seconds=round(result.seconds, 1), training=dict(result.settings, refresh=config.refresh),
                beta=[[[round(float(v), 4) for v in pair] for pair in row] for row in result.beta.tolist()])
    meta.update(engine.meta())
    meta["model"] = model_fingerprint(transformer, engine.blocks)
    plan = export_plan(result.beta, result.refresh, engine.flops, threshold=config.threshold,
                       compute_fraction=config.compute_fraction, meta=meta)
    plan.meta["flops_per_step"] = engine.flops
    if config.correction:
        plan = engine.fit_plan(plan, order=2)
        plan.meta.update(policy="L2C+gamma", correction="closed-loop gamma (order 2)", gamma_fit=engine.gamma_fit)
    return plan


