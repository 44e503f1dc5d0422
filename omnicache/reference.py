"""Pure-torch semantics of every omnicache op: the specification.

Every kernel (C++ CPU, CUDA, Triton) is tested against these functions, and the
``torch`` backend runs them. Arithmetic is done in ``acc`` (float32 by default, the
accumulation type of the kernels); tests call them with ``acc=torch.float64`` for an
exact reference. Dim 0 is the batch ``B``; statistics reduce over all other dims.

These functions do not validate their arguments; :mod:`omnicache.ops` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_residual_", "store_residual_", "trajectory_stats", "rel_l1"]


def _per_sample(t: Tensor, acc: torch.dtype) -> Tensor:
    """View ``t`` as ``[B, N]`` in the accumulation dtype."""
    return t.to(acc).reshape(t.shape[0], -1)


def _gamma_column(gamma: Tensor | None, batch: int, acc: torch.dtype) -> Tensor | float:
    if gamma is None:
        return 1.0
    return gamma.to(acc).expand(batch).reshape(batch, 1)


def apply_residual_(
    hidden: Tensor,
    residual: Tensor,
    correction: Tensor | None = None,
    gamma: Tensor | None = None,
    *,
    acc: torch.dtype = torch.float32,
) -> None:
    """``hidden[b] += residual[b] + gamma[b] * correction[b]`` (gamma 1 if None)."""
    if hidden.numel() == 0:
        return
    batch = hidden.shape[0]
    h = _per_sample(hidden, acc) + _per_sample(residual, acc)
    if correction is not None:
        h = h + _gamma_column(gamma, batch, acc) * _per_sample(correction, acc)
    hidden.copy_(h.reshape(hidden.shape))


def store_residual_(
    cache: Tensor,
    delta: Tensor | None,
    out: Tensor,
    inp: Tensor,
    *,
    acc: torch.dtype = torch.float32,
) -> Tensor:
    """Store ``new = out - inp`` into ``cache``; optionally ``delta = new - cache_old``.

    Returns ``[B, 4]`` (float32, or ``acc`` if wider): ``Σ|new-old|, Σ|old|,
    Σ(new-old)², Σold²`` per sample, with ``new`` the unrounded difference.
    """
    batch = cache.shape[0]
    out_dtype = torch.promote_types(acc, torch.float32)
    if cache.numel() == 0:
        return torch.zeros(batch, 4, dtype=out_dtype, device=cache.device)
    old = _per_sample(cache, acc)
    new = _per_sample(out, acc) - _per_sample(inp, acc)
    diff = new - old
    stats = torch.stack(
        [diff.abs().sum(1), old.abs().sum(1), (diff * diff).sum(1), (old * old).sum(1)], dim=1
    )
    if delta is not None:
        delta.copy_(diff.reshape(delta.shape))
    cache.copy_(new.reshape(cache.shape))
    return stats.to(out_dtype)


def trajectory_stats(
    x_next: Tensor, x: Tensor, x_prev: Tensor, *, acc: torch.dtype = torch.float32
) -> Tensor:
    """``v1 = x_next - x``, ``v0 = x - x_prev``; returns ``[B, 3]``: ‖v1‖², ‖v0‖², ⟨v1, v0⟩."""
    batch = x.shape[0]
    out_dtype = torch.promote_types(acc, torch.float32)
    if x.numel() == 0:
        return torch.zeros(batch, 3, dtype=out_dtype, device=x.device)
    xc = _per_sample(x, acc)
    v1 = _per_sample(x_next, acc) - xc
    v0 = xc - _per_sample(x_prev, acc)
    stats = torch.stack([(v1 * v1).sum(1), (v0 * v0).sum(1), (v1 * v0).sum(1)], dim=1)
    return stats.to(out_dtype)


def rel_l1(a: Tensor, b: Tensor, *, acc: torch.dtype = torch.float32) -> Tensor:
    """Returns ``[B, 2]``: ``Σ|a - b|``, ``Σ|b|`` per sample."""
    batch = a.shape[0]
    out_dtype = torch.promote_types(acc, torch.float32)
    if a.numel() == 0:
        return torch.zeros(batch, 2, dtype=out_dtype, device=a.device)
    bb = _per_sample(b, acc)
    stats = torch.stack([(_per_sample(a, acc) - bb).abs().sum(1), bb.abs().sum(1)], dim=1)
    return stats.to(out_dtype)
