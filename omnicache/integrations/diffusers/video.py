"""The token grid of video transformers, for stage-aware filtering
(:func:`omnicache.ops.filter_delta` over ``frames x rows x columns`` tokens)."""

from __future__ import annotations

__all__ = ["video_grid", "grid_layout"]


def video_grid(transformer):
    """The (frames, rows, columns) token grid of a video transformer whose blocks lay out
    ``(batch x frames, rows x columns)`` / ``(batch x rows x columns, frames)`` (Latte), for
    stage-aware filtering; None for the others."""
    if type(transformer).__name__ != "LatteTransformer3DModel":
        return None
    side = transformer.config.sample_size // transformer.config.patch_size
    return (transformer.config.video_length, side, side)


def grid_layout(grid, temporal: bool):
    """``(to_grid, from_grid)`` between a block's residual layout and ``[B, F*H*W, D]`` for the
    token ``grid`` (F, H, W): a spatial block's is ``(B*F, H*W, D)`` (a reshape), a temporal
    block's (``temporal``) ``(B*H*W, F, D)`` (a transpose)."""
    f, hh, ww = grid
    if not temporal:
        return (lambda x: x.reshape(-1, f * hh * ww, x.shape[-1]),
                lambda y: y.reshape(-1, hh * ww, y.shape[-1]))
    return (lambda x: x.reshape(-1, hh * ww, f, x.shape[-1]).transpose(1, 2).reshape(-1, f * hh * ww, x.shape[-1]),
            lambda y: y.reshape(-1, f, hh * ww, y.shape[-1]).transpose(1, 2).reshape(-1, f, y.shape[-1]))
