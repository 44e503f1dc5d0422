"""``generate``: class-conditional sampling with a caching policy, in one call.

    from omnicache.api import generate
    from omnicache.policies import FORAConfig
    from omnicache.runtime import load_default

    result = generate(load_default(), [0, 1, 2, 3], policy=FORAConfig(interval=3), steps=50)
    result.samples            # (4, 1, 8, 8) in [0, 1]
    result.summary.compute_fraction, result.summary.wall_s
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

import torch

from .metrics import to_unit
from .runtime.engine import calibrator
from .runtime.executor import CacheExecutor, RunSummary

__all__ = ["generate", "GenerateResult", "resolve_device"]


@dataclass
class GenerateResult:
    """``samples``: ``(B, C, H, W)`` float32 images in ``[0, 1]``; ``summary``: what the run did."""

    samples: torch.Tensor
    summary: RunSummary


def _labels(labels, num_classes: int, device) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be class ids (an integer tensor), got dtype {labels.dtype}")
        labels = labels.long()
    else:
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
            raise ValueError(f"labels must be a list of int class ids or a 1-D integer tensor, got {labels!r:.60}")
        labels = [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point()
                  else v for v in labels]
        for i, v in enumerate(labels):  # 0.9 or 1.7 would silently truncate to a class
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"labels[{i}] must be an int class id, got {v!r:.60}")
        if any(not -2**63 <= int(v) < 2**63 for v in labels):
            raise ValueError(f"labels must be in [0, {num_classes}), got {max(labels, key=abs)}")
        labels = torch.tensor([int(v) for v in labels], dtype=torch.long)
    if labels.dim() != 1 or labels.numel() == 0:
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
        labels: class ids: a list of ints or a 1-D integer tensor (floats are refused, never truncated).
        policy: a policy config from :mod:`omnicache.policies`, a :class:`~omnicache.plan.CachePlan`,
            or None (uncached).
        steps: sampling steps; ``sampler``: ``"flow"``, ``"ddim"`` or a sampler object.
        guidance: classifier-free guidance scale; None uses ``model.default_guidance`` if the
            model has one (the embedded default model's ``default_guidance``), else 1.0 (no CFG).
        seed: seed of the CPU generator that draws the initial noise (same seed, same samples).
        granularity: overrides the policy's cache unit (``"step"``, ``"block"``, ``"branch"``).
        device: where to run; None: the model's device. A device other than the model's
            runs on a copy of the model moved there: the caller's model is never moved or
            changed. ``"meta"`` holds no values and is refused (``ValueError`` naming
            ``device``), as is a device this torch cannot use (``"cuda"`` without a GPU).

    Raises:
        ValueError: a bad argument, named. RuntimeError: the samples came out non-finite
            (NaN or inf; checked once, at the end of the run).
    """
    param = next(model.parameters())
    if param.device.type == "meta":
        raise ValueError("model: its weights are on the 'meta' device (no values); load the model again")
    if device is not None:
        target = resolve_device(device)
        if target != param.device:
            model = copy.deepcopy(model).to(target)
    device = next(model.parameters()).device
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r:.60}")
    if guidance is None:
        guidance = getattr(model, "default_guidance", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    labels = _labels(labels, model.config.num_classes, device)
    executor = CacheExecutor(model, labels, policy, steps=steps, sampler=sampler, guidance=guidance,
                             granularity=granularity, calibrate=calibrator(model, sampler=sampler, guidance=guidance))
    x, summary = executor.run(int(seed))
    if not bool(torch.isfinite(x).all()):  # one check per run, after the loop: no per-step sync
        raise RuntimeError(f"generate: the samples are not finite (NaN or inf) after {steps} steps under "
                           f"policy {summary.policy!r}; a plan's gamma/gamma2 too large for this model's "
                           f"features, or a guidance scale too large ({guidance:g}), can cause this")
    return GenerateResult(to_unit(x), summary)


def resolve_device(device) -> torch.device:
    """``device`` (a string such as ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a
    :class:`torch.device`) as a concrete torch device this process can allocate on:
    ``"cuda"`` resolves to ``cuda:<current>``.

    Raises:
        ValueError: not a torch device, ``meta`` (it holds no values), or a device this
            torch cannot use here (``"cuda"`` without a GPU).
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r:.60} ({e})") \
            from None
    if target.type == "meta":
        raise ValueError("device='meta' holds no values: the model cannot run there (use 'cpu' or 'cuda')")
    try:
        return torch.empty(0, device=target).device  # resolves 'cuda' to 'cuda:<current>'
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device={str(target)!r} is not available here ({str(e).splitlines()[0]})") from None
