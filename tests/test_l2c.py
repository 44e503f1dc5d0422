"""Learning-to-Cache: the router's gradients, training, export, the config and the command."""

import dataclasses
import json

import pytest
import torch

from omnicache.policies.l2c import export as l2c_export, router as l2c
from omnicache.policies.omnicache.correction import fit_correction
from omnicache.runtime import engine as runtime_engine
from omnicache.runtime.engine import RuntimeEngine
from omnicache.api import generate
from omnicache.cli import main as cli_main
from omnicache.plan import CachePlan
from omnicache.policies import L2CConfig
from omnicache.runtime.executor import CacheExecutor
from omnicache.runtime.syncguard import no_host_sync

from compile_helpers import compile_step_equals_eager

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8


@pytest.fixture(scope="module")
def tiny(tiny_dit):
    return tiny_dit


@pytest.fixture(scope="module")
def engine(tiny):
    """Our runtime as the router's engine: 6 self-generated trajectories, noise seed 0."""
    return RuntimeEngine(tiny, steps=STEPS, guidance=2.0, samples=6, seed=0)


@pytest.fixture(scope="module")
def ts(engine):
    return engine._training_set()


@pytest.fixture(scope="module")
def trained(engine):
    return l2c.train_router(engine, refresh=2, lam=1e-3, iters=25, lr=0.2, batch=4, init=1.0, progress=False)


# ------------------------------------------------------------------ training set
def test_self_generated_training_set_is_the_uncached_trajectory(tiny, ts):
    """The inputs are the sampler's own states of an uncached run, the targets its velocities."""
    from omnicache.runtime.samplers import make_sampler

    sampler = make_sampler("flow", STEPS)
    labels = torch.arange(6) % 10
    x = sampler.init_noise((6, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for i in range(STEPS):
        torch.testing.assert_close(ts.inputs[i], x)
        x = sampler.step(i, x, ts.targets[i])
    ref = generate(tiny, labels, steps=STEPS, guidance=2.0, seed=0).samples
    torch.testing.assert_close(((x + 1) / 2).clamp(0, 1), ref, atol=1e-5, rtol=1e-5)
    assert ts.weights == [1.0 - s for s in sampler.timesteps]


def test_digits_training_set(tiny):
    ts = runtime_engine.training_set(tiny, steps=4, guidance=2.0, samples=5, seed=0, data="digits")
    assert ts.inputs.shape == (4, 5, 1, 8, 8) and ts.source == "digits"
    # x_s = (1 - s) x0 + s eps: the data and noise are recovered from two steps
    s0, s1 = ts.times[0], ts.times[1]
    x0 = (s1 * ts.inputs[0] - s0 * ts.inputs[1]) / (s1 - s0)
    assert float(x0.min()) >= -1 - 1e-4 and float(x0.max()) <= 1 + 1e-4
    with pytest.raises(ValueError, match="data"):
        runtime_engine.training_set(tiny, steps=4, data="imagenet")


# ------------------------------------------------------------------ gradients
def test_gradients_reach_theta_only(tiny, engine):
    mask = l2c.refresh_mask(STEPS, 2)
    theta = torch.zeros(STEPS, len(tiny.blocks), 2, requires_grad=True)
    for p in tiny.parameters():
        p.requires_grad_(False)
    try:
        loss, mse = l2c.router_loss(engine, theta, mask, torch.arange(4), lam=1e-3)
        loss.backward()
    finally:
        for p in tiny.parameters():
            p.requires_grad_(True)
    assert all(p.grad is None for p in tiny.parameters())
    g = theta.grad
    full = torch.tensor(mask)
    assert torch.all(g[full] == 0), "refresh steps compute everything: their θ is unused"
    assert torch.all(g[~full] != 0), "every cache-step branch gets a gradient"


def test_training_leaves_the_model_untouched(tiny, engine):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    flags = [p.requires_grad for p in tiny.parameters()]
    result = l2c.train_router(engine, iters=3, batch=3, progress=False)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in tiny.parameters()] == flags
    assert all(p.grad is None for p in tiny.parameters())
    assert not torch.equal(result.theta, torch.full_like(result.theta, 3.0))


def test_router_mixture_at_beta_one_is_the_model(tiny):
    """β = 1 everywhere: the routed forward is the plain forward."""
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    _, cache = runtime_engine.routed_forward(tiny, x, t, y)
    out, _ = runtime_engine.routed_forward(tiny, x, t, y, torch.ones(3, len(tiny.blocks), 2), cache)
    with torch.no_grad():
        torch.testing.assert_close(out, tiny(x, t, y))


# ------------------------------------------------------------------ training
def test_loss_decreases_on_a_tiny_model(trained):
    first, last = trained.history[0], trained.history[-1]
    assert last[0] < 0.8 * first[0], (first, last)
    assert last[2] < first[2], "λ Σβ pushes the expected compute down"


def test_reconstruction_loss_falls_when_lambda_is_zero(engine):
    """No penalty, β from 0.5: the router learns to compute (the mixture error falls)."""
    r = l2c.train_router(engine, lam=0.0, iters=15, lr=0.2, batch=4, init=0.0, progress=False)
    assert r.history[-1][1] < 0.5 * r.history[0][1], (r.history[0], r.history[-1])
    assert r.history[-1][2] > r.history[0][2]


def test_training_is_deterministic(engine):
    a = l2c.train_router(engine, iters=4, batch=3, seed=7, progress=False)
    b = l2c.train_router(engine, iters=4, batch=3, seed=7, progress=False)
    c = l2c.train_router(engine, iters=4, batch=3, seed=8, progress=False)
    assert torch.equal(a.theta, b.theta) and a.history == b.history
    assert not torch.equal(a.theta, c.theta)


def test_theta_is_clamped(engine):
    r = l2c.train_router(engine, lam=10.0, iters=8, lr=2.0, batch=2, progress=False)
    assert float(r.theta.abs().max()) <= l2c.THETA_BOUND
    assert float(r.theta.min()) == -l2c.THETA_BOUND  # a huge λ drives θ into the bound


# ------------------------------------------------------------------ export
def test_thresholded_plan_matches_beta(tiny, trained):
    beta, mask = trained.beta, trained.refresh
    for thr in (0.2, 0.5, 0.8):
        plan = l2c_export.export_plan(beta, mask, tiny.flops_per_sample(), threshold=thr)
        comp = plan.compute_tensor()
        expect = torch.tensor(mask)[:, None, None] | (beta > thr)
        assert torch.equal(comp, expect)
        assert plan.granularity == "branch" and plan.meta["threshold"] == thr
        shares = l2c_export.removed_shares(comp, mask)
        assert plan.meta["removed_in_cache_steps"] == round(shares[0], 4)
        cache = ~torch.tensor(mask)
        assert shares[0] == pytest.approx(float((~comp[cache]).float().mean()))
        assert shares[1] == pytest.approx(float((~comp).float().mean()))


@pytest.mark.parametrize("target", [0.6, 0.75, 0.9])
def test_compute_fraction_calibration(tiny, trained, target):
    flops = tiny.flops_per_sample()
    plan = l2c_export.export_plan(trained.beta, trained.refresh, flops, compute_fraction=target)
    got = plan.compute_fraction(flops)
    # one branch is the finest step; no cut of the ranking lands nearer the target
    step = flops["block_mlp"] / (STEPS * flops["total"])
    assert abs(got - target) <= step
    comp, beta = plan.compute_tensor(), trained.beta
    cache = ~torch.tensor(trained.refresh)
    kept, dropped = beta[cache][comp[cache]], beta[cache][~comp[cache]]
    if kept.numel() and dropped.numel():
        assert float(kept.min()) >= float(dropped.max()), "the plan keeps the branches with the largest β"
    thr = plan.meta["threshold"]
    assert torch.equal(comp, torch.tensor(trained.refresh)[:, None, None] | (beta > thr))


def test_export_bad_arguments(tiny, trained):
    flops = tiny.flops_per_sample()
    with pytest.raises(ValueError, match="threshold"):
        l2c_export.export_plan(trained.beta, trained.refresh, flops, threshold=1.0)
    with pytest.raises(ValueError, match="compute_fraction"):
        l2c_export.export_plan(trained.beta, trained.refresh, flops, compute_fraction=0.0)
    with pytest.raises(ValueError, match="refresh mask"):
        l2c_export.export_plan(trained.beta, [False] + trained.refresh[1:], flops)


# ------------------------------------------------------------------ config and execution
def config(**kw):
    return L2CConfig(**dict(dict(iters=6, batch=3, train_samples=4, lam=1e-3, lr=0.3, init=1.0), **kw))


def test_plan_round_trips(tiny, tmp_path):
    cfg = config(compute_fraction=0.7)
    plan = cfg.calibrate(RuntimeEngine(tiny, steps=STEPS, guidance=2.0))
    path = tmp_path / "l2c.json"
    plan.save(path)
    loaded = CachePlan.load(path)
    assert loaded == plan
    labels = torch.tensor([3, 1, 4])
    a = generate(tiny, labels, policy=cfg, steps=STEPS, guidance=2.0).samples
    b = generate(tiny, labels, policy=L2CConfig(plan_path=str(path)), steps=STEPS, guidance=2.0).samples
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="plan_path"):
        generate(tiny, labels, policy=L2CConfig(plan_path=str(path)), steps=STEPS + 1, guidance=2.0)


def test_l2c_plan_has_no_host_sync_and_compiles(tiny):
    plan = config(compute_fraction=0.6).calibrate(RuntimeEngine(tiny, steps=STEPS, guidance=2.0))
    assert not all(all(all(p) for p in row) for row in plan.compute)
    labels = torch.tensor([2, 7])
    ex = CacheExecutor(tiny, labels, plan, steps=STEPS, guidance=2.0)
    with no_host_sync():
        x, summary = ex.run(0)
    assert summary.compute_fraction == pytest.approx(plan.compute_fraction(tiny.flops_per_sample()))
    ex = CacheExecutor(tiny, labels, plan, steps=STEPS, guidance=2.0)
    for i in (2, 3):  # a refresh step storing every branch, a cache step
        compile_step_equals_eager(ex, i, "aot_eager")


def test_correction_is_fitted_on_the_plan(tiny):
    plan = config(compute_fraction=0.6).calibrate(RuntimeEngine(tiny, steps=STEPS, guidance=2.0))
    labels = torch.arange(6) % 10
    eng = RuntimeEngine(tiny, labels, steps=STEPS, guidance=2.0, seed=5)
    fitted = fit_correction(eng, plan, order=2)
    assert fitted.compute == plan.compute and any(fitted.gamma) and fitted.meta["policy"] == "L2C+gamma"
    final = eng.record().latents[-1]
    err_plain = float((eng.replay(plan).latent - final).double().square().mean())
    err_fit = float((eng.replay(fitted).latent - final).double().square().mean())
    assert err_fit < err_plain, (err_fit, err_plain)
    # the first cache step has one computed value per branch: no difference to fit
    assert fitted.gamma[1] == 0.0 and fitted.gamma2[1] == 0.0 and fitted.gamma2[3] == 0.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(lam=-1.0), "L2CConfig.lam"),
    (dict(iters=0), "L2CConfig.iters"),
    (dict(refresh=1), "L2CConfig.refresh"),
    (dict(threshold=1.0), "L2CConfig.threshold"),
    (dict(compute_fraction=0.0), "L2CConfig.compute_fraction"),
    (dict(lr=0.0), "L2CConfig.lr"),
    (dict(init=6.0), "L2CConfig.init"),
    (dict(batch=0), "L2CConfig.batch"),
    (dict(data="noise"), "L2CConfig.data"),
    (dict(granularity="step"), "L2CConfig.granularity"),
    (dict(correction=1), "L2CConfig.correction"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        L2CConfig(**kwargs)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(lam=-0.5), "lambda"),
    (dict(iters=0), "iters"),
    (dict(refresh=1), "refresh"),
    (dict(lr=float("nan")), "lr"),
    (dict(batch=0), "batch"),
])
def test_train_router_rejects_bad_hyper_parameters(engine, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        l2c.train_router(engine, progress=False, **kwargs)


def test_zero_steps_rejected(tiny):
    with pytest.raises(ValueError, match="steps"):
        config().calibrate(RuntimeEngine(tiny, steps=0, guidance=2.0))


# ------------------------------------------------------------------ the command
def test_train_router_command(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli_main(["train-router", "--steps", "10", "--iters", "3", "--batch", "2", "--train-samples", "2",
                   "--target-compute", "0.8", "--threads", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "removed in cache steps" in printed
    plan = CachePlan.load(out)
    meta = json.loads(out.read_text())["meta"]
    assert plan.steps == 10 and plan.granularity == "branch" and meta["policy"] == "L2C"
    assert meta["training"]["iters"] == 3 and len(meta["beta"]) == 10


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "--steps"),
    (["--lambda", "-1"], "lam"),
    (["--iters", "0"], "iters"),
    (["--target-compute", "1.5"], "compute_fraction"),
    (["--refresh", "1"], "refresh"),
])
def test_train_router_command_bad_arguments(tmp_path, capsys, args, needle):
    rc = cli_main(["train-router", *args, "--out", str(tmp_path / "p.json")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err
    assert not (tmp_path / "p.json").exists()


def test_bad_plan_file_names_the_field(tmp_path, tiny):
    plan = config(compute_fraction=0.7).calibrate(RuntimeEngine(tiny, steps=STEPS, guidance=2.0))
    d = plan.to_dict()
    d["compute"][3][0] = [True, "no"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"CachePlan\.compute\[3\]\[0\]\[1\]"):
        L2CConfig(plan_path=str(path)).plan(STEPS, len(tiny.blocks))
    assert dataclasses.replace(plan) == plan  # the edited dict was a copy


@pytest.mark.parametrize("sampler", ["flow", "ddim"])
def test_shipped_plans_fit_the_default_model(sampler):
    """The plans shipped for the demo (``omnicache train-router --correction``) load, fit the
    embedded model, and remove >= 40% of the branches in cache steps (the issue's target)."""
    from omnicache.runtime.default import default_l2c_plan, load_default

    path = default_l2c_plan(sampler, 50)
    assert path is not None
    plan = CachePlan.load(path)
    model = load_default()
    plan.check_matches(model, 50)
    mask = [i in plan.meta["refresh"] for i in range(50)]
    in_cache, overall = l2c_export.removed_shares(plan.compute_tensor(), mask)
    assert plan.meta["removed_in_cache_steps"] == round(in_cache, 4) and in_cache >= 0.4
    assert plan.meta["sampler"] == sampler and any(plan.gamma)
    assert default_l2c_plan(sampler, 49) is None
