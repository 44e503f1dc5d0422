"""Policy configs: validation names the field; plan structure; forecasting math; deciders."""

import numpy as np
import pytest
import torch

from omnicache.policies import (
    DeltaDiTConfig,
    FirstBlockCacheConfig,
    FORAConfig,
    NoCacheConfig,
    OmniCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    forecast_coefficients,
)
from omnicache.runtime import make_dit


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("make, field", [
    (lambda: NoCacheConfig(granularity="layer"), "NoCacheConfig.granularity"),
    (lambda: FORAConfig(interval=0), "FORAConfig.interval"),
    (lambda: FORAConfig(interval=2.0), "FORAConfig.interval"),
    (lambda: FORAConfig(warmup=-1), "FORAConfig.warmup"),
    (lambda: FORAConfig(granularity="blocks"), "FORAConfig.granularity"),
    (lambda: DeltaDiTConfig(interval=0), "DeltaDiTConfig.interval"),
    (lambda: DeltaDiTConfig(group_size=0), "DeltaDiTConfig.group_size"),
    (lambda: DeltaDiTConfig(boundary=1.5), "DeltaDiTConfig.boundary"),
    (lambda: DeltaDiTConfig(granularity="step"), "DeltaDiTConfig.granularity"),
    (lambda: TaylorSeerConfig(order=3), "TaylorSeerConfig.order"),
    (lambda: TaylorSeerConfig(order=1.0), "TaylorSeerConfig.order"),
    (lambda: TaylorSeerConfig(order=True), "TaylorSeerConfig.order"),
    (lambda: OmniCacheConfig(order=2.0), "OmniCacheConfig.order"),
    (lambda: TaylorSeerConfig(interval=True), "TaylorSeerConfig.interval"),
    (lambda: TaylorSeerConfig(warmup=None), "TaylorSeerConfig.warmup"),
    (lambda: TeaCacheConfig(threshold=-0.1), "TeaCacheConfig.threshold"),
    (lambda: TeaCacheConfig(threshold=float("nan")), "TeaCacheConfig.threshold"),
    (lambda: TeaCacheConfig(coefficients=()), "TeaCacheConfig.coefficients"),
    (lambda: TeaCacheConfig(coefficients=(1.0, float("inf"))), "TeaCacheConfig.coefficients"),
    (lambda: TeaCacheConfig(granularity="block"), "TeaCacheConfig.granularity"),
    (lambda: FirstBlockCacheConfig(threshold="0.1"), "FirstBlockCacheConfig.threshold"),
    (lambda: FirstBlockCacheConfig(first_blocks=0), "FirstBlockCacheConfig.first_blocks"),
    (lambda: FirstBlockCacheConfig(warmup=0), "FirstBlockCacheConfig.warmup"),
])
def test_config_validation_names_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_plan_time_errors_name_field():
    with pytest.raises(ValueError, match=r"DeltaDiTConfig\.group_size must be in \[1, 4\]"):
        DeltaDiTConfig(group_size=5).plan(10, 4)
    with pytest.raises(ValueError, match=r"^granularity must be one of block, branch"):
        DeltaDiTConfig().plan(10, 4, granularity="step")
    with pytest.raises(ValueError, match=r"FirstBlockCacheConfig\.first_blocks must be < the model's 2 blocks"):
        FirstBlockCacheConfig(first_blocks=2).decider(10, 2)
    with pytest.raises(ValueError, match="granularity must be one of step"):
        TeaCacheConfig().decider(10, 2, granularity="branch")


def steps_computed(plan):
    return [i for i, row in enumerate(plan.compute) if row[0][0]]


def test_fora_refresh_pattern():
    plan = FORAConfig(interval=3).plan(10, 2)
    assert plan.granularity == "branch" and steps_computed(plan) == [0, 3, 6, 9]
    assert all(len({v for pair in row for v in pair}) == 1 for row in plan.compute)  # all or nothing per step
    assert steps_computed(FORAConfig(interval=4, warmup=2).plan(12, 2)) == [0, 1, 2, 6, 10]
    assert plan.gamma == [0.0] * 10 and plan.meta == {"policy": "FORA", "config": {
        "interval": 3, "warmup": 0, "granularity": "branch"}}


def test_delta_dit_rear_early_front_late():
    plan = DeltaDiTConfig(interval=2, group_size=2, boundary=0.5, warmup=1).plan(10, 6)
    compute = plan.compute_tensor()[:, :, 0]
    assert plan.granularity == "block"
    for i in range(10):
        reused = [b for b in range(6) if not compute[i, b]]
        full = i < 1 or (i - 1) % 2 == 0
        assert reused == ([] if full else [4, 5] if i < 5 else [0, 1]), i


def simulate_forecasts(plan, feature):
    """Mirror the executor's buffer updates on scalars: the forecast at each reuse step."""
    F = D1 = D2 = 0.0
    out = {}
    for i, row in enumerate(plan.compute):
        if row[0][0]:
            new = feature(i)
            D2 = -D1
            D1 = new - F
            F = new
            D2 = D2 + D1
        else:
            out[i] = F + plan.gamma[i] * D1 + plan.gamma2[i] * D2
    return out


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("interval, warmup", [(3, 0), (4, 3), (5, 2)])
def test_taylorseer_forecast_exact_for_polynomials(order, interval, warmup):
    plan = TaylorSeerConfig(interval=interval, order=order, warmup=warmup).plan(30, 2)
    full = steps_computed(plan)
    poly = np.poly1d([0.7, -3.0, 2.0][2 - order:])  # degree == order
    forecasts = simulate_forecasts(plan, lambda s: poly(s))
    assert forecasts
    for s, value in forecasts.items():
        if sum(f < s for f in full) > order:  # enough full steps behind for the full order
            assert value == pytest.approx(poly(s), rel=1e-9, abs=1e-9), s
    if order == 1:  # DESIGN: gamma = steps since refresh / refresh interval at even spacing
        s = full[-1] + 1
        assert plan.gamma[s] == pytest.approx(1 / interval) and plan.gamma2[s] == 0.0


def test_taylorseer_order_two_is_newton_backward():
    c1, c2 = forecast_coefficients([0, 4, 8], 10, 2)  # u = k / N = 0.5
    assert (c1, c2) == pytest.approx((0.5, 0.5 * 1.5 / 2))
    assert forecast_coefficients([3], 4, 2) == (0.0, 0.0)  # nothing to difference yet
    assert forecast_coefficients([0, 3], 4, 2) == (pytest.approx(1 / 3), 0.0)  # order drops to 1


def test_taylorseer_forecast_on_tensor_features():
    """The same update rule on tensors: per-element quadratic features are forecast exactly."""
    plan = TaylorSeerConfig(interval=3, order=2, warmup=1).plan(12, 1)
    a, b, c = torch.randn(3, 2, 5, dtype=torch.float64).unbind(0)
    forecasts = simulate_forecasts(plan, lambda s: a + b * s + c * s * s)
    for s, value in forecasts.items():
        if s > 6:
            torch.testing.assert_close(value, a + b * s + c * s * s)


def test_teacache_accumulates_and_resets():
    dec = TeaCacheConfig(threshold=0.25, coefficients=(2.0, 0.0)).decider(6, 2)
    dec.start(2)
    assert dec.decide(0, None) == [True, True]
    assert dec.decide(1, [0.05, 0.2]) == [False, True]  # acc 0.1, 0.4 -> reset
    assert dec.record() == {"accumulated": [pytest.approx(0.1), 0.0]}
    assert dec.decide(2, [0.05, 0.05]) == [False, False]  # 0.2, 0.1
    assert dec.decide(3, [0.05, 0.05]) == [True, False]  # 0.3 -> reset, 0.2
    assert dec.decide(5, [0.0, 0.0]) == [True, True]  # last step always computes


def test_first_block_cache_threshold_and_warmup():
    dec = FirstBlockCacheConfig(threshold=0.1, warmup=2).decider(8, 4)
    dec.start(3)
    assert dec.decide(1, [0.0, 0.0, 0.0]) == [True] * 3
    assert dec.decide(2, [0.05, 0.1, 0.2]) == [False, True, True]


def test_fit_teacache_coefficients():
    from omnicache.runtime import RuntimeEngine

    torch.manual_seed(0)
    model = make_dit("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    labels = torch.arange(4)
    coef = TeaCacheConfig(degree=2).calibrate(RuntimeEngine(model.eval(), labels, steps=12, guidance=2.0)).coefficients
    assert len(coef) == 3 and all(np.isfinite(coef))
    TeaCacheConfig(coefficients=coef)  # usable as is
    # the fit predicts the residual change better than the identity
    from omnicache.runtime.executor import CacheExecutor
    stats = CacheExecutor(model, labels, TeaCacheConfig(threshold=0.0), steps=12, guidance=2.0).run()[1].stats
    x = np.array([v for d in stats[1:] for v in d["signal_rel_l1"]])
    y = np.array([v for d in stats[1:] for v in d["residual_rel_l1"]])
    assert np.abs(np.polyval(coef, x) - y).mean() < np.abs(x - y).mean()
    with pytest.raises(ValueError, match="cannot fit degree"):
        TeaCacheConfig(degree=4).calibrate(RuntimeEngine(model, labels[:1], steps=2))
