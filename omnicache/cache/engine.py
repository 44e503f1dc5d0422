"""The engine protocol: what a method needs from an engine, and nothing more.

A *method* (OmniCache calibration, the closed-loop γ fit on any plan, Learning-to-Cache
training, the TeaCache and MagCache fits; :mod:`omnicache.policies`) is written once and
sees an engine only through :class:`Engine`. Our runtime
(:class:`omnicache.runtime.engine.RuntimeEngine`) and diffusers
(:class:`omnicache.integrations.diffusers.engine.DiffusersEngine`) implement it; so can
yours (``docs/engines.md``, and the test engine in ``tests/test_engine_protocol.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import torch

from .summary import Costs, RunSummary

__all__ = ["Engine", "Recording", "Replay", "FitHook"]


@dataclasses.dataclass
class Recording:
    """One uncached run, as an engine recorded it.

    ``residuals[t]``: step ``t``'s residual ``out - in`` of each cache unit (the block stack,
    or each block where the model changes its token layout between blocks), per cache
    context and stream: ``{(context, unit, stream): tensor}`` in a fixed order (contexts as
    the engine orders them, then units, then streams by name). ``latents``: the ``steps + 1``
    latents entering each sampler step and leaving the last one, or None where the engine
    has no sampler step (a bare transformer in the user's own loop). ``grid``: the token grid
    ``(H, W)`` of a residual laid out ``[rows, H·W, D]`` where the recording has one such
    tensor a step, else None (the residuals are then read flattened).
    """

    residuals: list
    latents: list | None
    grid: tuple | None = None

    @property
    def steps(self) -> int:
        return len(self.residuals)

    def flat(self, t: int) -> torch.Tensor:
        """Step ``t``'s residuals as one tensor: the only one as it is (with a ``grid``), or every
        context's, unit's and stream's flattened and concatenated (``[1, n]``)."""
        parts = list(self.residuals[t].values())
        if self.grid is not None and len(parts) == 1:
            return parts[0]
        return torch.cat([p.flatten() for p in parts])[None]

    def stream(self, t: int, name: str) -> list:
        """Step ``t``'s residuals of stream ``name``, every context and unit in order."""
        return [r for (_, _, s), r in self.residuals[t].items() if s == name]


@dataclasses.dataclass
class Replay:
    """A run under a policy: the final latent (None where the engine has no sampler step),
    the run's :class:`RunSummary` (None for a run driven by a fit hook) and, for such a run,
    what the hook's outcomes were (``"next latent"``, ``"unit residual"``)."""

    latent: torch.Tensor | None
    summary: RunSummary | None
    fitted: str | None = None


class FitHook(Protocol):
    """Called by :meth:`Engine.replay` at each step that reuses a unit and whose plan has a
    non-zero coefficient there (the plan's ``gamma`` / ``gamma2`` mark which terms are
    fitted). ``base``: the outcome at ``γ = 0`` (the next latent, or, without a sampler step,
    the unit's forecast residual); ``directions``: its change per unit coefficient, one per
    fitted term (``gamma`` first); ``target``: the uncached outcome. Returns the
    coefficients the replay continues with (one per direction). An engine may call it
    several times a step (per context, unit or stream): it pools them. An engine that must
    replay the run again (another way to probe it) calls :meth:`reset` first."""

    def __call__(self, t: int, base: torch.Tensor, directions: list, target: torch.Tensor) -> list: ...

    def reset(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """What a method needs from an engine (see ``docs/engines.md`` for an example).

    Attributes:
        name: the engine's name (recorded in the plans it calibrates).
        steps, blocks: sampling steps of a run and the model's blocks.
        samples: inputs of a run that replay separately (:meth:`replay`'s ``samples``); 1
            where a run is one unit (the user's pipeline call).
        grid: the token grid stage-aware filtering works on (recorded in a plan), or None.
        progress: whether a method shows progress bars.
    """

    name: str
    steps: int
    blocks: int
    samples: int
    grid: tuple | None
    progress: bool

    def with_inputs(self, samples: int, seed: int, source: str = "self") -> Engine:
        """The engine on a batch of ``samples`` inputs drawn with ``seed`` where it chooses its
        inputs (``source="data"``: data noised to each step's time, where it has a data set);
        an engine whose inputs are the user's returns itself."""

    def record(self) -> Recording:
        """One uncached run (computed once, then kept)."""

    def replay(self, policy, *, samples: slice | None = None, fit: FitHook | None = None) -> Replay:
        """A run under ``policy`` (a plan or a config) from the recorded run's noise, on
        ``samples`` of the inputs (all when None); with ``fit``, a static plan's run whose
        reuse steps are probed and continued with the coefficients ``fit`` returns."""

    def sensitivity(self, t: int, tangents: list) -> torch.Tensor:
        """The sampler step's linearised response at step ``t`` of the recorded run: for each
        tangent (a change of :meth:`Recording.flat`'s residual), the change of the next
        latent, ``[k, n]`` float64 (an engine that cannot linearise its output head scales the
        tangent by the step's measured sensitivity to the model output)."""

    def costs(self) -> Costs:
        """FLOPs of one call by part: per block its attention and MLP branch, then the rest."""

    def mixed_error(self, beta: torch.Tensor, refresh: list, sample_idx: torch.Tensor) -> tuple:
        """Learning-to-Cache: every cache step of the ``refresh`` pattern (False: a cache step),
        teacher-forced on the recorded inputs of ``sample_idx``, with each block's branch
        ``k`` returning ``β·f(x) + (1 − β)·cache`` (``beta[step, block, k]``, the cache the
        mixture of the cache step before, seeded by the refresh step); returns ``(Σ error,
        terms)``: the sum over cache steps (and contexts) of the output's squared error against
        the uncached output, weighted by what it leaves in the next latent, and the number
        of terms summed. Differentiable in ``beta``."""

    def training_samples(self) -> int:
        """Inputs :meth:`mixed_error` draws its minibatches from."""

    def parameters(self):
        """The model's parameters (frozen while a method trains)."""

    def meta(self) -> dict:
        """What a plan records of the model and the run (``meta["model"]``: its fingerprint)."""
