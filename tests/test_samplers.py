"""Flow Euler and DDIM samplers, classifier-free guidance and the reference sampling loop."""

import math

import pytest
import torch

from omnicache.runtime.model import make_dit
from omnicache.runtime.samplers import (
    DDIM,
    FlowEuler,
    cfg_batch,
    cfg_combine,
    cfg_labels,
    make_sampler,
    sample,
    vp_alphas_cumprod,
)

SAMPLERS = ["flow", "ddim"]


def tiny_model():
    torch.manual_seed(0)
    model = make_dit("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def run(sampler, velocity, x):
    """Drives ``sampler`` as the executor does, with ``velocity(x_model, t_model)``."""
    for i in range(sampler.steps):
        x_model, t_model = sampler.model_input(i, x)
        x = sampler.step(i, x, velocity(x_model, t_model))
    return x


def point_velocity(x0):
    # Exact velocity when the data is the single point x0: v = (x_t - x0) / t.
    return lambda x, t: (x - x0) / t.view(-1, 1, 1, 1)


def gaussian_velocity(mu, s):
    # Exact velocity for data N(mu, s^2): x0_hat = E[x0 | x_t], v = (x_t - x0_hat) / t.
    def v(x, t):
        t = t.double().view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * s**2 + t**2
        x0_hat = mu + (1 - t) * s**2 / var * (x - (1 - t) * mu)
        return (x - x0_hat) / t

    return v


def test_flow_schedule():
    s = FlowEuler(10)
    assert s.steps == 10 and len(s.timesteps) == 10 and len(s.sigmas) == 11
    assert s.timesteps[0] == 1.0 and s.sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(s.sigmas, s.sigmas[1:]))
    shifted = FlowEuler(10, shift=3.0)
    assert shifted.timesteps[0] == 1.0 and shifted.sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(shifted.timesteps[1:], s.timesteps[1:]))  # more time at high noise
    assert all(isinstance(t, float) for t in s.timesteps + shifted.timesteps)


def test_ddim_schedule():
    s = DDIM(50)
    assert s.vp_timesteps[0] == 980 and s.vp_timesteps[-1] == 0 and len(s.vp_timesteps) == 50
    assert s.alphas[-1] == 1.0 and s.sigmas[-1] == 0.0
    abar = vp_alphas_cumprod()
    assert math.isclose(s.alphas[0] ** 2, abar[980]) and abar[980] < 1e-4
    assert all(0 < t < 1 for t in s.timesteps) and s.timesteps[0] > 0.99
    assert all(a > b for a, b in zip(s.timesteps, s.timesteps[1:]))
    trailing = DDIM(10, spacing="trailing")
    assert trailing.vp_timesteps[0] == 999 and trailing.vp_timesteps[-1] == 99
    scaled = DDIM(10, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert scaled.timesteps[0] < s.timesteps[0]


def test_ddim_change_of_variables():
    """x_vp / (alpha + sigma) is the flow state at s = sigma / (alpha + sigma), and the
    true velocity gives back the true eps and x0 and the DDIM update alpha' x0 + sigma' eps."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    s = DDIM(20)
    for i in range(s.steps):
        a, sig = s.alphas[i], s.sigmas[i]
        x_vp = a * x0 + sig * eps
        x_model, t_model = s.model_input(i, x_vp)
        flow_t = sig / (a + sig)
        assert t_model.shape == (4,) and t_model.dtype == torch.float32
        torch.testing.assert_close(t_model, torch.full((4,), flow_t, dtype=torch.float32))
        torch.testing.assert_close(x_model, (1 - flow_t) * x0 + flow_t * eps)
        eps_hat, x0_hat = s.eps_x0(i, x_vp, eps - x0)
        torch.testing.assert_close(eps_hat, eps)
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(s.step(i, x_vp, eps - x0), s.alphas[i + 1] * x0 + s.sigmas[i + 1] * eps)


def test_ddim_is_flow_euler_on_its_grid():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    s = DDIM(8)
    flow_t = s.timesteps + [0.0]
    for i in range(s.steps):
        x_model, _ = s.model_input(i, x)
        x_next = s.step(i, x, v)
        flow_next = x_next / (s.alphas[i + 1] + s.sigmas[i + 1])
        torch.testing.assert_close(flow_next, x_model + (flow_t[i + 1] - flow_t[i]) * v)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 7])
def test_single_point_data_is_recovered_exactly(name, steps):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    s = make_sampler(name, steps)
    noise = s.init_noise((3, 1, 8, 8), generator=g, dtype=torch.float64)
    # Model time is float32: exact up to its rounding.
    torch.testing.assert_close(run(s, point_velocity(x0), noise), x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SAMPLERS)
def test_gaussian_data_transport(name):
    # The probability-flow ODE maps noise z to mu + s z for Gaussian data N(mu, s^2).
    mu, std = 0.3, 0.5
    s = make_sampler(name, 200)
    g = torch.Generator().manual_seed(3)
    z = s.init_noise((64, 1, 2, 2), generator=g, dtype=torch.float64)
    out = run(s, gaussian_velocity(mu, std), z)
    start = z * (s.alphas[0] + s.sigmas[0]) ** -1 if name == "ddim" else z  # flow state of the noise
    expected = mu + std * (start - (1 - s.timesteps[0]) * mu) / (
        math.sqrt((1 - s.timesteps[0]) ** 2 * std**2 + s.timesteps[0] ** 2)
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=3e-2)  # Euler error at 200 steps


def test_init_noise_is_seeded_and_device_independent():
    s = FlowEuler(4)
    a = s.init_noise((2, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    b = s.init_noise((2, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(a.double(), b)
    assert a.dtype == torch.float32


def test_cfg_helpers():
    labels = torch.tensor([3, 1])
    assert cfg_labels(labels, 10).tolist() == [3, 1, 10, 10]
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(cfg_batch(x), torch.cat([x, x]))
    cond, uncond = torch.randn(2, 3), torch.randn(2, 3)
    out = torch.cat([cond, uncond])
    torch.testing.assert_close(cfg_combine(out, 1.0), cond)
    torch.testing.assert_close(cfg_combine(out, 0.0), uncond)
    torch.testing.assert_close(cfg_combine(out, 4.0), uncond + 4.0 * (cond - uncond))


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sample_on_tiny_model(name, guidance):
    model = tiny_model()
    labels = torch.tensor([0, 3, 9])
    out = sample(model, labels, 4, sampler=name, guidance=guidance, seed=7)
    assert out.shape == (3, 1, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(sample(model, labels, 4, sampler=name, guidance=guidance, seed=7), out)
    assert not torch.allclose(sample(model, labels, 4, sampler=name, guidance=guidance, seed=8), out)

    # The reference loop equals a hand-driven loop with the public pieces.
    s = make_sampler(name, 4)
    x = s.init_noise((3, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    y = cfg_labels(labels, 10) if guidance != 1.0 else labels
    with torch.no_grad():
        for i in range(4):
            xm, tm = s.model_input(i, x)
            if guidance != 1.0:
                v = cfg_combine(model(cfg_batch(xm), cfg_batch(tm), y), guidance)
            else:
                v = model(xm, tm, labels)
            x = s.step(i, x, v)
    torch.testing.assert_close(x, out)


def test_sample_trajectory():
    model = tiny_model()
    out, traj = sample(model, torch.tensor([1, 2]), 3, sampler="ddim", seed=0, return_trajectory=True)
    assert len(traj) == 4 and traj[-1] is out


def test_sampling_loop_compiles_fullgraph():
    torch._dynamo.reset()
    model = tiny_model()
    s = DDIM(3)
    labels = torch.tensor([1, 2])
    y = cfg_labels(labels, 10)

    def loop(x):
        for i in range(s.steps):
            xm, tm = s.model_input(i, x)
            x = s.step(i, x, cfg_combine(model(cfg_batch(xm), cfg_batch(tm), y), 2.0))
        return x

    x = s.init_noise((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(loop, fullgraph=True, backend="aot_eager")(x), loop(x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, None])
def test_bad_steps(steps):
    for name in SAMPLERS:
        with pytest.raises(ValueError, match="steps"):
            make_sampler(name, steps)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sampler name"):
        make_sampler("euler", 10)
    with pytest.raises(ValueError, match="shift"):
        FlowEuler(10, shift=0.0)
    with pytest.raises(ValueError, match="steps"):
        DDIM(1001)
    with pytest.raises(ValueError, match="spacing"):
        DDIM(10, spacing="middle")
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIM(10, beta_schedule="cosine")
    model = tiny_model()
    with pytest.raises(ValueError, match="guidance"):
        sample(model, torch.tensor([1]), 2, guidance=float("nan"))
    with pytest.raises(ValueError, match="labels"):
        sample(model, torch.tensor([1.0]), 2)
    with pytest.raises(ValueError, match="labels"):
        sample(model, torch.tensor([10]), 2)
    with pytest.raises(ValueError, match="steps"):
        sample(model, torch.tensor([1]), 2, sampler=FlowEuler(3))
