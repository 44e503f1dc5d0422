"""Stage-aware filtering of a cache drift over the token grid (OmniCache's noise filter).

:func:`filter_delta` keeps the low frequencies of ``delta`` early in sampling and the high
frequencies late (an ``rfftn`` mask over the token grid: ``(H, W)`` for images,
``(F, H, W)`` frames × rows × columns for video). It lives beneath the cache core, which
applies it once per full step when a plan asks for it (``CachePlan.meta["filter"]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["filter_delta", "grid_layout"]


def _stage_mask(grid: tuple, progress: float, low_cutoff: float, high_cutoff: float,
                split: float, device) -> Tensor:
    """Bool keep-mask on the ``rfftn`` grid ``[..., W // 2 + 1]`` (see :func:`filter_delta`)."""
    *lead, w = grid
    axes = [torch.fft.fftfreq(n, device=device, dtype=torch.float64).abs() for n in lead]
    axes.append(torch.fft.rfftfreq(w, device=device, dtype=torch.float64).abs())
    rho = torch.zeros((), dtype=torch.float64, device=device)
    for k, f in enumerate(axes):  # Chebyshev radius over every axis, Nyquist = 1
        rho = torch.maximum(rho, 2.0 * f.reshape([-1 if j == k else 1 for j in range(len(axes))]))
    if progress < split:
        cut = low_cutoff + (1.0 - low_cutoff) * progress / split
        return rho <= cut + 1e-12
    cut = high_cutoff * (progress - split) / (1.0 - split)
    return rho >= cut - 1e-12 if cut > 0 else torch.ones_like(rho, dtype=torch.bool)


def filter_delta(delta: Tensor, grid: tuple, progress: float, *, enabled: bool = True,
                 low_cutoff: float = 0.25, high_cutoff: float = 0.25, split: float = 0.5) -> Tensor:
    """Stage-aware filtering of the drift ``delta = R_j - R_prev`` over the token grid.

    Tokens are laid out row-major on an ``H × W`` grid (token ``h·W + w``), or for video
    on an ``F × H × W`` grid (token ``(f·H + h)·W + w``). Each channel is transformed with
    ``torch.fft.rfftn`` over the grid's axes, multiplied by a 0/1 mask on the normalised
    Chebyshev frequency radius ``ρ = 2 · max(|f_t|, |f_y|, |f_x|)`` (``f`` in cycles per
    token along each axis, so ``ρ = 0`` is the constant and ``ρ = 1`` the Nyquist
    frequency; a video's frame axis counts as one more axis), and transformed back:

    - early, ``progress < split``: **low-pass**, keep ``ρ <= c_lo``,
      ``c_lo = low_cutoff + (1 - low_cutoff) · progress / split`` (opens to all-pass at
      ``split``);
    - late, ``progress >= split``: **high-pass**, keep ``ρ >= c_hi``,
      ``c_hi = high_cutoff · (progress - split) / (1 - split)`` (all-pass at ``split``,
      ``ρ < high_cutoff`` removed at ``progress = 1``; any ``c_hi > 0`` removes the
      constant).

    The mask is 0/1 and symmetric under ``f → -f``, so the output is real and its
    energy never exceeds the input's (Parseval). Computed in float32, returned in
    ``delta``'s dtype. ``progress`` is the sampling progress of the full step that
    produced ``delta``, e.g. ``j / (steps - 1)``.

    Parameters
    ----------
    delta
        ``[B, T, D]`` with ``T`` the grid's token count.
    grid
        ``(H, W)`` or ``(F, H, W)``.
    progress
        In ``[0, 1]``: 0 the first step, 1 the last.
    enabled
        ``False`` returns ``delta`` itself, unchanged.
    low_cutoff, high_cutoff
        In ``[0, 1]``.
    split
        In ``(0, 1)``: where filtering switches from low-pass to high-pass.

    Returns
    -------
    Tensor
        A new tensor, same shape, dtype and device as ``delta`` (or ``delta`` when
        disabled).
    """
    if not enabled:
        return delta
    if delta.dim() != 3:
        raise ValueError(f"delta must be [B, T, D], got shape {list(delta.shape)}")
    if (not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3)
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
        raise ValueError(f"grid must be (H, W) or (F, H, W) with positive ints, got {grid!r}")
    tokens = 1
    for g in grid:
        tokens *= g
    if tokens != delta.shape[1]:
        raise ValueError(f"grid {tuple(grid)} has {tokens} tokens but delta has T = {delta.shape[1]}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress!r}")
    for name, v in (("low_cutoff", low_cutoff), ("high_cutoff", high_cutoff)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    if not 0.0 < split < 1.0:
        raise ValueError(f"split must be in (0, 1), got {split!r}")
    grid = tuple(grid)
    mask = _stage_mask(grid, float(progress), low_cutoff, high_cutoff, split, delta.device)
    b, _, d = delta.shape
    dims = tuple(range(1, len(grid) + 1))
    x = delta.float().reshape(b, *grid, d)
    spec = torch.fft.rfftn(x, dim=dims)  # [B, ..., W//2+1, D]
    spec = spec * mask[None, ..., None]
    y = torch.fft.irfftn(spec, s=grid, dim=dims)
    return y.reshape(delta.shape).to(delta.dtype)


def grid_layout(grid: tuple, temporal: bool):
    """``(to_grid, from_grid)`` between a video block's residual layout and ``[B, F*H*W, D]``
    for the token ``grid`` (F, H, W): a spatial block's is ``(B*F, H*W, D)`` (a reshape), a
    temporal block's (``temporal``) ``(B*H*W, F, D)`` (a transpose)."""
    f, hh, ww = grid
    if not temporal:
        return (lambda x: x.reshape(-1, f * hh * ww, x.shape[-1]),
                lambda y: y.reshape(-1, hh * ww, y.shape[-1]))
    return (lambda x: x.reshape(-1, hh * ww, f, x.shape[-1]).transpose(1, 2).reshape(-1, f * hh * ww, x.shape[-1]),
            lambda y: y.reshape(-1, f, hh * ww, y.shape[-1]).transpose(1, 2).reshape(-1, f, y.shape[-1]))
