"""The engine protocol (:class:`omnicache.cache.Engine`) on our DiT: what a method sees of it.

A :class:`RuntimeEngine` is the model, the sampler, the guidance and a batch of inputs
(labels, the noise seed). It records one uncached run (:meth:`~RuntimeEngine.record`: per
step the block stack's input, residual and conditioning, the latents), replays policies
through the :class:`~omnicache.runtime.executor.CacheExecutor` (with a fit hook: a step
plan's reuse steps probed through the final layer alone, any other plan's by re-running
the step with its caches restored), linearises the sampler step exactly (central
differences of the final layer; guidance and the sampler step are linear), and trains a
Learning-to-Cache router on trajectories the model generates itself or on the digits
data set noised to each step's time. :func:`calibrate` is what the executor calls for a
config that is fitted on the model (OmniCache, Learning-to-Cache).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from tqdm import tqdm

from ..cache import Costs, Recording, Replay
from ..plan import model_fingerprint
from .executor import CacheExecutor
from .samplers import cfg_combine, cfg_labels, make_sampler

__all__ = ["RuntimeEngine", "TrainingSet", "training_set", "routed_forward", "calibrate", "calibrator"]


def calibrate(config, model, *, steps: int, sampler="flow", guidance: float = 1.0, granularity=None,
              progress: bool = False):
    """A calibrated config's plan on ``model`` (``config.calibrate(engine)``; it picks its own
    batch with :meth:`RuntimeEngine.with_inputs`): a value the caller holds, not memoised."""
    return config.calibrate(RuntimeEngine(model, steps=steps, sampler=sampler, guidance=guidance, progress=progress),
                            granularity=granularity)


def calibrator(model, *, sampler="flow", guidance: float = 1.0, progress: bool = False):
    """The executor's ``calibrate``: ``(config, steps, granularity) -> plan`` on ``model``."""
    return lambda config, steps, granularity: calibrate(config, model, steps=steps, sampler=sampler, guidance=guidance,
                                                        granularity=granularity, progress=progress)


class RuntimeEngine:
    """Our runtime as a method's engine (see the module docstring).

    Args:
        model: a :class:`~omnicache.runtime.model.DiT` in eval mode.
        labels: the batch's class ids (a list or a 1-D tensor); None: ``samples`` classes in turn.
        steps, sampler, guidance: the sampling setting.
        seed: the noise seed of the recorded run (and of the router's minibatches' data).
        source: ``"self"`` (the router trains on the model's own trajectories) or ``"data"``
            (on the digits data set noised to each step's time).
    """

    name = "omnicache.runtime"

    def __init__(self, model, labels=None, *, steps: int, sampler="flow", guidance: float = 1.0, seed: int = 0,
                 samples: int = 1, source: str = "self", progress: bool = False):
        device = next(model.parameters()).device
        if labels is None:
            labels = torch.arange(samples) % model.config.num_classes
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.model, self.steps, self.guidance, self.seed = model, steps, float(guidance), seed
        self.sampler_name = sampler if isinstance(sampler, str) else type(sampler).__name__
        self.sampler = make_sampler(sampler, steps) if isinstance(sampler, str) else sampler
        if source not in ("self", "data"):
            raise ValueError(f"source must be 'self' or 'data', got {source!r}")
        self.source, self.progress = source, progress
        self.blocks, self.samples = len(model.blocks), self.labels.shape[0]
        side = model.config.input_size // model.config.patch_size
        self.grid = (side, side)
        self._recording = self._ts = None

    def with_inputs(self, samples: int, seed: int, source: str = "self") -> RuntimeEngine:
        """The same model and setting on ``samples`` classes in turn, noise ``seed``."""
        return RuntimeEngine(self.model, None, steps=self.steps, sampler=self.sampler, guidance=self.guidance,
                             seed=seed, samples=samples, source=source, progress=self.progress)

    def parameters(self):
        return self.model.parameters()

    def meta(self) -> dict:
        return {"model": model_fingerprint(self.model), "engine": self.name, "sampler": self.sampler_name,
                "guidance": self.guidance, "calibration_samples": self.samples, "calibration_seed": self.seed}

    def costs(self) -> Costs:
        """FLOPs per row (one model input) by part: the model's analytic counts."""
        f = self.model.flops_per_sample()
        return Costs(f["embed"] + f["final"], [[f["block_attn"], f["block_mlp"], f["block_modulation"]]] * self.blocks)

    # ------------------------------------------------------------------ record
    @torch.no_grad()
    def record(self) -> Recording:
        """Run the batch uncached (CFG as ``generate`` does) and keep, per step, the latent, the
        block stack's input and residual ``[rows, T, D]`` and the conditioning."""
        if self._recording is None:
            ex = self._uncached = CacheExecutor(self.model, self.labels, None, steps=self.steps, sampler=self.sampler,
                                                guidance=self.guidance)
            x = ex.init_noise(self.seed)
            latents, residuals, self._inputs, self._conds = [x], [], [], []
            for i in tqdm(range(self.steps), desc="calibrating", unit="step", disable=not self.progress,
                          file=sys.stderr):
                h, c = ex.embed(i, x)
                h_in = h
                for blk in ex.blocks:
                    h = blk(h, c)
                self._inputs.append(h_in)
                self._conds.append(c)
                residuals.append({(None, 0, "hidden_states"): h - h_in})
                x = ex.finish(i, x, h, c)
                latents.append(x)
            self._recording = Recording(residuals, latents, self.grid)
        return self._recording

    @torch.no_grad()
    def sensitivity(self, t: int, tangents: list) -> torch.Tensor:
        """``A_t · v`` for each tangent ``v`` ``[rows, T, D]`` (``A_t = ∂x_{t+1}/∂h_out`` at the
        recorded point, central differences of the final layer in one batched call): float64
        ``[k, B·C·H·W]``."""
        rec, ex = self.record(), self._uncached
        h0 = self._inputs[t] + rec.flat(t)
        v = torch.stack(tangents)  # (k, rows, T, D)
        scale = 1e-2 * h0.norm() / v.flatten(1).norm(dim=1).clamp_min(1e-30)  # (k,)
        dv = scale.view(-1, 1, 1, 1) * v
        k, rows = v.shape[0], v.shape[1]
        h = torch.cat([h0 + dv, h0 - dv]).flatten(0, 1)  # (2k·rows, T, D)
        c = self._conds[t].repeat(2 * k, 1)
        out = self.model.final(h, c).double()
        out = out.reshape(2, k, rows, *out.shape[1:])
        d = (out[0] - out[1]) / (2 * scale.double().view(-1, *[1] * (out.dim() - 2)))  # (k, rows, C, H, W)
        if ex.cfg:
            cond, uncond = d.chunk(2, dim=1)
            d = uncond + ex.guidance * (cond - uncond)
        return ex.sampler.step(t, torch.zeros_like(d), d).flatten(1)  # the step is linear in (x, out)

    # ------------------------------------------------------------------ replay
    @torch.no_grad()
    def replay(self, policy, *, samples: slice | None = None, fit=None) -> Replay:
        """``policy`` from the recorded noise on ``samples`` of the batch (see the module docstring)."""
        samples = slice(None) if samples is None else samples
        rec = self.record()
        ex = CacheExecutor(self.model, self.labels[samples], policy, steps=self.steps, sampler=self.sampler,
                           guidance=self.guidance)
        x = rec.latents[0][samples]
        if fit is None:
            return Replay(*ex.run(x=x))
        if ex.kind != "static":
            raise ValueError(f"replay: a fit needs a static plan, got a {ex.kind} policy")
        ex.reset_cache()
        plan, targets = ex.plan, [z[samples] for z in rec.latents[1:]]
        step_fit = self._fit_step_plan if plan.granularity == "step" else self._fit_any_plan
        for t in range(self.steps):
            x = step_fit(ex, plan, t, x, fit, targets[t])
        return Replay(x, None, "next latent")

    @staticmethod
    def _fit_step_plan(ex, plan, t, x, fit, target):
        """A step plan's step: at a reuse step the outcome of ``h + F + γ1 D1 + γ2 D2`` is probed
        through the final layer alone (its columns: each drift), and the run continues with the
        coefficients ``fit`` returns."""
        if plan.compute[t][0][0]:
            return ex.step(t, x)[0]
        h, c = ex.embed(t, x)
        unit = ex.cache_units[0]
        D1, D2 = unit.drifts()
        cols = [d for d, g in ((D1, plan.gamma[t]), (D2, plan.gamma2[t])) if g]
        base = h + unit.F
        if cols:
            o0 = ex.finish(t, x, base, c).double()
            g = fit(t, o0, [ex.finish(t, x, base + d, c).double() - o0 for d in cols], target)
            for gi, d in zip(g, cols):
                base = base + gi * d
        return ex.finish(t, x, base, c)

    @staticmethod
    def _fit_any_plan(ex, plan, t, x, fit, target):
        """Any plan's step (branch plans too): where the plan marks a coefficient, the step runs
        with ``γ = 0`` and with each coefficient at 1 from the same caches (restored between),
        and then with the coefficients ``fit`` returns."""
        g1 = g2 = 0.0
        if plan.gamma[t] or plan.gamma2[t]:
            buffers, use2 = ex.cache_tensors(), bool(plan.gamma2[t])

            def run(a, b):
                saved = [buf.clone() for buf in buffers]
                ex.set_gamma(t, a, b)
                out, _ = ex.step(t, x)
                for buf, s in zip(buffers, saved):
                    buf.copy_(s)
                return out.double()

            o0 = run(0.0, 0.0)
            g = fit(t, o0, [run(1.0, 0.0) - o0] + ([run(0.0, 1.0) - o0] if use2 else []), target)
            g1, g2 = g[0], g[1] if len(g) > 1 else 0.0
        ex.set_gamma(t, g1, g2)
        return ex.step(t, x)[0]

    # ------------------------------------------------------------------ Learning-to-Cache
    def training_samples(self) -> int:
        return self._training_set().inputs.shape[1]

    def _training_set(self) -> TrainingSet:
        if self._ts is None:
            self._ts = training_set(self.model, steps=self.steps, sampler=self.sampler, guidance=self.guidance,
                                    samples=self.samples, seed=self.seed, data="digits" if self.source == "data" else "self")
        return self._ts

    def mixed_error(self, beta: torch.Tensor, refresh: list, sample_idx: torch.Tensor) -> tuple:
        """Every refresh segment's cache steps, batched position by position: the full steps'
        branch outputs seed the caches (no gradient); at each cache step each branch mixes
        ``β·f + (1 − β)·cache``; the error is the guided velocity's, weighted by ``(1 − s)²``
        (the ε error: ``ε = x_s + (1 − s) v``)."""
        ts, model = self._training_set(), self.model
        device, dtype = ts.inputs.device, next(model.parameters()).dtype
        B, R = sample_idx.numel(), 2 if ts.guidance != 1.0 else 1
        num_classes = model.config.num_classes
        segments = [s for s in _segments(refresh) if len(s) > 1]
        cache_steps = sum(len(s) - 1 for s in segments)
        with torch.no_grad():  # the full steps: every branch computes, their outputs seed the caches
            x, t, y = _rows(ts, [s[0] for s in segments], sample_idx, num_classes, dtype)
            _, cache = routed_forward(model, x, t, y)
        err = beta.new_zeros(())
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
            err = err + (w2 * per_step).sum()
        return err, cache_steps


# ---------------------------------------------------------------------- router training data
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
    """The router's training inputs: the model's own trajectories (``data="self"``: one uncached
    run per sample, classes in turn) or the digits data set noised to each step's time."""
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
        from .default import digits_split

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


def _segments(mask: list) -> list:
    """``[[full step, cache steps after it...], ...]``."""
    out = []
    for i, full in enumerate(mask):
        if full:
            out.append([i])
        else:
            out[-1].append(i)
    return out
