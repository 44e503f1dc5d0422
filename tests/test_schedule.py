"""omnicache.policies.omnicache.schedule: the DP against brute force, curvature against float64 numpy,
the γ fits, reuse error and stage-aware filtering."""

import itertools
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from omnicache.policies.omnicache import schedule
from omnicache.policies.omnicache.schedule import (
    budget_for_compute_fraction,
    compute_schedule,
    curvature,
    curvature_pca3,
    filter_delta,
    fit_gamma,
    fit_gammas,
    max_reuse_steps,
    plan_reuse_steps,
    reuse_error,
)


# ------------------------------------------------------------------ references
def max_run(steps):
    """Longest run of consecutive integers in a sorted tuple."""
    best = run = 0
    for i, t in enumerate(steps):
        run = run + 1 if i and t == steps[i - 1] + 1 else 1
        best = max(best, run)
    return best


def brute_force(cost, budget, warmup, tail, max_consecutive):
    """Lexicographically first optimal combination (combinations() yields in lex order), or None."""
    window = range(warmup, len(cost) - tail)
    best, best_sum = None, None
    for combo in itertools.combinations(window, budget):
        if max_run(combo) > max_consecutive:
            continue
        total = sum((Fraction(cost[t]) for t in combo), Fraction(0))
        if best_sum is None or total < best_sum:
            best, best_sum = list(combo), total
    return best


def numpy_curvature(points):
    """Per-sample step curvature [B, N] in float64 (step i -> point max(i, 1))."""
    x = np.stack([p.reshape(p.shape[0], -1).double().numpy() for p in points], axis=1)  # [B, N+1, D]
    v = np.diff(x, axis=1)  # [B, N, D]: v[:, i] = step i's displacement
    dot = (v[:, 1:] * v[:, :-1]).sum(-1)
    norm = np.linalg.norm(v[:, 1:], axis=-1) * np.linalg.norm(v[:, :-1], axis=-1)
    kappa = 1.0 - dot / norm  # [B, N-1]: point 1 .. N-1
    return np.concatenate([kappa[:, :1], kappa], axis=1)


# ------------------------------------------------------------------------- DP
@pytest.mark.parametrize("seed", range(3))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    cases = 0
    for steps in range(1, 13):
        # integer costs (many ties) on even seeds, floats of mixed scale otherwise
        if seed % 2 == 0:
            cost = [rng.randint(0, 3) for _ in range(steps)]
        else:
            cost = [rng.uniform(-1, 1) * 10 ** rng.randint(-3, 3) for _ in range(steps)]
        for warmup in range(1, steps + 1):
            for tail in range(steps - warmup + 1):
                window = steps - warmup - tail
                for m in sorted({1, 2, 3, max(window, 1)}):
                    most = max_reuse_steps(steps, warmup=warmup, tail=tail, max_consecutive=m)
                    for budget in range(most + 2):
                        expect = brute_force(cost, budget, warmup, tail, m)
                        if budget > most:
                            assert expect is None
                            with pytest.raises(ValueError, match="budget"):
                                plan_reuse_steps(cost, budget, warmup=warmup, tail=tail, max_consecutive=m)
                            continue
                        assert expect is not None, (steps, warmup, tail, m, budget)
                        got = plan_reuse_steps(cost, budget, warmup=warmup, tail=tail, max_consecutive=m)
                        assert got == expect, (cost, budget, warmup, tail, m)
                        cases += 1
    assert cases > 1000


def test_dp_ties_prefer_earlier_steps_and_are_deterministic():
    cost = [0.0] * 10
    got = plan_reuse_steps(cost, 4, warmup=2, tail=1, max_consecutive=2)
    assert got == [2, 3, 5, 6]
    assert all(plan_reuse_steps(cost, 4, warmup=2, tail=1, max_consecutive=2) == got for _ in range(5))
    # a strictly cheaper late step still wins over the tie-break
    cost[8] = -1.0
    assert plan_reuse_steps(cost, 1, warmup=2, tail=1, max_consecutive=2) == [8]


def test_dp_sums_are_exact():
    # Float sums of these costs depend on order (1e16 + 1 - 1e16 == 0 left to right);
    # the DP compares exact sums, as the Fraction brute force does.
    rng = random.Random(7)
    values = [1e16, -1e16, 1.0, -1.0, 0.5, 0.0, 3.0]
    for _ in range(200):
        steps = rng.randint(3, 9)
        cost = [rng.choice(values) for _ in range(steps)]
        m = rng.randint(1, 3)
        most = max_reuse_steps(steps, warmup=1, tail=0, max_consecutive=m)
        budget = rng.randint(0, most)
        got = plan_reuse_steps(cost, budget, warmup=1, tail=0, max_consecutive=m)
        assert got == brute_force(cost, budget, 1, 0, m), (cost, budget, m)


def test_dp_accepts_tensor_and_numpy_costs():
    cost = [0.5, 0.1, 0.9, 0.2, 0.3, 0.8]
    expect = plan_reuse_steps(cost, 2, warmup=1, tail=1, max_consecutive=1)
    assert plan_reuse_steps(torch.tensor(cost), 2, warmup=1, tail=1, max_consecutive=1) == expect
    assert plan_reuse_steps(np.array(cost, dtype=np.float32), 2, warmup=1, tail=1, max_consecutive=1) == expect


def test_dp_respects_constraints_at_scale():
    rng = random.Random(0)
    cost = [rng.random() for _ in range(100)]
    got = plan_reuse_steps(cost, 40, warmup=3, tail=5, max_consecutive=2)
    assert len(got) == 40 and got == sorted(set(got))
    assert min(got) >= 3 and max(got) <= 94 and max_run(tuple(got)) <= 2


@pytest.mark.parametrize("kwargs, name", [
    (dict(budget=-1), "budget"),
    (dict(budget=1.0), "budget"),
    (dict(warmup=0), "warmup"),
    (dict(tail=-1), "tail"),
    (dict(max_consecutive=0), "max_consecutive"),
    (dict(warmup=5, tail=4), "warmup \\+ tail"),
    (dict(cost=[0.1, float("nan"), 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]), "cost\\[1\\]"),
    (dict(cost=[]), "cost"),
    (dict(budget=6), "budget=6 is infeasible"),
])
def test_dp_bad_arguments_name_the_argument(kwargs, name):
    args = dict(cost=[0.1 * i for i in range(8)], budget=2, warmup=1, tail=1, max_consecutive=2)
    args.update(kwargs)
    cost, budget = args.pop("cost"), args.pop("budget")
    with pytest.raises(ValueError, match=name):
        plan_reuse_steps(cost, budget, **args)


def test_budget_for_compute_fraction():
    assert budget_for_compute_fraction(10, 0.3) == 7  # 0.3 * 10 = 3.0000000000000004 -> 3 computed
    assert budget_for_compute_fraction(10, 1.0) == 0
    assert budget_for_compute_fraction(10, 1) == 0
    assert budget_for_compute_fraction(10, 0.01) == 9  # at least one step computed
    assert budget_for_compute_fraction(25, 0.5) == 12  # 13 computed: fraction >= requested
    assert budget_for_compute_fraction(50, 0.5) == 25
    for steps in range(1, 60):
        for fraction in (0.05, 0.25, 1 / 3, 0.5, 0.7, 0.99):
            computed = steps - budget_for_compute_fraction(steps, fraction)
            assert computed / steps >= fraction - 1e-9 or computed == 1
            assert computed == 1 or (computed - 1) / steps < fraction - 1e-12
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="fraction"):
            budget_for_compute_fraction(10, bad)
    with pytest.raises(ValueError, match="steps"):
        budget_for_compute_fraction(0, 0.5)


def test_compute_schedule():
    assert compute_schedule(5, [1, 3]) == [True, False, True, False, True]
    with pytest.raises(ValueError, match="reuse_steps"):
        compute_schedule(5, [5])


# ------------------------------------------------------------------ curvature
def test_curvature_straight_line_is_zero():
    g = torch.Generator().manual_seed(0)
    start, direction = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    speeds = [0.0, 0.5, 1.25, 3.0, 3.5, 6.0, 6.1]  # uneven but monotone: no turning
    points = [start + s * direction for s in speeds]
    kappa = curvature(points)
    assert kappa.shape == (6,) and kappa.dtype == torch.float32
    assert torch.allclose(kappa, torch.zeros(6), atol=1e-5)


def test_curvature_right_angle_is_one_and_reversal_two():
    pts = [torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 3.0]]),
           torch.tensor([[2.0, 1.0]])]
    kappa = curvature(pts)
    # steps 0, 1 -> point 1 (right angle); step 2 -> point 2 (reversal)
    assert torch.allclose(kappa, torch.tensor([1.0, 1.0, 2.0]), atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 7), (3, 4, 5), (1, 33)])
def test_curvature_matches_float64_numpy(shape):
    g = torch.Generator().manual_seed(sum(shape))
    # a smooth-ish random walk: drift plus noise, as a sampler's path
    steps = 9
    points = [torch.randn(shape, generator=g)]
    drift = torch.randn(shape, generator=g)
    for _ in range(steps):
        points.append(points[-1] + drift + 0.7 * torch.randn(shape, generator=g))
    expect = numpy_curvature(points)
    got = curvature(points, per_sample=True)
    assert got.shape == (shape[0], steps)
    np.testing.assert_allclose(got.numpy(), expect, atol=2e-5)
    np.testing.assert_allclose(curvature(points).numpy(), expect.mean(0), atol=2e-5)
    np.testing.assert_allclose(curvature(torch.stack(points)).numpy(), expect.mean(0), atol=2e-5)


def test_curvature_zero_displacement_is_finite():
    p = torch.ones(2, 3)
    kappa = curvature([p, p, p + 1, p + 1])
    assert torch.isfinite(kappa).all()
    assert torch.allclose(kappa, torch.ones(3))  # undefined angle counts as orthogonal


def test_curvature_needs_three_points():
    with pytest.raises(ValueError, match="latents"):
        curvature([torch.zeros(1, 2), torch.ones(1, 2)])


def test_curvature_half_precision_inputs():
    g = torch.Generator().manual_seed(1)
    points = [torch.randn(2, 64, generator=g).cumsum(0) * k for k in range(1, 6)]
    ref = curvature(points)
    assert torch.allclose(curvature([p.bfloat16() for p in points]), ref, atol=0.05)


def _affine_trajectory(dim, sub, steps=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(batch, 48, dim, generator=g)).Q  # [B, 48, dim] orthonormal cols
    offset = torch.randn(batch, 48, generator=g)
    coords = torch.randn(batch, steps + 1, dim, generator=g).cumsum(1)  # path inside the subspace
    coords[..., sub:] = 0
    return [offset + (basis @ coords[:, k, :, None]).squeeze(-1) for k in range(steps + 1)]


@pytest.mark.parametrize("sub", [2, 3])
def test_curvature_pca3_equals_full_in_low_dimension(sub):
    points = _affine_trajectory(dim=4, sub=sub)
    full = curvature(points, per_sample=True)
    pca = curvature_pca3(points, per_sample=True)
    assert torch.allclose(pca, full, atol=1e-4)


def test_curvature_pca3_high_dimension_sane():
    g = torch.Generator().manual_seed(3)
    points = list(torch.randn(11, 2, 4, 8, generator=g).cumsum(0))
    pca = curvature_pca3(points)
    assert pca.shape == (10,) and torch.isfinite(pca).all()
    assert (pca >= 0).all() and (pca <= 2).all()
    assert torch.equal(curvature_pca3(points), pca)  # deterministic
    with pytest.raises(ValueError, match="components"):
        curvature_pca3(points, components=0)


# ----------------------------------------------------------------------- gamma
def test_fit_gamma_recovers_known_gamma():
    g = torch.Generator().manual_seed(0)
    r_prev, r_j = torch.randn(4, 16, 8, generator=g), torch.randn(4, 16, 8, generator=g)
    gamma = 0.7
    r_true = r_j + gamma * (r_j - r_prev) + 1e-3 * torch.randn(4, 16, 8, generator=g)
    got = fit_gamma(r_true, r_j, r_prev)
    assert got.shape == () and got.dtype == torch.float32
    assert abs(got.item() - gamma) < 1e-3


def test_fit_gamma_per_sample_and_pooled():
    g = torch.Generator().manual_seed(1)
    r_prev, r_j = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    gammas = torch.tensor([0.5, -1.0, 2.0])
    r_true = r_j + gammas[:, None] * (r_j - r_prev)
    per = fit_gamma(r_true, r_j, r_prev, per_sample=True)
    assert per.shape == (3,)
    assert torch.allclose(per, gammas, atol=1e-5)
    v0 = (r_j - r_prev).double()
    pooled = (gammas.double() * v0.square().sum(1)).sum() / v0.square().sum()
    assert abs(fit_gamma(r_true, r_j, r_prev).item() - pooled.item()) < 1e-5


def test_fit_gamma_zero_drift_is_zero():
    r = torch.randn(2, 10)
    assert fit_gamma(r + 1, r, r).item() == 0.0
    assert torch.equal(fit_gamma(r + 1, r, r, per_sample=True), torch.zeros(2))


def linear_residuals(steps=10, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-8, 8, (batch, 6, 4), generator=g).float()
    drift = torch.randint(-4, 4, (batch, 6, 4), generator=g).float()
    return [base + t * drift for t in range(steps)]  # exact in float32


def test_fit_gammas_linear_drift():
    res = linear_residuals()
    compute = [True, True, False, False, True, False, True, False, False, False]
    got = fit_gammas(res, compute)
    # step 2, 3: j = 1, p = 0 -> t - j; step 5: j = 4, p = 1 -> 1/3; steps 7..9: j = 6, p = 4 -> (t-6)/2
    expect = torch.tensor([0, 0, 1, 2, 0, 1 / 3, 0, 0.5, 1.0, 1.5])
    assert torch.allclose(got, expect, atol=1e-6)
    unit = fit_gammas(res[:6], [True, True, False, False, False, False])
    assert torch.allclose(unit, torch.tensor([0.0, 0, 1, 2, 3, 4]), atol=1e-6)
    per = fit_gammas(torch.stack(res), compute, per_sample=True)
    assert per.shape == (10, 2) and torch.allclose(per, expect[:, None].expand(10, 2), atol=1e-6)


def test_fit_gammas_no_previous_computed_step_is_zero():
    res = linear_residuals(steps=4)
    assert torch.equal(fit_gammas(res, [True, False, False, True]), torch.zeros(4))


def test_fit_gammas_bad_compute():
    res = linear_residuals(steps=4)
    with pytest.raises(ValueError, match="compute\\[0\\]"):
        fit_gammas(res, [False, True, True, True])
    with pytest.raises(ValueError, match="compute"):
        fit_gammas(res, [True, False])


def test_reuse_error():
    res = linear_residuals()
    compute = [True, True, False, False, True, False, True, False, False, False]
    plain = reuse_error(res, compute)
    assert plain.shape == (10,)
    for t, c in enumerate(compute):
        assert (plain[t] == 0) == c
    gammas = fit_gammas(res, compute)
    corrected = reuse_error(res, compute, gammas)
    assert torch.allclose(corrected, torch.zeros(10), atol=1e-6)
    per = reuse_error(res, compute, fit_gammas(res, compute, per_sample=True), per_sample=True)
    assert per.shape == (10, 2) and torch.allclose(per, torch.zeros(10, 2), atol=1e-6)
    # plain reuse at step 2 from step 1: ‖R_2 - R_1‖ / ‖R_2‖
    r1, r2 = res[1].double(), res[2].double()
    assert abs(plain[2].item() - ((r2 - r1).norm() / r2.norm()).item()) < 1e-6


def test_reuse_error_with_noisy_residuals_is_reduced_by_gamma():
    g = torch.Generator().manual_seed(2)
    res = [t * torch.ones(2, 32) + 0.05 * torch.randn(2, 32, generator=g) + 3 for t in range(8)]
    compute = [True, True, False, True, False, False, True, False]
    plain = reuse_error(res, compute)
    corrected = reuse_error(res, compute, fit_gammas(res, compute))
    reuse = [t for t, c in enumerate(compute) if not c]
    assert (corrected[reuse] < plain[reuse]).all()


# ------------------------------------------------------------------ filtering
def grid_delta(h=8, w=8, d=3, batch=2):
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = ((-1.0) ** (hh + ww)).reshape(1, h * w, 1).expand(batch, h * w, d)  # Nyquist, ρ = 1
    const = torch.full((batch, h * w, d), 2.5)  # ρ = 0
    return const.clone(), checker.clone()


def test_filter_delta_disabled_is_identity():
    x = torch.randn(2, 16, 3)
    assert filter_delta(x, (4, 4), 0.0, enabled=False) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_filter_delta_shape_dtype(dtype):
    x = torch.randn(2, 6 * 5, 7).to(dtype)
    y = filter_delta(x, (6, 5), 0.2)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device


def test_filter_delta_low_pass_early():
    const, checker = grid_delta()
    y = filter_delta(const + checker, (8, 8), 0.0)
    assert torch.allclose(y, const, atol=1e-5)


def test_filter_delta_high_pass_late():
    const, checker = grid_delta()
    y = filter_delta(const + checker, (8, 8), 1.0)
    assert torch.allclose(y, checker, atol=1e-5)


def test_filter_delta_all_pass_at_split():
    x = torch.randn(2, 8 * 6, 4)
    assert torch.allclose(filter_delta(x, (8, 6), 0.5), x, atol=1e-5)


@pytest.mark.parametrize("grid", [(8, 8), (7, 5), (4, 9)])
def test_filter_delta_energy_never_increases(grid):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, grid[0] * grid[1], 5, generator=g)
    energy = x.double().square().sum()
    for progress in np.linspace(0, 1, 21):
        y = filter_delta(x, grid, float(progress))
        assert y.double().square().sum() <= energy * (1 + 1e-6)
        assert torch.equal(filter_delta(x, grid, float(progress)), y)  # deterministic


def test_filter_delta_bad_arguments():
    x = torch.randn(2, 16, 3)
    with pytest.raises(ValueError, match="grid"):
        filter_delta(x, (3, 4), 0.1)
    with pytest.raises(ValueError, match="progress"):
        filter_delta(x, (4, 4), 1.5)
    with pytest.raises(ValueError, match="split"):
        filter_delta(x, (4, 4), 0.1, split=1.0)
    with pytest.raises(ValueError, match="delta"):
        filter_delta(x[0], (4, 4), 0.1)


def test_filter_delta_video_grid():
    """(F, H, W): the frame axis is one more frequency axis. A drift constant over frames is
    filtered frame by frame as on (H, W); a frame-alternating drift is the frame Nyquist
    (removed early, kept late); energy never grows."""
    f, h, w, d = 4, 6, 8, 3
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(2, h * w, d, generator=g)
    static = frame.repeat(1, f, 1)  # the same drift on every frame
    for progress in (0.0, 0.3, 0.5, 0.8, 1.0):
        y = filter_delta(static, (f, h, w), progress)
        expect = filter_delta(frame, (h, w), progress)
        if progress > 0.5:  # the high-pass also removes what is constant over frames at ρ < cut
            continue
        torch.testing.assert_close(y, expect.repeat(1, f, 1), rtol=1e-5, atol=1e-5)
    flip = ((-1.0) ** torch.arange(f)).repeat_interleave(h * w).reshape(1, f * h * w, 1)
    const = torch.full((2, f * h * w, d), 1.5)
    torch.testing.assert_close(filter_delta(const + flip, (f, h, w), 0.0), const, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(filter_delta(const + flip, (f, h, w), 1.0), flip.expand(2, -1, d),
                               rtol=1e-5, atol=1e-5)
    x = torch.randn(2, f * h * w, d, generator=g)
    for progress in np.linspace(0, 1, 11):
        assert filter_delta(x, (f, h, w), float(progress)).double().square().sum() <= \
            x.double().square().sum() * (1 + 1e-6)
    with pytest.raises(ValueError, match="grid"):
        filter_delta(x, (f, h, w + 1), 0.1)
    with pytest.raises(ValueError, match="grid"):
        filter_delta(x, (1, f, h, w), 0.1)


def test_public_names():
    for name in schedule.__all__:
        assert callable(getattr(schedule, name))
