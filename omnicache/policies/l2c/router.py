"""Learning-to-Cache (Ma et al., 2024): a learned router over branches, exported as a static plan.

**Router.** ``θ ∈ R^{steps × blocks × 2}`` (attention, MLP), ``β = sigmoid(θ)``: one
weight per step and branch, the same for every input (input-invariant, timestep-variant).

**Refresh pattern.** Steps ``0, N, 2N, …`` (``refresh=N``; the paper alternates, ``N = 2``)
compute every branch. The other steps are *cache steps*: there each branch either
computes or reuses its value from the step before.

**Training** (the model stays frozen; only ``θ`` gets gradients). While training, at a
cache step ``i`` each branch outputs the mixture

    m = β[i, b, k] · f(h) + (1 − β[i, b, k]) · cache[b, k]

(``f`` the branch's pre-gate output, gated afterwards by the step's adaLN gate exactly as
the executor applies a cached branch), and ``m`` becomes the cache the next cache step
reads: at β ∈ {0, 1} this is what the executor does (store on compute, keep on reuse).
The inputs are teacher-forced: every step starts from the uncached trajectory's state,
and each refresh segment (a full step and the cache steps after it) starts from the full
step's branch outputs. Per cache step ``i``, with ε the sampler's noise prediction
(guided, as sampling uses it; ``ε = x_s + (1 − s) v`` for the velocity model)::

    loss_i = mean((ε_full − ε_β)²) + λ · Σ_{b,k} β[i, b, k]

and the loss of an iteration is the mean of ``loss_i`` over the cache steps (every
segment, a minibatch of samples). ``θ`` is clamped to ``[−5, 5]`` after each AdamW step.
The training inputs are trajectories the model generates itself (``data="self"``: one
uncached run per sample, the sampler's own states), or the digits data set noised to each
step's time (``data="digits"``).

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

from ...runtime.samplers import cfg_combine, cfg_labels, make_sampler
from .export import branch_costs

__all__ = ["TrainingSet", "RouterResult", "training_set", "refresh_mask", "routed_forward", "router_loss",
           "train_router", "optimize_router", "expected_compute"]

THETA_BOUND = 5.0


# ------------------------------------------------------------------ training data
@dataclasses.dataclass
class TrainingSet:
    """Per step ``i``: ``inputs[i]`` the model inputs ``(N, C, H, W)`` in flow coordinates at
    flow time ``times[i]``, ``targets[i]`` the full model's guided velocity there; ``labels``
    (N,). The reconstruction loss at step ``i`` is ``weights[i]² · mean((v_β − v_full)²)``
    with ``weights[i] = 1 − s_i``: exactly ``mean((ε_β − ε_full)²)``, since
    ``ε = x_s + (1 − s) v`` at the same input ``x_s``. (Weighting by the error of the
    sampler's next state instead was tried: 1.2 dB lower at compute 0.75 and 0.9 dB at 0.6
    on the embedded model, flow sampler.)"""

    inputs: torch.Tensor  # (steps, N, C, H, W)
    times: list
    targets: torch.Tensor  # (steps, N, C, H, W): the full model's guided velocity
    labels: torch.Tensor
    guidance: float
    source: str
    weights: list  # per step: 1 - s_i, the ε error's weight on the velocity error


def _guided(model, x, t, labels, guidance):
    """The guided velocity for rows ``x`` (``[x; x]`` with ``[labels; null]`` under CFG)."""
    if guidance == 1.0:
        return model(x, t, labels).float()
    y = cfg_labels(labels, model.config.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), y).float()
    return cfg_combine(out, guidance)


@torch.no_grad()
def training_set(model, *, steps: int, sampler="flow", guidance: float = 1.0, samples: int = 64, seed: int = 0,
                 data: str = "self") -> TrainingSet:
    """The router's training inputs: self-generated trajectories or noised data (see module)."""
    if isinstance(sampler, str):
        sampler = make_sampler(sampler, steps)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    if data == "self":
        labels = (torch.arange(samples) % cfg.num_classes).to(device)
        shape = (samples, cfg.in_channels, cfg.input_size, cfg.input_size)
        x = sampler.init_noise(shape, generator=generator, device=device)
        inputs, targets = [], []
        for i in range(steps):
            x_model, t = sampler.model_input(i, x)
            v = _guided(model, x_model.to(dtype), t, labels, guidance)
            inputs.append(x_model.float())
            targets.append(v)
            x = sampler.step(i, x, v)
    elif data == "digits":
        from ...train_default import digits_split

        x0, y, _, _ = digits_split()
        if tuple(x0.shape[1:]) != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(f"data='digits' gives {tuple(x0.shape[1:])} images; the model takes "
                             f"{(cfg.in_channels, cfg.input_size, cfg.input_size)}")
        pick = torch.randperm(x0.shape[0], generator=generator)[:samples]
        x0, labels = x0[pick].to(device), y[pick].to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        inputs, targets = [], []
        for i in range(steps):
            s = sampler.timesteps[i]
            x_model = (1.0 - s) * x0 + s * noise
            t = torch.full((x0.shape[0],), s, device=device)
            v = _guided(model, x_model.to(dtype), t, labels, guidance)
            inputs.append(x_model)
            targets.append(v)
    else:
        raise ValueError(f"data must be 'self' or 'digits', got {data!r}")
    return TrainingSet(torch.stack(inputs), list(sampler.timesteps), torch.stack(targets), labels,
                       float(guidance), data, [1.0 - s for s in sampler.timesteps])


# ------------------------------------------------------------------ router forward
def refresh_mask(steps: int, refresh: int) -> list[bool]:
    """Full-refresh steps: ``i % refresh == 0`` (the paper's alternation is ``refresh=2``)."""
    return [i % refresh == 0 for i in range(steps)]


def routed_forward(model, x, t, y, beta=None, cache=None):
    """One DiT forward whose branches mix with a cache.

    ``x`` (R, C, H, W), ``t`` (R,), ``y`` (R,); ``beta`` (R, blocks, 2) per-row branch
    weights or None (every branch computes: a full step); ``cache`` per block a pair of
    (R, T, D) pre-gate branch values. Returns ``(velocity, new_cache)`` where the new cache
    holds each branch's (mixed) output.
    """
    h, c = model.embed(x, t, y)
    new = []
    for b, blk in enumerate(model.blocks):
        mod = blk.modulation(c)
        pair = []
        for k, (branch, gate) in enumerate(((blk.attn_branch, mod[2]), (blk.mlp_branch, mod[5]))):
            f = branch(h, mod)
            if beta is not None:
                w = beta[:, b, k].view(-1, 1, 1).to(f.dtype)
                f = w * f + (1.0 - w) * cache[b][k]
            pair.append(f)
            h = h + gate.unsqueeze(1) * f
        new.append(pair)
    return model.final(h, c).float(), new


def _rows(ts: TrainingSet, step_idx: list, sample_idx: torch.Tensor, num_classes: int, dtype):
    """Rows for steps ``step_idx`` × samples ``sample_idx``: (x, t, y) laid out
    ``[cond (steps × samples); uncond]`` under CFG."""
    S, B = len(step_idx), sample_idx.numel()
    x = ts.inputs[step_idx][:, sample_idx].flatten(0, 1).to(dtype)  # (S·B, C, H, W)
    t = torch.tensor([ts.times[i] for i in step_idx], dtype=torch.float32,
                     device=x.device).repeat_interleave(B)
    y = ts.labels[sample_idx].repeat(S)
    if ts.guidance != 1.0:
        return torch.cat([x, x]), torch.cat([t, t]), cfg_labels(y, num_classes)
    return x, t, y


def _segments(mask: list[bool]) -> list[list[int]]:
    """``[[full step, cache steps after it...], ...]``."""
    out = []
    for i, full in enumerate(mask):
        if full:
            out.append([i])
        else:
            out[-1].append(i)
    return out


# ------------------------------------------------------------------ training
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


def expected_compute(beta: torch.Tensor, mask: list[bool], flops: dict) -> torch.Tensor:
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


def router_loss(model, ts: TrainingSet, theta: torch.Tensor, mask: list[bool], sample_idx: torch.Tensor,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, mse)`` of one iteration on samples ``sample_idx``: every refresh segment,
    its cache steps batched together position by position (see the module docstring).
    Differentiable in ``theta`` (the model's own parameters should be frozen)."""
    device, dtype = ts.inputs.device, next(model.parameters()).dtype
    B, R = sample_idx.numel(), 2 if ts.guidance != 1.0 else 1
    num_classes = model.config.num_classes
    segments = [s for s in _segments(mask) if len(s) > 1]
    cache_steps = sum(len(s) - 1 for s in segments)
    if not cache_steps:
        raise ValueError("the refresh pattern leaves no cache steps")
    beta = torch.sigmoid(theta)
    with torch.no_grad():  # the full steps: every branch computes, their outputs seed the caches
        x, t, y = _rows(ts, [s[0] for s in segments], sample_idx, num_classes, dtype)
        _, cache = routed_forward(model, x, t, y)
    mse_sum = beta.new_zeros(())
    for pos in range(1, max(len(s) for s in segments)):
        active = [a for a, s in enumerate(segments) if len(s) > pos]
        if len(active) < len(segments):  # keep the cache rows of the segments still running
            keep = torch.tensor(active, device=device)
            cache = [[c.unflatten(0, (R, len(segments), B)).index_select(1, keep).flatten(0, 2) for c in pair]
                     for pair in cache]
            segments = [segments[a] for a in active]
        step_idx = [s[pos] for s in segments]
        x, t, y = _rows(ts, step_idx, sample_idx, num_classes, dtype)
        beta_rows = beta[step_idx].repeat_interleave(B, 0).repeat(R, 1, 1)
        v, cache = routed_forward(model, x, t, y, beta_rows, cache)
        if R == 2:
            v = cfg_combine(v, ts.guidance)
        target = ts.targets[step_idx][:, sample_idx].flatten(0, 1)
        w2 = torch.tensor([ts.weights[i] ** 2 for i in step_idx], device=device)
        per_step = (v - target).square().flatten(1).mean(1).view(len(step_idx), B).mean(1)
        mse_sum = mse_sum + (w2 * per_step).sum()
    mse = mse_sum / cache_steps
    penalty = beta[[i for i, full in enumerate(mask) if not full]].sum() / cache_steps
    return mse + lam * penalty, mse


def train_router(model, ts: TrainingSet, *, refresh: int = 2, lam: float = 1e-4, iters: int = 100,
                 lr: float = 0.1, batch: int = 8, init: float = 3.0, weight_decay: float = 0.0, seed: int = 0,
                 progress: bool = True) -> RouterResult:
    """Train ``θ`` on ``ts`` (see the module docstring); the model's weights are not touched
    (``requires_grad`` is switched off while training and restored after).

    Deterministic for a seed: the minibatches come from a generator seeded with ``seed``,
    θ starts at ``init`` everywhere, and the CPU kernels are deterministic.
    """
    steps, N = ts.inputs.shape[0], ts.inputs.shape[1]
    _check_settings(steps, refresh, lam, iters, lr, batch, init, weight_decay)
    mask = refresh_mask(steps, refresh)
    result = optimize_router(lambda theta, idx: router_loss(model, ts, theta, mask, idx, lam), model,
                             (steps, len(model.blocks), 2), N, mask, model.flops_per_sample(), iters=iters,
                             lr=lr, batch=batch, init=init, weight_decay=weight_decay, seed=seed, progress=progress,
                             device=ts.inputs.device)
    result.settings.update(refresh=refresh, lam=lam, data=ts.source)
    return result


def optimize_router(loss_fn, model, shape: tuple, samples: int, mask: list[bool], flops: dict, *, iters: int,
                    lr: float, batch: int, init: float, weight_decay: float, seed: int, progress: bool,
                    device) -> RouterResult:
    """The router's optimisation, for any engine: ``loss_fn(theta, sample_idx) -> (loss, mse)``
    on a minibatch of the ``samples`` training samples; AdamW on ``θ`` (``shape``, starting at
    ``init``), clamped to ``[-5, 5]``; ``model``'s weights frozen meanwhile (restored after)."""
    theta = torch.full(shape, float(init), device=device, requires_grad=True)
    opt = torch.optim.AdamW([theta], lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    B = min(batch, samples)
    history = []
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
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
        for p, req in zip(model.parameters(), frozen):
            p.requires_grad_(req)
    settings = dict(iters=iters, lr=lr, batch=B, init=init, weight_decay=weight_decay, seed=seed,
                    train_samples=samples)
    return RouterResult(theta.detach(), mask, history, time.perf_counter() - t0, settings)
