"""Tiny random configs of every diffusers transformer class the model table covers, for the
per-class matrix (tests/test_diffusers_models.py): ``ZOO[class name]() -> Case``.

Each family's factories live in their own module (``known``: the 12 classes of
``tests/diffusers_models.py``; the others by group); a factory builds the model with a tiny
random config (CPU, float32, a few blocks) and the inputs of one call.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import torch


@dataclasses.dataclass
class Case:
    """A tiny model, the shape of its latent ``x`` (batch first, 2 samples) and its call's keyword
    arguments ``inputs(x, t)``; ``update(x, out, steps)`` the sampler step (default: an
    Euler-like ``x - out[:, :C] / steps`` on the latent's first dim's channels);
    ``timestep(i, steps, batch)``; ``alone_inputs(s)``: the inputs of sample ``s`` alone (default:
    every tensor argument whose first dimension is the batch, sliced)."""

    model: torch.nn.Module
    shape: tuple
    inputs: object
    update: object = None
    timestep: object = None
    alone_inputs: object = None

    def alone(self, s: int) -> "Case":
        """Sample ``s`` as a batch of one: same model, its own inputs."""
        if self.alone_inputs is not None:
            inputs = self.alone_inputs(s)
        else:
            b = self.shape[0]
            inputs = lambda x, t: {k: v[s:s + 1] if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v
                                   for k, v in self.inputs(x, t).items()}
        return dataclasses.replace(self, shape=(1, *self.shape[1:]), inputs=inputs, alone_inputs=None)

    def t(self, i: int, steps: int) -> torch.Tensor:
        if self.timestep is not None:
            return self.timestep(i, steps, self.shape[0])
        return torch.full((self.shape[0],), 999.0 * (1 - i / steps))

    def step(self, x, out, steps):
        if self.update is not None:
            return self.update(x, out, steps)
        return x - out[:, : x.shape[1]] / steps


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(case: Case, steps: int, seed: int = 0, fn=None, x=None) -> list:
    """``steps`` calls of the model (or ``fn``) in a small Euler-like loop from ``x`` (default:
    noise of ``seed``); the list of outputs."""
    x = torch.randn(case.shape, generator=g(seed)) if x is None else x
    outs, fn = [], case.model if fn is None else fn
    for i in range(steps):
        with torch.no_grad():
            out = fn(**case.inputs(x, case.t(i, steps)), return_dict=False)[0]
        outs.append(out)
        x = case.step(x, out, steps)
    return outs


ZOO: dict = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name, _factory in _module.ZOO.items():
        assert _name not in ZOO, f"two tiny configs for {_name}"
        ZOO[_name] = _factory


def make(name: str, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    case = ZOO[name]()
    case.model.eval()
    return case
