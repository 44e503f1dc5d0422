"""Policy parameters fitted on the user's own diffusers model from one uncached run:
TeaCache's rescaling polynomial (:func:`fit_teacache`) and MagCache's magnitude ratios
(:func:`fit_magcache`).

    cfg = oc.fit_teacache(pipe, TeaCacheConfig(threshold=0.1), **pipe_call_kwargs)
    cfg = oc.fit_magcache(pipe, MagCacheConfig(threshold=0.06), **pipe_call_kwargs)
    oc.enable(pipe, cfg)

The run is the user's own, as for :func:`.calibrate.calibrate`: ``pipe(**pipe_call_kwargs)``
(its generators restored before the run) or ``run()`` with ``steps``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import torch
from tqdm import tqdm

from .calibrate import _Runs
from .install import disable, enable, runtime_of, split

__all__ = ["fit_teacache", "fit_magcache"]


def fit_teacache(pipe_or_transformer, config, *, run=None, steps: int | None = None, degree: int = 4,
                 progress: bool = True, **pipe_call_kwargs):
    """TeaCache's rescaling polynomial fitted on this model from one uncached run: returns
    ``config`` with ``coefficients`` such that ``p(rel L1 of block 0's modulated input)``
    predicts the relative L1 change of the remaining blocks' residual (every context's calls)."""
    import numpy as np

    from ...policies import TeaCacheConfig

    if not isinstance(config, TeaCacheConfig):
        raise TypeError(f"config must be a TeaCacheConfig, got {type(config).__name__}")
    transformer, pipe = split(pipe_or_transformer)
    runs = _Runs(pipe, run, pipe_call_kwargs)
    target = pipe if pipe is not None else transformer
    if steps is None and getattr(pipe, "scheduler", None) is None:
        raise ValueError("steps: with run=..., pass the number of steps the run takes (steps=N)")
    enable(target, dataclasses.replace(config, threshold=0.0), steps=steps)
    try:
        runs()
        s = runtime_of(transformer)[1].summary()
    finally:
        disable(target)
    xs, ys = [], []
    for ctx in s.contexts.values():
        for d in ctx["stats"][1:]:  # the first call has no previous one
            if d["signal_rel_l1"] is not None and d["residual_rel_l1"] is not None:
                xs.append(d["signal_rel_l1"])
                ys.append(d["residual_rel_l1"])
    if len(xs) <= degree:
        raise ValueError(f"fit_teacache: {len(xs)} points cannot fit degree {degree}; use more steps")
    return dataclasses.replace(config, coefficients=tuple(float(v) for v in np.polyfit(xs, ys, degree)))


@torch.no_grad()
def fit_magcache(pipe_or_transformer, config, *, run=None, steps: int | None = None, progress: bool = True,
                 **pipe_call_kwargs):
    """MagCache's magnitude ratios measured on this model from one uncached run: returns
    ``config`` (a ``MagCacheConfig``) with ``mag_ratios``, ``γ_t`` = the mean over tokens of
    ``‖r_t‖ / ‖r_{t-1}‖``, ``r`` the block stack's ``hidden_states`` residual (each block's,
    on models whose token layout changes between blocks, e.g. Latte), every cache
    context's tokens pooled (:func:`omnicache.policies.magcache.mag_ratios_from_residuals`;
    only the per-token norms are kept). Arguments as for :func:`calibrate`."""
    from ...policies import MagCacheConfig, NoCacheConfig
    from ...policies.magcache import mag_ratios_from_norms, token_norms

    if not isinstance(config, MagCacheConfig):
        raise TypeError(f"config must be a MagCacheConfig, got {type(config).__name__}")
    transformer, pipe = split(pipe_or_transformer)
    runs = _Runs(pipe, run, pipe_call_kwargs)
    if steps is None and getattr(pipe, "scheduler", None) is None:
        raise ValueError("steps: with run=..., pass the number of steps the run takes (steps=N)")
    target = pipe if pipe is not None else transformer
    enable(target, NoCacheConfig(), steps=steps, check_plan=False)
    _, rt = runtime_of(transformer)
    spans = list(rt.units)  # the whole stack, or each block where the token layout changes (Latte)
    norms: dict = {}  # step -> the token norms of its residual(s), call by call, span by span
    pending = {}
    bar = tqdm(desc="fit_magcache: recording", unit="call", disable=not progress, file=sys.stderr)

    def pre(u, module, args, kwargs):
        pending[u] = rt.bound[spans[u][0]].inputs(args, kwargs)["hidden_states"]

    def post(u, module, args, kwargs, out):
        r = rt.bound[spans[u][1] - 1].outputs(out)["hidden_states"] - pending.pop(u)
        norms.setdefault(rt.current.step, []).append(token_norms(r))
        if u == len(spans) - 1:
            bar.update()

    handles = []
    for u, (lo, hi) in enumerate(spans):
        handles.append(rt.bound[lo].module.register_forward_pre_hook(functools.partial(pre, u), with_kwargs=True))
        handles.append(rt.bound[hi - 1].module.register_forward_hook(functools.partial(post, u), with_kwargs=True))
    try:
        runs()
    finally:
        for h in handles:
            h.remove()
        bar.close()
        disable(target)
    if len(norms) < 2:
        raise ValueError(f"fit_magcache: the run made {len(norms)} step(s); ratios need at least 2")
    ratios = mag_ratios_from_norms([torch.cat(norms[t]) for t in sorted(norms)])
    return dataclasses.replace(config, mag_ratios=ratios)
