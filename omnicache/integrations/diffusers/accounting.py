"""FLOP accounting and the run summary of a diffusers :class:`~.runtime.Runtime`.

Every ``nn.Linear`` of the transformer counts ``2 · in · out`` per row it processes, per
block and part (attention branch, MLP branch, the rest; outside the blocks), in eager
calls. A computed block's (or branch's) count is its cost; calls traced by
``torch.compile`` or replayed in CUDA graphs count what they ran at those costs.
``compute_fraction`` = FLOPs spent ÷ FLOPs computing every block would spend.
"""

from __future__ import annotations

import torch

from ...cache import REUSE, RunSummary

__all__ = ["context_flops", "plan_fraction", "summary"]


def context_flops(rt, ctx):
    """``(spent, uncached)`` linear FLOPs of a context's calls."""
    spent = uncached = 0.0
    cost = [c if c is not None else 0 for c in rt.block_cost]
    part = [[c if c is not None else 0 for c in p] for p in rt.part_cost]
    for n, (computed, counts) in enumerate(zip(ctx.trace, ctx.flops)):
        eager = any(counts) if ctx.branch_trace else any(counts[b] > 0 for b, c in enumerate(computed) if c)
        if eager:
            s = sum(counts[:-1])
        elif ctx.branch_trace:  # traced call of a branch plan: the branches that ran, and the rest
            s = sum(p[-1] + sum(r * c for r, c in zip(ran, p)) for p, ran in zip(part, ctx.branch_trace[n]))
        else:
            s = sum(w * c for w, c in zip(cost, computed))
        outside = counts[-1] if eager or rt.outside_cost is None else rt.outside_cost
        spent += outside + s
        uncached += outside + sum(cost)
    return spent, uncached


def plan_fraction(rt) -> float | None:
    """The static plan's compute fraction from the linear FLOPs measured per block and branch
    (each branch, the rest; outside the blocks): what the plan should spend ÷ uncached, for
    comparing with the summary's counted ``compute_fraction``. None before a counted call
    measured every part (or for dynamic policies)."""
    if rt.kind != "static" or rt.outside_cost is None or \
            any(c is None for p in rt.part_cost for c in p):
        return None
    spent = uncached = 0.0
    for acts in rt.actions:
        spent += rt.outside_cost
        uncached += rt.outside_cost + sum(map(sum, rt.part_cost))
        for b, p in enumerate(rt.part_cost):
            if rt.granularity == "branch":
                ran = [acts[rt.nb * b + k] != REUSE for k in range(rt.nb)] + [True]
            else:
                ran = (acts[rt.unit_of[b]] != REUSE,) * (rt.nb + 1)
            spent += sum(c for c, r in zip(p, ran) if r)
    return spent / uncached if uncached else None


def summary(rt) -> RunSummary:
    contexts, spent, uncached, decisions = {}, 0.0, 0.0, []
    calls = computed = 0
    sub_batch = 0.0 if rt.device_mode else None  # mode="device": what sub-batches would spend
    for name, ctx in rt.contexts.items():
        if not ctx.trace:  # a context no call ran in (the one enable() starts in, with a pipeline)
            continue
        # mode="device": trace, stats and FLOPs from the device history (the one read-back)
        device_flops = rt._device_resolve(ctx) if rt.device_mode else None
        steps = []
        for st in ctx.stats:
            d = {k: v for k, v in st.items() if k != "residual"}
            rel = [s[:, 0].sum() / s[:, 1].sum() for s in st["residual"] if s is not None]
            d["residual_rel_l1"] = torch.stack(rel).mean().item() if rel else None
            steps.append(d)
        s, u = context_flops(rt, ctx) if device_flops is None else (device_flops[0], device_flops[2])
        if device_flops is not None:
            sub_batch += device_flops[1]
        n_comp, n_all = sum(map(sum, ctx.trace)), len(ctx.trace) * rt.n
        calls, computed = calls + n_all, computed + n_comp
        spent, uncached = spent + s, uncached + u
        contexts[name] = {"trace": ctx.trace, "compute_fraction": s / u if u else None,
                          "block_fraction": n_comp / n_all if n_all else None, "stats": steps,
                          "flops": s, "flops_uncached": u}
        if rt.kind == "static":
            contexts[name]["plan_compute_fraction"] = plan_fraction(rt)
        if ctx.branch_trace:
            contexts[name]["branch_trace"] = ctx.branch_trace
            decisions.append(torch.tensor(ctx.branch_trace, dtype=torch.float32))
        elif ctx.trace:
            decisions.append(torch.tensor(ctx.trace, dtype=torch.float32).unsqueeze(-1).expand(-1, -1, 2))
    if uncached == 0.0 and calls:  # no eager call counted a block: fall back to block calls
        spent, uncached = float(computed), float(calls)
    cache_bytes = sum(cu.nbytes for ctx in rt.contexts.values() for unit in ctx.units for cu in unit.values())
    cache_bytes += sum(ctx.ref.nbytes for ctx in rt.contexts.values() if ctx.ref is not None)
    cache_bytes += sum(ctx.device.nbytes for ctx in rt.contexts.values() if ctx.device is not None)
    dec = torch.stack(decisions).mean(0) if decisions and len({d.shape for d in decisions}) == 1 else \
        torch.zeros(0, rt.n, 2)
    return RunSummary(rt.policy_name, rt.granularity, dec.clone(),
                      spent, uncached, 0.0, cache_bytes, 0, 1, steps=rt.steps, blocks=rt.n,
                      kind=rt.kind, contexts=contexts, flops_sub_batch=sub_batch)
