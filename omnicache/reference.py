"""Pure-torch semantics of every omnicache op: the specification.

Every kernel (C++ CPU, CUDA, Triton) is tested against these functions, and the
``torch`` backend runs them. Arithmetic is done in ``acc`` (float32 by default, the
accumulation type of the kernels); tests call them with ``acc=torch.float64`` for an
exact reference. Dim 0 is the batch ``B``; statistics reduce over all other dims. The
token ops (``token_update_``, ``gather_tokens``) take ``[B, N, C]`` tokens and a
``[B, K]`` int64 index.

These functions do not validate their arguments; :mod:`omnicache.ops` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_residual_", "store_residual_", "trajectory_stats", "rel_l1", "token_update_",
           "gather_tokens"]


def _per_sample(t: Tensor, acc: torch.dtype) -> Tensor:
    """View ``t`` as ``[B, N]`` in the accumulation dtype."""
    return t.to(acc).reshape(t.shape[0], -1)


def _gammas(gamma: Tensor | None, batch: int, second_order: bool, acc: torch.dtype):
    """(γ1, γ2) as ``[B, 1]`` columns (or 1.0): gamma is ``[]``/``[B]`` for γ1 alone,
    ``[2]``/``[B, 2]`` for both when there is a second correction."""
    if gamma is None:
        return 1.0, 1.0
    g = gamma.to(acc)
    if second_order:
        g = g.expand(batch, 2)
        return g[:, 0:1], g[:, 1:2]
    return g.expand(batch).reshape(batch, 1), 1.0


def apply_residual_(
    hidden: Tensor,
    residual: Tensor,
    correction: Tensor | None = None,
    gamma: Tensor | None = None,
    correction2: Tensor | None = None,
    gate: Tensor | None = None,
    *,
    acc: torch.dtype = torch.float32,
) -> None:
    """``hidden += gate * (residual + γ1·correction + γ2·correction2)``.

    Each absent term drops out (gate and γ default to 1). ``gate`` is ``[B, D]`` with D
    the last dim of ``hidden`` (broadcast over the middle dims). Evaluated left to right:
    ``s = residual; s += γ1·c1; s += γ2·c2; s *= gate; hidden += s``.
    """
    if hidden.numel() == 0:
        return
    batch = hidden.shape[0]
    g1, g2 = _gammas(gamma, batch, correction2 is not None, acc)
    s = residual.to(acc)
    if correction is not None:
        s = s + _per_sample(correction, acc).mul(g1).reshape(hidden.shape)
    if correction2 is not None:
        s = s + _per_sample(correction2, acc).mul(g2).reshape(hidden.shape)
    if gate is not None:
        s = s * gate.to(acc).reshape(batch, *[1] * (hidden.dim() - 2), hidden.shape[-1])
    hidden.copy_(hidden.to(acc) + s)


def store_residual_(
    cache: Tensor,
    delta: Tensor | None,
    out: Tensor,
    inp: Tensor | None,
    delta2: Tensor | None = None,
    *,
    acc: torch.dtype = torch.float32,
) -> Tensor:
    """``new = out - inp`` (``new = out`` when ``inp`` is None); ``d1 = new - cache_old``;
    ``delta2 = d1 - delta_old`` (if given); ``delta = d1`` (if given); ``cache = new``.

    Returns ``[B, 4]`` (float32, or ``acc`` if wider): ``Σ|new-old|, Σ|old|,
    Σ(new-old)², Σold²`` per sample, with ``new`` and ``d1`` unrounded.
    """
    batch = cache.shape[0]
    out_dtype = torch.promote_types(acc, torch.float32)
    if cache.numel() == 0:
        return torch.zeros(batch, 4, dtype=out_dtype, device=cache.device)
    old = _per_sample(cache, acc)
    new = _per_sample(out, acc)
    if inp is not None:
        new = new - _per_sample(inp, acc)
    diff = new - old
    stats = torch.stack(
        [diff.abs().sum(1), old.abs().sum(1), (diff * diff).sum(1), (old * old).sum(1)], dim=1
    )
    if delta2 is not None:
        delta2.copy_((diff - _per_sample(delta, acc)).reshape(delta2.shape))
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


# ------------------------------------------------------------------ token ops (ToCa)
# An index outside [0, N) is refused on the host (CPU tensors: omnicache.ops raises). On a
# GPU nothing is checked on the host (that would synchronise); what follows is then the
# specification every backend implements on the device: a gathered row with such an
# index is NaN, and token_update_ writes no element of cache and returns out all NaN.
def _token_owners(index: Tensor, n: int) -> Tensor:
    """``[B, N]`` int64: for each token the largest ``k`` with ``index[b, k] == n`` (the
    last occurrence wins), or -1 when the token is not selected."""
    batch, k = index.shape
    owner = torch.full((batch, n), -1, dtype=torch.int64, device=index.device)
    if k == 0 or n == 0:
        return owner
    inside = (index >= 0) & (index < n)
    ks = torch.where(inside, torch.arange(k, device=index.device).expand(batch, k), -1)
    return owner.scatter_reduce_(1, index.clamp(0, n - 1), ks, reduce="amax")


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, k], :]`` for ``[B, N, C]`` x and an in-range ``[B, K]`` index."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def token_update_(cache: Tensor, index: Tensor, values: Tensor, hidden: Tensor, *,
                  acc: torch.dtype = torch.float32) -> Tensor:
    """ToCa's token-wise update of a unit's cached residual; returns the unit's output.

    ``hidden``, ``cache``: ``[B, N, C]``; ``index``: ``[B, K]`` int64; ``values``:
    ``[B, K, C]``, the unit's output for the tokens ``index`` selects. For a selected
    token (``n = index[b, k]``, the largest such ``k`` when ``n`` repeats)::

        cache[b, n] = values[b, k] - hidden[b, n]     # its new residual
        out[b, n] = values[b, k]                      # exactly

    and for every other token ``out[b, n] = hidden[b, n] + cache[b, n]`` (reuse). One
    rounding to the dtype per written element.
    """
    batch, n, c = hidden.shape
    if hidden.numel() == 0:
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)
    owner = _token_owners(index, n)
    selected = (owner >= 0).unsqueeze(-1)
    h, old = hidden.to(acc), cache.to(acc)
    v = _rows(values.to(acc), owner.clamp_min(0)) if index.shape[1] else h
    ok = ((index >= 0) & (index < n)).all()  # a device tensor: nothing syncs
    out = torch.where(ok & selected, v, torch.where(ok, h + old, float("nan")))
    cache.copy_(torch.where(ok & selected, v - h, old))
    return out.to(hidden.dtype)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``out[b, k] = x[b, index[b, k]]``: ``[B, N, C]``, ``[B, K]`` -> ``[B, K, C]``, rows
    copied bit for bit."""
    batch, n, c = x.shape
    if n == 0:
        return torch.full((batch, index.shape[1], c), float("nan"), dtype=x.dtype, device=x.device)
    inside = ((index >= 0) & (index < n)).unsqueeze(-1)
    return torch.where(inside, _rows(x, index.clamp(0, n - 1)), float("nan"))
