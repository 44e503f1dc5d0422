"""OmniCache: config validation, calibrated plans (constraints, compute fraction), the γ fits
and the context-aware DP against references, sync-free and compilable replay, the quality
gain of the correction on the embedded model, and ``omnicache calibrate``."""

import itertools
import json
import random

import pytest
import torch

from omnicache import cli, metrics
from omnicache.policies.omnicache import calibrate, schedule
from omnicache.api import generate
from omnicache.plan import CachePlan
from omnicache.policies import OmniCacheConfig, forecast_coefficients
from omnicache.runtime.default import load_default
from omnicache.runtime.engine import RuntimeEngine
from omnicache.runtime.executor import CacheExecutor
from omnicache.runtime.syncguard import no_host_sync

LABELS = torch.tensor([2, 7, 1, 4])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_dit):
    return tiny_dit


def computed(plan):
    return [row[0][0] for row in plan.compute]


def max_run(compute):
    best = run = 0
    for c in compute:
        run = 0 if c else run + 1
        best = max(best, run)
    return best


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    (dict(compute_fraction=0.0), "compute_fraction"),
    (dict(compute_fraction=1.5), "compute_fraction"),
    (dict(warmup=0), "warmup"),
    (dict(tail=-1), "tail"),
    (dict(max_consecutive=0), "max_consecutive"),
    (dict(order=3), "order"),
    (dict(order=True), "order"),
    (dict(correction="yes"), "correction"),
    (dict(filtering=1), "filtering"),
    (dict(filtering=True, correction=False), "filtering"),
    (dict(selection="greedy"), "selection"),
    (dict(fit="exact"), "fit"),
    (dict(fit="open", filtering=True), "fit"),
    (dict(granularity="branch"), "granularity"),
    (dict(calibration_samples=0), "calibration_samples"),
    (dict(calibration_samples=1), "calibration_samples"),  # search needs two halves
    (dict(calibration_seed=-1), "calibration_seed"),
    (dict(search="no"), "search"),
])
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"OmniCacheConfig\.{field}"):
        OmniCacheConfig(**kwargs)


# ---------------------------------------------------------------- calibration
@pytest.mark.parametrize("kwargs", [
    dict(compute_fraction=0.5),
    dict(compute_fraction=0.45, warmup=3, tail=2, max_consecutive=2),
    dict(compute_fraction=0.35, warmup=1, tail=0, max_consecutive=3, order=1),
    dict(compute_fraction=0.6, selection="curvature", search=False),
    dict(compute_fraction=0.5, selection="uniform", correction=False),
    dict(compute_fraction=0.45, filtering=True, max_consecutive=2),
    dict(compute_fraction=0.5, fit="open", granularity="block"),
])
def test_calibrated_plan_respects_constraints_and_budget(tiny, kwargs):
    steps = 16
    cfg = OmniCacheConfig(calibration_samples=4, **kwargs)
    plan = cfg.calibrate(RuntimeEngine(tiny, steps=steps, guidance=2.0))
    comp = computed(plan)
    assert plan.steps == steps and plan.blocks == len(tiny.blocks) and plan.granularity == cfg.granularity
    assert all(comp[: cfg.warmup]) and all(comp[steps - cfg.tail:])
    assert max_run(comp) <= cfg.max_consecutive
    budget = schedule.budget_for_compute_fraction(steps, cfg.compute_fraction)
    assert comp.count(False) == budget  # the smallest attainable fraction >= the request
    fraction = plan.compute_fraction(tiny.flops_per_sample())
    assert cfg.compute_fraction <= fraction < cfg.compute_fraction + 1 / steps + 0.01
    for t, c in enumerate(comp):
        if c or not cfg.correction:
            assert plan.gamma[t] == plan.gamma2[t] == 0.0
    if cfg.correction and cfg.order == 1:
        assert not any(plan.gamma2)
    assert ("filter" in plan.meta) == cfg.filtering
    again = CachePlan.from_dict(json.loads(json.dumps(plan.to_dict())))  # valid and serialisable
    assert again.compute == plan.compute


def test_infeasible_fraction_names_the_constraints(tiny):
    with pytest.raises(ValueError, match="max_consecutive=1"):
        OmniCacheConfig(compute_fraction=0.2, max_consecutive=1, calibration_samples=2).calibrate(
            RuntimeEngine(tiny, steps=10, guidance=2.0))


def test_uniform_reuse_spreads_evenly():
    reuse = calibrate._uniform_reuse(20, 10, 2, 1)
    assert len(reuse) == 10 and min(reuse) >= 2 and max(reuse) <= 18
    comp = schedule.compute_schedule(20, reuse)
    assert max_run(comp) == 2  # 10 reuse steps in 17 window steps: runs of 1 and 2


# ------------------------------------------------------------------- γ fits
def test_fit_gamma2_recovers_known_coefficients():
    g = torch.Generator().manual_seed(0)
    r_q, r_p, r_j = (torch.randn(3, 16, 8, generator=g) for _ in range(3))
    d1 = r_j - r_p
    d2 = d1 - (r_p - r_q)
    r_t = r_j + 0.7 * d1 - 0.3 * d2 + 1e-4 * torch.randn(3, 16, 8, generator=g)
    got = schedule.fit_gamma2(r_t, r_j, r_p, r_q)
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.7, -0.3]), atol=1e-3, rtol=0)
    # order 1 (no third computed step): γ2 = 0, γ1 the first-order fit
    got1 = schedule.fit_gamma2(r_j + 0.4 * d1, r_j, r_p)
    torch.testing.assert_close(got1, torch.tensor([0.4, 0.0]), atol=1e-5, rtol=0)
    # D2 parallel to D1: falls back to first order instead of a singular solve
    par = schedule.fit_gamma2(r_j + 0.5 * d1, r_j, r_p, r_p - 2 * d1)
    torch.testing.assert_close(par, torch.tensor([0.5, 0.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("degree", [1, 2])
def test_fitted_gammas_are_exact_on_polynomial_residuals(degree):
    """Residuals polynomial in the step index: the least-squares γ of order ``degree`` are the
    Newton extrapolation coefficients (TaylorSeer's), also at uneven spacing."""
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(-4, 5, (2, 6, 4), generator=g).float() for _ in range(3))  # exact
    res = [a + t * b + (t * t * c if degree == 2 else 0) for t in range(14)]
    compute = [True, True, False, True, True, False, False, True, False, True, False, False, True, False]
    done, expect1, expect2 = [], [], []
    for t, comp in enumerate(compute):
        c1, c2 = (0.0, 0.0) if comp else forecast_coefficients(done, t, degree)
        expect1.append(c1)
        expect2.append(c2)
        if comp:
            done.append(t)
    if degree == 1:
        got = schedule.fit_gammas(res, compute)
        torch.testing.assert_close(got, torch.tensor(expect1, dtype=torch.float32), atol=1e-5, rtol=0)
    else:
        got = schedule.fit_gammas2(res, compute)[3:]  # from step 3 on, three computed steps exist
        torch.testing.assert_close(got[:, 0], torch.tensor(expect1[3:], dtype=torch.float32), atol=1e-4, rtol=0)
        torch.testing.assert_close(got[:, 1], torch.tensor(expect2[3:], dtype=torch.float32), atol=1e-4, rtol=0)


# -------------------------------------------------------------- context DP
def _sources(comp):
    hist, out = [], []
    for t, c in enumerate(comp):
        if c:
            hist.append(t)
            out.append(None)
        else:
            prev = hist[::-1] + [None, None]
            out.append(tuple(prev[:3]))
    return out


def test_context_dp_matches_brute_force():
    for seed in range(120):
        r = random.Random(seed)
        steps, warmup, tail, m = r.randint(3, 10), r.randint(1, 3), r.randint(0, 2), r.randint(1, 3)
        if warmup + tail > steps:
            continue
        budget = r.randint(0, schedule.max_reuse_steps(steps, warmup=warmup, tail=tail, max_consecutive=m))
        table = {}

        def cost(t, j, p, q, table=table, r=r):
            return table.setdefault((t, j, p, q), r.random())

        def total(comp, cost=cost):
            return sum(cost(t, *src) for t, src in enumerate(_sources(comp)) if src)

        best = None
        for combo in itertools.combinations(range(warmup, steps - tail), budget):
            comp = schedule.compute_schedule(steps, list(combo))
            if max_run(comp) <= m and (best is None or total(comp) < best - 1e-12):
                best = total(comp)
        got = schedule.plan_reuse_steps_in_context(cost, steps, budget, warmup=warmup, tail=tail, max_consecutive=m)
        comp = schedule.compute_schedule(steps, got)
        assert len(got) == budget and all(comp[:warmup]) and all(comp[steps - tail:]) and max_run(comp) <= m
        assert abs(total(comp) - best) < 1e-9, seed


# ---------------------------------------------------------------- replay
@pytest.fixture(scope="module", params=[False, True], ids=["order2", "order2-filtered"])
def omni_plan(request, tiny):
    cfg = OmniCacheConfig(compute_fraction=0.5, max_consecutive=2, filtering=request.param, calibration_samples=4)
    return cfg.calibrate(RuntimeEngine(tiny, steps=10, guidance=2.0))


def test_plan_replays_without_host_sync(tiny, omni_plan):
    assert any(omni_plan.gamma2)
    ex = CacheExecutor(tiny, LABELS, omni_plan, steps=10, guidance=2.0)
    with no_host_sync():
        x, summary = ex.run(0)
    ref, _ = CacheExecutor(tiny, LABELS, omni_plan, steps=10, guidance=2.0).run(0)
    assert torch.equal(x, ref)
    assert summary.policy == "OmniCache" and summary.compute_fraction < 0.6


def test_compiled_step_equals_eager(tiny, omni_plan):
    comp = computed(omni_plan)
    store = next(i for i in range(3, 10) if comp[i])  # a full step storing F, D1, D2 (and filtering them)
    reuse = next(i for i in range(store, 10) if not comp[i] and omni_plan.gamma2[i])
    for step in (store, reuse):
        torch._dynamo.reset()
        ex = CacheExecutor(tiny, LABELS, omni_plan, steps=10, guidance=2.0)
        x = ex.init_noise(0)
        with torch.no_grad():
            for i in range(step):
                x, _ = ex.step_fn(i)(x)
            bufs = ex.cache_tensors()
            before = [t.clone() for t in bufs]
            eager, _ = ex.step_fn(step)(x)
            after = [t.clone() for t in bufs]
            for t, s in zip(bufs, before):
                t.copy_(s)
            compiled, _ = torch.compile(ex.step_fn(step), fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        for t, s in zip(bufs, after):
            torch.testing.assert_close(t, s, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- quality
@pytest.mark.parametrize("sampler", ["flow", "ddim"])
def test_correction_beats_plain_reuse_on_the_default_model(sampler):
    model = load_default()
    labels = [0, 1, 2, 3, 4, 5]
    steps = 16
    ref = generate(model, labels, steps=steps, sampler=sampler).samples
    psnr = {}
    for correction in (False, True):
        cfg = OmniCacheConfig(compute_fraction=0.5, correction=correction, max_consecutive=2, calibration_samples=6)
        out = generate(model, labels, policy=cfg, steps=steps, sampler=sampler)
        assert out.summary.compute_fraction < 0.51
        psnr[correction] = float(metrics.psnr(out.samples, ref).mean())
    # measured: flow 38.3 -> 51.7 dB, ddim 38.5 -> 48.2 dB
    assert psnr[True] > psnr[False] + 5.0, psnr


# --------------------------------------------------------- omnicache calibrate
def test_calibrate_main_writes_a_loadable_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli.cmd_calibrate(["--policy", "omnicache", "--compute-fraction", "0.5", "--steps", "8", "--samples", "4",
                         "--seed", "3", "--set", "order=1", "--set", "max_consecutive=2", "--out", str(out)])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    plan = CachePlan.load(out)
    assert plan.steps == 8 and plan.meta["order"] == 1 and plan.meta["calibration_seed"] == 3
    assert not any(plan.gamma2) and computed(plan).count(True) == 4
    model = load_default()
    result = generate(model, [3, 5], policy=OmniCacheConfig(plan_path=str(out)), steps=8)
    assert result.summary.policy == "OmniCache" and result.samples.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("args, needle", [
    (["--policy", "fora", "--compute-fraction", "0.5", "--out", "x.json"], "invalid choice: 'fora'"),
    (["--policy", "omnicache", "--out", "x.json"], "--compute-fraction"),
    (["--policy", "omnicache", "--compute-fraction", "1.5", "--out", "x.json"], "--compute-fraction"),
    (["--policy", "omnicache", "--compute-fraction", "0.5", "--set", "order=3", "--out", "x.json"],
     "OmniCacheConfig.order"),
    (["--policy", "omnicache", "--compute-fraction", "0.5", "--set", "bogus=1", "--out", "x.json"], "bogus"),
    (["--policy", "omnicache", "--compute-fraction", "0.5", "--set", "order", "--out", "x.json"], "key=value"),
    (["--policy", "omnicache", "--compute-fraction", "0.5", "--steps", "0", "--out", "x.json"], "--steps"),
    (["--policy", "omnicache", "--compute-fraction", "0.5", "--out", "/no/such/dir/x.json"], "does not exist"),
])
def test_calibrate_main_bad_arguments(args, needle, capsys):
    assert cli.cmd_calibrate(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err


def test_bad_filter_setting_is_refused_before_sampling(tiny):
    import dataclasses

    cfg = OmniCacheConfig(compute_fraction=0.5, max_consecutive=2, filtering=True, calibration_samples=4)
    plan = cfg.calibrate(RuntimeEngine(tiny, steps=10, guidance=2.0))
    for bad, needle in ((dict(grid=[3, 5]), "grid"), (dict(low_cutoff=2.0), "low_cutoff"),
                        (dict(bogus=1), "bogus")):
        meta = dict(plan.meta, filter=dict(plan.meta["filter"], **bad))
        with pytest.raises(ValueError, match=rf"CachePlan\.meta\.filter.*{needle}"):
            CacheExecutor(tiny, LABELS, dataclasses.replace(plan, meta=meta), steps=10, guidance=2.0)
