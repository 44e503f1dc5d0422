"""Learning-to-Cache export: the router's β thresholded into a branch-level CachePlan.

Refresh steps compute everything; at cache steps a branch computes where
``β > threshold``. With ``compute_fraction`` the threshold is calibrated instead:
cache-step branches are ranked by β and the cut whose plan's FLOP fraction is nearest
the target is taken. The plan's ``meta`` reports the share of branches removed in cache
steps and overall and the threshold.
"""

from __future__ import annotations

import torch

from ...cache import Costs
from ...plan import CachePlan

__all__ = ["export_plan", "removed_shares", "branch_costs", "costs_dict"]


def branch_costs(flops, blocks: int) -> tuple[float, list, list, float]:
    """``(fixed, attn[b], mlp[b], total)`` FLOPs of a step: what every step spends
    (``fixed``: outside the blocks, and every block's own code: modulation, gates), each
    block's attention and MLP branch, and an uncached step. ``flops`` is an engine's
    :class:`omnicache.cache.Costs`, or its dict form (:func:`costs_dict`, what a plan's
    ``meta["flops_per_step"]`` holds), or a model's ``flops_per_sample()`` (uniform blocks)."""
    if isinstance(flops, Costs):
        return (float(flops.outside + sum(p[-1] for p in flops.parts)), [float(p[0]) for p in flops.parts],
                [float(p[1]) for p in flops.parts], float(flops.uncached))
    attn, mlp = flops["block_attn"], flops["block_mlp"]
    attn = [float(a) for a in attn] if isinstance(attn, (list, tuple)) else [float(attn)] * blocks
    mlp = [float(m) for m in mlp] if isinstance(mlp, (list, tuple)) else [float(mlp)] * blocks
    fixed = flops["fixed"] if "fixed" in flops else \
        flops["embed"] + flops["final"] + blocks * flops["block_modulation"]
    return float(fixed), attn, mlp, float(flops["total"])


def costs_dict(costs: Costs) -> dict:
    """An engine's costs in the form a plan records (``meta["flops_per_step"]``): ``fixed``,
    per-block ``block_attn`` / ``block_mlp``, ``total``."""
    fixed, attn, mlp, total = branch_costs(costs, len(costs.parts))
    return {"fixed": fixed, "block_attn": attn, "block_mlp": mlp, "total": total}


def _spent(compute: torch.Tensor, flops: dict):
    """FLOPs per sample of a branch-granularity ``compute`` (steps, blocks, 2) bool tensor."""
    steps, blocks = compute.shape[:2]
    fixed, attn, mlp, _ = branch_costs(flops, blocks)
    counts = compute.sum(0)  # (blocks, 2)
    return steps * fixed + sum(attn[b] * int(counts[b, 0]) + mlp[b] * int(counts[b, 1]) for b in range(blocks))


def removed_shares(compute: torch.Tensor, mask: list[bool]) -> tuple[float, float]:
    """(share of branches removed in cache steps, share removed overall)."""
    cache = ~torch.tensor(mask, dtype=torch.bool)
    removed = ~compute
    in_cache = removed[cache].float().mean().item() if bool(cache.any()) else 0.0
    return in_cache, removed.float().mean().item()


def export_plan(beta: torch.Tensor, mask: list[bool], flops: dict, *, threshold: float = 0.5,
                compute_fraction: float | None = None, meta: dict | None = None) -> CachePlan:
    """Threshold ``beta`` (steps, blocks, 2) into a branch-level plan (see the module docstring)."""
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0.0 < threshold < 1.0):
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
    if compute_fraction is not None and not (isinstance(compute_fraction, (int, float))
                                             and not isinstance(compute_fraction, bool)
                                             and 0.0 < compute_fraction <= 1.0):
        raise ValueError(f"compute_fraction must be in (0, 1] or None, got {compute_fraction!r}")
    steps, blocks = beta.shape[:2]
    if len(mask) != steps or not mask[0]:
        raise ValueError(f"refresh mask must have {steps} entries and start with a full step")
    beta = beta.detach().float().cpu()
    full = torch.tensor(mask, dtype=torch.bool)[:, None, None].expand_as(beta)
    if compute_fraction is None:
        compute = full | (beta > threshold)
        used = float(threshold)
    else:
        # rank the cache-step branches by β (ties: step, block, branch order) and take the cut
        # whose plan spends the fraction nearest the target (ties: the smaller fraction); each
        # branch kept adds its own FLOPs, so the fractions of all cuts are a running sum
        cand = sorted((-float(beta[i, b, k]), i, b, k) for i in range(steps) if not mask[i]
                      for b in range(blocks) for k in (0, 1))
        _, attn, mlp, total = branch_costs(flops, blocks)
        unit, spent = steps * total, _spent(full, flops)
        n, best = 0, abs(spent / unit - compute_fraction)
        for m, (_, _, b, k) in enumerate(cand, 1):
            spent += attn[b] if k == 0 else mlp[b]
            if abs(spent / unit - compute_fraction) < best - 1e-12:
                n, best = m, abs(spent / unit - compute_fraction)
        compute = full.clone()
        for _, i, b, k in cand[:n]:
            compute[i, b, k] = True
        lo = -cand[n][0] if n < len(cand) else 0.0  # the largest β left out
        hi = -cand[n - 1][0] if n > 0 else 1.0  # the smallest β kept
        used = (lo + hi) / 2
    in_cache, overall = removed_shares(compute, mask)
    total = branch_costs(flops, blocks)[3]
    info = dict(policy="L2C", threshold=round(used, 6), removed_in_cache_steps=round(in_cache, 4),
                flops_fraction=round(_spent(compute, flops) / (steps * total), 6),
                removed_overall=round(overall, 4), refresh=[i for i, f in enumerate(mask) if f])
    if compute_fraction is not None:
        info["target_compute_fraction"] = compute_fraction
    info.update(meta or {})
    return CachePlan(steps, blocks, "branch", compute, meta=info)
