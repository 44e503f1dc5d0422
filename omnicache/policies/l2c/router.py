"""Learning-to-Cache (Ma et al., 2024): a learned router over branches, exported as a static plan.

**Router.** ``θ ∈ R^{steps × blocks × 2}`` (attention, MLP), ``β = sigmoid(θ)``: one
weight per step and branch, the same for every input (input-invariant, timestep-variant).

**Refresh pattern.** Steps ``0, N, 2N, …`` (``refresh=N``; the paper alternates, ``N = 2``)
compute every branch. The other steps are *cache steps*: there each branch either
computes or reuses its value from the step before.

**Training** (the model stays frozen; only ``θ`` gets gradients), through any engine
(:meth:`omnicache.cache.Engine.mixed_error`). While training, at a cache step ``i`` each
branch outputs the mixture

    m = β[i, b, k] · f(h) + (1 − β[i, b, k]) · cache[b, k]

(``f`` the branch's pre-gate output, gated afterwards by the step's adaLN gate exactly as
a cached branch is applied), and ``m`` becomes the cache the next cache step reads: at
β ∈ {0, 1} this is what the engines do (store on compute, keep on reuse). The inputs are
teacher-forced: every step starts from the uncached trajectory's state, and each refresh
segment (a full step and the cache steps after it) starts from the full step's branch
outputs. Per cache step ``i`` the engine measures the output's squared error against the
uncached output, weighted by what it leaves in the next latent (our runtime: the guided
noise prediction's, ``ε = x_s + (1 − s) v``; diffusers: times the scheduler step's
sensitivity); the loss of an iteration is its mean over the cache steps (every segment,
context and sample of a minibatch) plus ``λ · Σ_{b,k} β[i, b, k]`` averaged over the cache
steps. ``θ`` is clamped to ``[−5, 5]`` after each AdamW step. Our runtime trains on
trajectories the model generates itself (``data="self"``) or on the digits data set noised
to each step's time (``data="digits"``); diffusers on the recorded calls of the user's run.

**Export.** Thresholding β gives a branch-level :class:`~omnicache.plan.CachePlan`:
refresh steps compute everything; at cache steps a branch computes where
``β > threshold``. With ``compute_fraction`` the threshold is calibrated instead: cache-step
branches are ranked by β and the cut whose plan's FLOP fraction is nearest the target
is taken. The plan's ``meta`` reports the share of branches removed in cache steps and
overall, the threshold, λ and the training curve's end points.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch
from tqdm import tqdm

from .export import branch_costs

__all__ = ["RouterResult", "refresh_mask", "router_loss", "train_router", "optimize_router", "expected_compute",
           "THETA_BOUND"]

THETA_BOUND = 5.0


def refresh_mask(steps: int, refresh: int) -> list[bool]:
    """Full-refresh steps: ``i % refresh == 0`` (the paper's alternation is ``refresh=2``)."""
    return [i % refresh == 0 for i in range(steps)]


@dataclasses.dataclass
class RouterResult:
    """A trained router: ``theta`` (steps, blocks, 2), ``refresh`` mask, the loss history
    (per iteration: total, reconstruction mse, expected compute fraction) and timings."""

    theta: torch.Tensor
    refresh: list
    history: list
    seconds: float
    settings: dict

    @property
    def beta(self) -> torch.Tensor:
        return torch.sigmoid(self.theta)


def expected_compute(beta: torch.Tensor, mask: list[bool], flops) -> torch.Tensor:
    """The FLOP fraction a plan with soft decisions ``beta`` would spend (refresh steps = 1)."""
    fixed, attn, mlp, total = branch_costs(flops, beta.shape[1])
    full = torch.tensor(mask, dtype=torch.bool, device=beta.device)
    w = torch.where(full[:, None, None], torch.ones_like(beta), beta)
    attn = torch.tensor(attn, dtype=beta.dtype, device=beta.device)
    mlp = torch.tensor(mlp, dtype=beta.dtype, device=beta.device)
    per_step = fixed + (w[:, :, 0] * attn).sum(1) + (w[:, :, 1] * mlp).sum(1)
    return per_step.sum() / (len(mask) * total)


def _check_settings(steps, refresh, lam, iters, lr, batch, init, weight_decay):
    def bad(name, rule, value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not is_int(steps) or steps < 2:
        bad("steps", "an int >= 2", steps)
    if not is_int(refresh) or not 2 <= refresh <= steps:
        bad("refresh", f"an int in [2, steps={steps}] (a full step every `refresh` steps)", refresh)
    if not is_num(lam) or lam < 0:
        bad("lambda", "a finite number >= 0", lam)
    if not is_int(iters) or iters < 1:
        bad("iters", "an int >= 1", iters)
    if not is_num(lr) or lr <= 0:
        bad("lr", "a finite number > 0", lr)
    if not is_int(batch) or batch < 1:
        bad("batch", "an int >= 1", batch)
    if not is_num(init) or abs(init) > THETA_BOUND:
        bad("init", f"a number in [-{THETA_BOUND:g}, {THETA_BOUND:g}]", init)
    if not is_num(weight_decay) or weight_decay < 0:
        bad("weight_decay", "a finite number >= 0", weight_decay)


def router_loss(engine, theta: torch.Tensor, mask: list[bool], sample_idx: torch.Tensor,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, mse)`` of one iteration on the samples ``sample_idx``: the engine's mixed
    error over the cache steps (:meth:`Engine.mixed_error`), averaged, plus ``λ`` times the
    mean over cache steps of ``Σ β``. Differentiable in ``theta``."""
    cache = [i for i, full in enumerate(mask) if not full]
    if not cache:
        raise ValueError("the refresh pattern leaves no cache steps")
    beta = torch.sigmoid(theta)
    err, terms = engine.mixed_error(beta, mask, sample_idx)
    mse = err / terms
    return mse + lam * (beta[cache].sum() / len(cache)), mse


def train_router(engine, *, refresh: int = 2, lam: float = 1e-4, iters: int = 100, lr: float = 0.1, batch: int = 8,
                 init: float = 3.0, weight_decay: float = 0.0, seed: int = 0, progress: bool = True) -> RouterResult:
    """Train ``θ`` on ``engine``'s model (see the module docstring); the model's weights are not
    touched (``requires_grad`` is switched off while training and restored after).

    Deterministic for a seed: the minibatches come from a generator seeded with ``seed``, θ
    starts at ``init`` everywhere, and the CPU kernels are deterministic."""
    steps = engine.steps
    _check_settings(steps, refresh, lam, iters, lr, batch, init, weight_decay)
    mask = refresh_mask(steps, refresh)
    result = optimize_router(lambda theta, idx: router_loss(engine, theta, mask, idx, lam), engine,
                             (steps, engine.blocks, 2), engine.training_samples(), mask, engine.costs(), iters=iters,
                             lr=lr, batch=batch, init=init, weight_decay=weight_decay, seed=seed, progress=progress)
    result.settings.update(refresh=refresh, lam=lam)
    return result


def optimize_router(loss_fn, engine, shape: tuple, samples: int, mask: list[bool], flops, *, iters: int,
                    lr: float, batch: int, init: float, weight_decay: float, seed: int, progress: bool) -> RouterResult:
    """The router's optimisation: ``loss_fn(theta, sample_idx) -> (loss, mse)`` on a minibatch of
    the ``samples`` training samples; AdamW on ``θ`` (``shape``, starting at ``init``), clamped
    to ``[-5, 5]``; the engine's model weights frozen meanwhile (restored after)."""
    params = list(engine.parameters())
    device = params[0].device
    theta = torch.full(shape, float(init), device=device, requires_grad=True)
    opt = torch.optim.AdamW([theta], lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    B = min(batch, samples)
    history = []
    frozen = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():  # callers (the executor, generate) may run under no_grad
            bar = tqdm(range(iters), desc="train-router", unit="it", disable=not progress, file=sys.stderr)
            for _ in bar:
                idx = torch.randperm(samples, generator=generator)[:B].to(device)
                loss, mse = loss_fn(theta, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    theta.clamp_(-THETA_BOUND, THETA_BOUND)
                    fraction = float(expected_compute(torch.sigmoid(theta), mask, flops))
                history.append((float(loss.detach()), float(mse.detach()), fraction))
                bar.set_postfix(loss=f"{history[-1][0]:.3e}", mse=f"{history[-1][1]:.2e}",
                                compute=f"{fraction:.3f}")
    finally:
        for p, req in zip(params, frozen):
            p.requires_grad_(req)
    settings = dict(iters=iters, lr=lr, batch=B, init=init, weight_decay=weight_decay, seed=seed,
                    train_samples=samples)
    return RouterResult(theta.detach(), mask, history, time.perf_counter() - t0, settings)
