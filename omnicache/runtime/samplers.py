"""Samplers for a rectified-flow DiT: flow Euler and DDIM, plus classifier-free guidance.

The model is trained with the rectified-flow objective::

    x_t = (1 - t) * x0 + t * eps,   t in [0, 1] (t = 1 is noise),   model(x_t, t, y) ~ v = eps - x0

Every sampler is driven step by step by an external loop without host synchronisation:
all schedule values are Python floats computed at construction::

    x = sampler.init_noise(shape, generator)
    for i in range(sampler.steps):
        x_model, t_model = sampler.model_input(i, x)   # what the model sees
        v = model(x_model, t_model, y)
        x = sampler.step(i, x, v)                      # x_{i+1}; after the last step x ~ x0

``x`` is the sampler's own state (flow space for ``FlowEuler``, VP space for ``DDIM``);
after the last step both hold the clean sample.
"""

import math

import torch

__all__ = ["FlowEuler", "DDIM", "make_sampler", "cfg_labels", "cfg_batch", "cfg_combine", "sample", "SAMPLERS"]


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def _time_column(x, t):
    # t as a (B,) float32 device tensor: a fill kernel, no host sync.
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)


class FlowEuler:
    """Euler integration of ``dx/dt = v`` from ``t = 1`` to ``t = 0``.

    Times ``t_i = shift * u_i / (1 + (shift - 1) * u_i)`` with ``u_i = 1 - i / steps``
    (``shift > 1`` spends more steps at high noise, as in SD3); the update is
    ``x_{i+1} = x_i + (t_{i+1} - t_i) * v_i``.
    """

    name = "flow"

    def __init__(self, steps: int, shift: float = 1.0):
        _check_steps(steps)
        if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        self.steps = steps
        self.shift = float(shift)
        u = [1.0 - i / steps for i in range(steps + 1)]
        self.sigmas = [self.shift * s / (1.0 + (self.shift - 1.0) * s) for s in u]  # steps + 1 flow times
        self.timesteps = self.sigmas[:-1]  # model time per step

    def init_noise(self, shape, generator=None, device=None, dtype=torch.float32):
        """Standard normal noise, drawn on the CPU generator (same samples on every device)."""
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    def model_input(self, i, x):
        """(x_model, t_model): the state itself and the flow time as a (B,) float32 tensor."""
        return x, _time_column(x, self.timesteps[i])

    def denoised(self, i, x, model_output):
        """Predicted clean sample ``x0 = x - t * v``."""
        return x - self.timesteps[i] * model_output

    def step(self, i, x, model_output):
        """``x + (t_{i+1} - t_i) * v``."""
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * model_output


def vp_alphas_cumprod(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02):
    """``alphas_cumprod`` of a discrete VP schedule as a list of floats (float64 arithmetic)."""
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0).tolist()


class DDIM:
    """Deterministic DDIM (eta = 0) with eps-prediction on a discrete VP schedule.

    VP forward process: ``x_vp = alpha * x0 + sigma * eps`` with ``alpha = sqrt(abar)``,
    ``sigma = sqrt(1 - abar)``; defaults are DiT's (1000 steps, linear betas 1e-4..0.02)
    and the timesteps are uniformly spaced as in DiT/diffusers ("leading": 0, r, 2r, ...,
    r = 1000 // steps; "trailing" also offered). The last step goes to ``abar = 1``.

    The model predicts a flow velocity, so eps and x0 come from an exact change of
    variables: dividing ``x_vp`` by ``alpha + sigma`` gives the flow state
    ``x_s = (1 - s) x0 + s eps`` at flow time ``s = sigma / (alpha + sigma)``. The model is
    called at ``(x_s, s)`` and::

        eps_hat = x_s + (1 - s) * v,    x0_hat = x_s - s * v
        x_prev  = alpha_prev * x0_hat + sigma_prev * eps_hat

    (In flow coordinates this update is Euler from ``s`` to ``s_prev``: DDIM is the flow
    Euler method on the DDIM time grid.)
    """

    name = "ddim"

    def __init__(
        self,
        steps: int,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        spacing: str = "leading",
    ):
        _check_steps(steps)
        if steps > num_train_timesteps:
            raise ValueError(f"steps must be <= num_train_timesteps ({num_train_timesteps}), got {steps}")
        abar = vp_alphas_cumprod(num_train_timesteps, beta_schedule, beta_start, beta_end)
        if spacing == "leading":
            ratio = num_train_timesteps // steps
            vp_t = [(steps - 1 - i) * ratio for i in range(steps)]
        elif spacing == "trailing":
            vp_t = [round(num_train_timesteps - i * num_train_timesteps / steps) - 1 for i in range(steps)]
        else:
            raise ValueError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")
        self.steps = steps
        self.vp_timesteps = vp_t  # integer DDPM timesteps, descending
        abars = [abar[t] for t in vp_t] + [1.0]
        self.alphas = [math.sqrt(a) for a in abars]  # steps + 1
        self.sigmas = [math.sqrt(1.0 - a) for a in abars]  # steps + 1
        self.timesteps = [s / (a + s) for a, s in zip(self.alphas[:-1], self.sigmas[:-1])]  # flow time per step
        self._c_in = [1.0 / (a + s) for a, s in zip(self.alphas[:-1], self.sigmas[:-1])]

    def init_noise(self, shape, generator=None, device=None, dtype=torch.float32):
        """Standard normal noise (``x_vp`` at the first timestep, where ``alpha ~ 0``)."""
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    def model_input(self, i, x):
        """(x / (alpha_i + sigma_i), s_i) with ``s_i = sigma_i / (alpha_i + sigma_i)``."""
        return x * self._c_in[i], _time_column(x, self.timesteps[i])

    def eps_x0(self, i, x, model_output):
        """(eps_hat, x0_hat) from the velocity by the change of variables above."""
        s = self.timesteps[i]
        x_s = x * self._c_in[i]
        return x_s + (1.0 - s) * model_output, x_s - s * model_output

    def denoised(self, i, x, model_output):
        return self.eps_x0(i, x, model_output)[1]

    def step(self, i, x, model_output):
        """``alpha_{i+1} * x0_hat + sigma_{i+1} * eps_hat``."""
        eps, x0 = self.eps_x0(i, x, model_output)
        return self.alphas[i + 1] * x0 + self.sigmas[i + 1] * eps


SAMPLERS = {"flow": FlowEuler, "ddim": DDIM}


def make_sampler(name: str, steps: int, **kwargs):
    """``FlowEuler`` for ``"flow"``, ``DDIM`` for ``"ddim"``; kwargs go to the constructor."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler name must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](steps, **kwargs)


def cfg_labels(labels, num_classes):
    """``[labels; null]`` (2B,) for a batch laid out [cond; uncond]; the null class is ``num_classes``."""
    return torch.cat([labels, torch.full_like(labels, num_classes)])


def cfg_batch(x):
    """``[x; x]``: the same input for the conditional and unconditional halves."""
    return torch.cat([x, x])


def cfg_combine(out, scale):
    """``uncond + scale * (cond - uncond)`` for ``out`` (2B, ...) laid out [cond; uncond] -> (B, ...)."""
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample(model, labels, steps, sampler="flow", guidance=1.0, seed=0, *, return_trajectory=False):
    """Uncached reference sampling loop: one full ``model(...)`` call per step.

    Parameters
    ----------
    model : DiT (eval mode); its parameter dtype is the compute dtype.
    labels : (B,) long tensor of class ids on the model's device.
    steps : number of sampling steps.
    sampler : ``"flow"``, ``"ddim"`` or a sampler object.
    guidance : classifier-free guidance scale; ``1.0`` runs the conditional model only.
    seed : seed of the CPU generator that draws the initial noise.
    return_trajectory : also return the list of states ``[x_0 (noise), ..., x_steps]``.

    Returns
    -------
    (B, C, H, W) float32 sample (and the trajectory if asked).
    """
    if isinstance(sampler, str):
        sampler = make_sampler(sampler, steps)
    elif sampler.steps != steps:
        raise ValueError(f"steps ({steps}) must equal sampler.steps ({sampler.steps})")
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    cfg = model.config
    if labels.dim() != 1 or labels.dtype != torch.long:
        raise ValueError(f"labels must be a 1-D long tensor, got shape {tuple(labels.shape)} dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(f"labels must be in [0, {cfg.num_classes}), got min {lo} max {hi}")
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    shape = (labels.shape[0], cfg.in_channels, cfg.input_size, cfg.input_size)
    x = sampler.init_noise(shape, generator=generator, device=labels.device)
    use_cfg = guidance != 1.0
    y = cfg_labels(labels, cfg.num_classes) if use_cfg else labels
    trajectory = [x]
    for i in range(sampler.steps):
        x_model, t_model = sampler.model_input(i, x)
        if use_cfg:
            x_model, t_model = cfg_batch(x_model), cfg_batch(t_model)
        out = model(x_model.to(dtype), t_model, y).float()
        if use_cfg:
            out = cfg_combine(out, guidance)
        x = sampler.step(i, x, out)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
