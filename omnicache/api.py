"""``generate``: class-conditional sampling with a caching policy, in one call.

    from omnicache.api import generate
    from omnicache.policies import FORAConfig
    from omnicache.runtime import load_default

    result = generate(load_default(), [0, 1, 2, 3], policy=FORAConfig(interval=3), steps=50)
    result.samples            # (4, 1, 8, 8) in [0, 1]
    result.summary.compute_fraction, result.summary.wall_s
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .metrics import to_unit
from .runtime.executor import CacheExecutor, RunSummary

__all__ = ["generate", "GenerateResult"]


@dataclass
class GenerateResult:
    """``samples``: ``(B, C, H, W)`` float32 images in ``[0, 1]``; ``summary``: what the run did."""

    samples: torch.Tensor
    summary: RunSummary


def _labels(labels, num_classes: int, device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.tensor(list(labels), dtype=torch.long)
    if labels.dim() != 1 or labels.dtype != torch.long or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D list or long tensor of class ids, "
                         f"got shape {tuple(labels.shape)} dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got min {lo} max {hi}")
    return labels.to(device)


@torch.no_grad()
def generate(model, labels, *, policy=None, steps: int = 50, sampler="flow", guidance: float | None = None,
             seed: int = 0, granularity: str | None = None, device=None) -> GenerateResult:
    """Sample one image per label with feature caching.

    Args:
        model: a :class:`~omnicache.runtime.model.DiT` in eval mode.
        labels: class ids (list or 1-D long tensor).
        policy: a policy config from :mod:`omnicache.policies`, a :class:`~omnicache.plan.CachePlan`,
            or None (uncached).
        steps: sampling steps; ``sampler``: ``"flow"``, ``"ddim"`` or a sampler object.
        guidance: classifier-free guidance scale; None uses ``model.default_guidance`` if the
            model has one (the embedded default model's ``default_guidance``), else 1.0 (no CFG).
        seed: seed of the CPU generator that draws the initial noise (same seed, same samples).
        granularity: overrides the policy's cache unit (``"step"``, ``"block"``, ``"branch"``).
        device: where to run; the model is moved there (in place) if it is elsewhere.
            None: the model's device.
    """
    param = next(model.parameters())
    if device is not None and torch.device(device) != param.device:
        model.to(device)
    device = next(model.parameters()).device
    if guidance is None:
        guidance = getattr(model, "default_guidance", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    labels = _labels(labels, model.config.num_classes, device)
    executor = CacheExecutor(model, labels, policy, steps=steps, sampler=sampler, guidance=guidance,
                             granularity=granularity)
    x, summary = executor.run(seed)
    return GenerateResult(to_unit(x), summary)
