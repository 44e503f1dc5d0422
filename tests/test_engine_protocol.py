"""The engine protocol is enough: a third engine, a plain PyTorch DiT loop written only against
``omnicache.cache`` (the protocol and the cache core), runs OmniCache's calibration,
Learning-to-Cache's training and a FirstBlockCache decision with no change to the method code.

``PlainLoop`` below is the whole engine (the lines between the markers are what a new engine
writes; ``docs/engines.md`` walks through it). It drives the DiT's blocks itself, with an Euler
step of the flow, no guidance, at ``step`` granularity and host decisions only.
"""

import dataclasses

import pytest
import torch

from omnicache.cache import (REUSE, STORE, CacheSession, Costs, Engine, Recording, Replay, ResolvedPolicy)
from omnicache.plan import model_fingerprint
from omnicache.policies import FirstBlockCacheConfig, L2CConfig, OmniCacheConfig

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 8


# ---------------------------------------------------------------- the engine (begin)
class PlainLoop:
    """A DiT (``embed``, ``blocks``, ``final``; its blocks' ``modulation`` / ``attn_branch`` /
    ``mlp_branch`` for the router) sampled by Euler steps of the flow, x_{t+1} = x_t - v / steps."""

    name, grid, progress = "plain-loop", None, False

    def __init__(self, model, samples=2, seed=0, steps=STEPS):
        self.model, self.steps, self.samples, self.seed = model, steps, samples, seed
        self.blocks, self.labels = len(model.blocks), torch.arange(samples) % model.config.num_classes
        self._rec = None

    def with_inputs(self, samples, seed, source="self"):
        return PlainLoop(self.model, samples, seed, self.steps)

    def parameters(self):
        return self.model.parameters()

    def meta(self):
        return {"model": model_fingerprint(self.model), "engine": self.name}

    def costs(self):
        f = self.model.flops_per_sample()
        return Costs(f["embed"] + f["final"], [[f["block_attn"], f["block_mlp"], f["block_modulation"]]] * self.blocks)

    def training_samples(self):
        return self.samples

    def _embed(self, i, x, rows=slice(None)):
        t = torch.full((x.shape[0],), 1.0 - i / self.steps)
        return self.model.embed(x, t, self.labels[rows])

    def _next(self, i, x, h, c):
        return x - self.model.final(h, c) / self.steps

    @torch.no_grad()
    def record(self):
        if self._rec is None:
            cfg = self.model.config
            x = torch.randn(self.samples, cfg.in_channels, cfg.input_size, cfg.input_size,
                            generator=torch.Generator().manual_seed(self.seed))
            latents, residuals, self._hc = [x], [], []
            for i in range(self.steps):
                h0, c = self._embed(i, x)
                h = h0
                for blk in self.model.blocks:
                    h = blk(h, c)
                residuals.append({(None, 0, "hidden_states"): h - h0})
                self._hc.append((h, c))
                x = self._next(i, x, h, c)
                latents.append(x)
            side = self.model.config.input_size // self.model.config.patch_size
            self._rec = Recording(residuals, latents, grid=(side, side))  # residuals [B, H*W, D]
        return self._rec

    @torch.no_grad()
    def sensitivity(self, t, tangents):
        h, c = self._hc[t]  # the step is linear in the final layer's output: central differences
        return torch.stack([((self._next(t, 0, h + 1e-3 * v, c) - self._next(t, 0, h - 1e-3 * v, c)) / 2e-3)
                            .double().flatten() for v in tangents])

    @torch.no_grad()
    def replay(self, policy, *, samples=None, fit=None):
        rows = samples or slice(None)
        session = CacheSession(ResolvedPolicy(policy, blocks=self.blocks, granularity="step" if policy else None),
                               self.blocks, per_sample=False)  # one decision for the whole batch
        session.set_steps(self.steps)
        ctx, rec = session.context(None), self.record()
        x = rec.latents[0][rows]
        for i in range(self.steps):
            h0, c = self._embed(i, x, rows)
            lo, hi = session.units[0]
            h, stats = h0, {"stored": [] if session.kind == "static" else None}
            for blk in self.model.blocks[:lo]:
                h = blk(h, c)
            act = session.actions[i][0] if session.kind == "static" else None
            if session.kind == "dynamic" and not ctx.decisions.decide(h - h0)[1]:
                act = REUSE
            unit = session.unit(ctx, 0, "hidden_states", h)
            if act == REUSE:
                g = session.gammas(i) if session.kind == "static" else (None, None)
                if fit is not None and any(v is not None for v in g):
                    drifts = [d for d, v in zip(unit.drifts(), g) if v is not None]
                    base = self._next(i, x, h + unit.F, c)
                    got = fit(i, base, [self._next(i, x, h + unit.F + d, c) - base for d in drifts],
                              rec.latents[i + 1][rows])
                    session.set_gamma(i, got[0], got[1] if len(got) > 1 else 0.0)
                    g = session.gammas(i)
                h = unit.reuse(h, *g)
            else:
                inp = h
                for blk in self.model.blocks[lo:hi]:
                    h = blk(h, c)
                stored = unit.store(h, inp) if act in (STORE, None) else None
                stats = {"stored": [stored]} if session.kind == "static" else {"stored": stored}
            for blk in self.model.blocks[hi:]:
                h = blk(h, c)
            session.record(ctx, i, stats, key=None)
            x = self._next(i, x, h, c)
        session.costs[None] = dataclasses.replace(self.costs())
        return Replay(x, session.summary(wall_s=0.0, batch=x.shape[0]), "next latent")

    def mixed_error(self, beta, refresh, sample_idx):
        rec, err, terms, cache = self.record(), beta.new_zeros(()), 0, None
        for i in range(self.steps):
            x = rec.latents[i][sample_idx]
            h, c = self._embed(i, x, sample_idx)
            new = []
            for b, blk in enumerate(self.model.blocks):
                mod = blk.modulation(c)
                for k, (branch, gate) in enumerate(((blk.attn_branch, mod[2]), (blk.mlp_branch, mod[5]))):
                    f = branch(h, mod)
                    if not refresh[i]:  # a cache step: the branch mixes with the step before's value
                        f = beta[i, b, k] * f + (1 - beta[i, b, k]) * cache[2 * b + k]
                    new.append(f)
                    h = h + gate.unsqueeze(1) * f
            cache = [f.detach() if refresh[i] else f for f in new]
            if not refresh[i]:
                target = (rec.latents[i] - rec.latents[i + 1])[sample_idx] * self.steps
                err, terms = err + (self.model.final(h, c) - target).square().mean(), terms + 1
        return err, terms
# ---------------------------------------------------------------- the engine (end)


@pytest.fixture(scope="module")
def engine(tiny_dit):
    return PlainLoop(tiny_dit)


def test_it_is_an_engine(engine):
    assert isinstance(engine, Engine)


def test_uncached_replay_is_the_recording(engine):
    rep = engine.replay(None)
    assert torch.equal(rep.latent, engine.record().latents[-1])
    assert rep.summary.compute_fraction == 1.0 and rep.summary.policy == "NoCache"


def test_omnicache_calibrates_on_it(engine):
    cfg = OmniCacheConfig(compute_fraction=0.5, max_consecutive=2, calibration_samples=4)
    plan = cfg.calibrate(engine)
    comp = [row[0][0] for row in plan.compute]
    assert plan.meta["engine"] == "plain-loop" and comp.count(False) == 4 and all(comp[:2]) and comp[-1]
    assert any(plan.gamma)
    final = engine.with_inputs(4, cfg.calibration_seed).record().latents[-1]
    runs = engine.with_inputs(4, cfg.calibration_seed)
    err = {name: float((runs.replay(p).latent - final).square().mean())
           for name, p in (("gamma", plan), ("plain", dataclasses.replace(plan, gamma=None, gamma2=None)))}
    assert err["gamma"] < err["plain"], err
    assert runs.replay(plan).summary.compute_fraction == pytest.approx(plan.compute_fraction(engine.model.flops_per_sample()))


def test_learning_to_cache_trains_on_it(engine):
    plan = L2CConfig(compute_fraction=0.7, iters=6, train_samples=3, lam=1e-3, lr=0.3).calibrate(engine)
    assert plan.granularity == "branch" and plan.meta["engine"] == "plain-loop"
    assert abs(plan.meta["flops_fraction"] - 0.7) <= 0.05 and len(plan.meta["beta"]) == STEPS


def test_first_block_cache_decides_on_it(engine):
    exact = engine.replay(FirstBlockCacheConfig(threshold=0.0))
    assert torch.equal(exact.latent, engine.record().latents[-1]) and exact.summary.compute_fraction == 1.0
    lazy = engine.replay(FirstBlockCacheConfig(threshold=1e9, max_consecutive=2))
    assert [d["compute"] for d in lazy.summary.stats] == [i % 3 == 0 for i in range(STEPS)]
    trace = lazy.summary.contexts[None]["trace"]  # block 0 every step (its residual is the signal)
    assert all(t[0] for t in trace) and [bool(t[1]) for t in trace] == [i % 3 == 0 for i in range(STEPS)]
    assert 0.5 < lazy.summary.compute_fraction < 0.75
