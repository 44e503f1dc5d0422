"""Running and tuning for ``benchmarks/compare_diffusers.py`` (and ``compare_video.py``): one
measured pipeline call (linear FLOPs by our own hooks, host syncs, wall time, images), the
knob search of every system, the cached-step cost and the fullgraph compile check.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import sys
import time

import torch

from omnicache import metrics
from omnicache.cache import linear_flops
from omnicache.evaluate import class_acc
from omnicache.runtime.syncguard import count_host_syncs
from omnicache.tuning import Knob, nearest_setting

TOLERANCE = 0.03  # the band around each target compute fraction
# The host syncs counted per call (Tensor methods; on a CPU build there is no cuda.synchronize).
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero")


class FlopCounter:
    """Linear FLOPs of every ``nn.Linear`` in a transformer (2·in·out·rows), by forward hooks."""

    def __init__(self, transformer):
        self.flops = 0
        self.handles = [m.register_forward_hook(self._hook) for m in transformer.modules()
                        if isinstance(m, torch.nn.Linear)]

    def _hook(self, module, args, output):
        if torch.compiler.is_compiling():
            return
        self.flops += linear_flops(module, args[0])

    def remove(self):
        for h in self.handles:
            h.remove()


@dataclasses.dataclass
class Run:
    images: torch.Tensor
    flops: int
    syncs: int
    wall: float


def run_once(pipe, ctx, labels, seed, count=True):
    from omnicache.arena import digits_images
    counter = FlopCounter(pipe.transformer) if count else None
    try:
        with count_host_syncs(SYNC_METHODS) if count else contextlib.nullcontext() as syncs:
            t0 = time.perf_counter()
            out = ctx.call(pipe, labels, seed)
            wall = time.perf_counter() - t0
        return Run(digits_images(pipe, out), counter.flops if counter else 0, syncs.count if count else 0, wall)
    finally:
        if counter:
            counter.remove()


def build(system, ctx, knob, target):
    pipe = copy.deepcopy(ctx.base)
    system.install(pipe, knob, ctx, target)
    return pipe


class Tuner:
    """The same search for every system (see compare_diffusers' docstring;
    :func:`omnicache.tuning.nearest_setting`); memo: knob -> fraction on the tuning batch."""

    def __init__(self, system, ctx, ref_flops, bisect):
        self.system, self.ctx, self.ref_flops, self.bisect = system, ctx, ref_flops, bisect
        self.memo = {}

    def fraction(self, knob, target):
        if knob not in self.memo:
            pipe = build(self.system, self.ctx, knob, target)
            r = run_once(pipe, self.ctx, self.ctx.eval_labels[:self.ctx.tune_samples], self.ctx.seed)
            self.memo[knob] = r.flops / self.ref_flops
        return self.memo[knob]

    def tune(self, target):
        knob = Knob(*self.system.knob[1:])
        step = 1.0 / self.ctx.steps if knob.kind == "target" else None  # plans are cut in whole steps
        return nearest_setting(lambda k: self.fraction(k, target), target, knob, tolerance=TOLERANCE, memo=self.memo,
                               bisections=self.bisect, widen=4, tie="lowest", step=step)


def cached_step_cost(ctx, rounds):
    """Our FirstBlockCache against diffusers' at the same decisions: threshold 1e9 in both (the
    first call of each context computes, every later one reuses; warm-up 1 in ours = diffusers'
    first call), checked by equal FLOPs; median wall of ``rounds`` interleaved runs on the
    tuning batch. ratio = ours / diffusers (the issue's target: <= 1.05)."""
    from diffusers.hooks import FirstBlockCacheConfig as DFBC
    from omnicache.integrations import diffusers as oc
    from omnicache.policies import FirstBlockCacheConfig
    ours = copy.deepcopy(ctx.base)
    oc.enable(ours, FirstBlockCacheConfig(threshold=1e9, first_blocks=1, warmup=1))
    theirs = copy.deepcopy(ctx.base)
    theirs.transformer.enable_cache(DFBC(threshold=1e9))
    labels = ctx.eval_labels[:ctx.tune_samples]
    a, b = run_once(ours, ctx, labels, ctx.seed), run_once(theirs, ctx, labels, ctx.seed)
    wa, wb = [], []
    for r in range(rounds):  # A B, then B A: neither always runs first (caches, frequency drift)
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            pipe, walls = (ours, wa) if which == 0 else (theirs, wb)
            walls.append(run_once(pipe, ctx, labels, ctx.seed, count=False).wall)
    ma, mb = statistics.median(wa), statistics.median(wb)
    paired = statistics.median(x / y for x, y in zip(wa, wb))
    out = dict(same_flops=a.flops == b.flops, ours_flops=a.flops, diffusers_flops=b.flops,
               same_images=bool(torch.equal(a.images, b.images)), ours_walls=wa, diffusers_walls=wb,
               ours_wall_s=ma, diffusers_wall_s=mb, ratio=ma / mb, paired_ratio=paired, met=ma / mb <= 1.05,
               ours_syncs_per_step=a.syncs / ctx.steps, diffusers_syncs_per_step=b.syncs / ctx.steps)
    log(f"   cached-step cost, ours/diffusers FirstBlockCache at the same decisions: {out['ratio']:.3f} "
        f"(median of paired rounds {paired:.3f}; same FLOPs: {out['same_flops']})")
    return out


def first_line(e):
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return msg[0][:300] if msg else type(e).__name__


def compile_check(system, ctx, knob, target, backend, short_steps):
    """``torch.compile(pipe.transformer, fullgraph=True)`` on a short run: 'ok' or the error."""
    import torch._dynamo
    torch._dynamo.reset()
    sub = dataclasses.replace(ctx, steps=short_steps)
    try:
        pipe = copy.deepcopy(ctx.base)
        system.install(pipe, knob, sub, target)
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=backend)
        sub.call(pipe, ctx.eval_labels[:1], ctx.seed)
        return "ok"
    except Exception as e:
        return first_line(e)
    finally:
        torch._dynamo.reset()


def score_images(images, ref, labels, classifier):
    """The quality columns of a row (images against the uncached run's): PSNR, SSIM, class
    accuracy."""
    psnr = float(metrics.psnr(images, ref).mean()) if not torch.equal(images, ref) else math.inf
    return dict(psnr=psnr, ssim=float(metrics.ssim(images, ref).mean()),
                class_acc=class_acc(classifier, images, labels))


def log(msg):
    print(msg, file=sys.stderr, flush=True)
