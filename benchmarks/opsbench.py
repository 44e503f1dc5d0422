"""What the op benchmarks time: each op's fused call, the eager torch composition a
user would write, and torch.compile of the reference; plus the bytes each must move.

Shared by the pytest-benchmark suite (test_bench_ops.py) and the standalone script
(bench_ops.py), so both time exactly the same code.
"""

from __future__ import annotations

import functools

import torch

import omnicache.ops as ops
from omnicache import reference

OPS = ops.OPS
# Further calls of the same ops with the newer arguments (second order, gate, no inp).
EXTRA_CASES = ("apply_residual_order2_gate", "store_residual_order2")
CASES = OPS + EXTRA_CASES
# Minimum bytes each case must move, in units of N·s (N elements of s bytes):
# order2_gate reads hidden, residual, D1, D2 and writes hidden (the [B, D] gate is
# negligible); order2 reads out, inp, cache, delta and writes cache, delta, delta2.
# The token ops (ToCa, K = 15% of the N tokens recomputed): token_update_ reads hidden and
# cache and writes out for the reused 85%, reads values and hidden and writes cache and
# out for the 15% (3 x 0.85 + 4 x 0.15); gather_tokens reads and writes 15%.
TRAFFIC = {"apply_residual_": 4, "store_residual_": 5, "trajectory_stats": 3, "rel_l1": 2,
           "apply_residual_order2_gate": 5, "store_residual_order2": 7,
           "token_update_": 3.15, "gather_tokens": 0.3}
GATE_DIM = 1024  # D of the gated case: hidden is [B, numel / (B * D), D]
TOKEN_DIM = 128  # C of the token cases: cache is [B, numel / (B * C), C]
RECOMPUTED = 0.15  # ToCa's K / N (R = 85% of the tokens reused)


def op_of(case: str) -> str:
    """The omnicache op a benchmark case calls."""
    return next(op for op in OPS if case.startswith(op))


def make_inputs(op: str, batch: int, numel: int, dtype, device, seed: int = 0) -> tuple:
    """Random inputs for one call of case ``op``; ``numel`` elements per tensor."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, numel // batch)

    def rand(s=shape):
        return torch.randn(s, generator=g).to(device=device, dtype=dtype)

    if op == "apply_residual_":
        return rand(), rand(), rand(), torch.rand(batch, generator=g).to(device)
    if op == "apply_residual_order2_gate":
        gshape = (batch, numel // (batch * GATE_DIM), GATE_DIM)
        return (rand(gshape), rand(gshape), rand(gshape), torch.rand(batch, 2, generator=g).to(device),
                rand(gshape), rand((batch, GATE_DIM)))
    if op == "store_residual_":
        return rand(), torch.empty(shape, device=device, dtype=dtype), rand(), rand()
    if op == "store_residual_order2":
        return rand(), rand(), rand(), rand(), torch.empty(shape, device=device, dtype=dtype)
    if op == "trajectory_stats":
        return rand(), rand(), rand()
    if op in ("token_update_", "gather_tokens"):
        n = numel // (batch * TOKEN_DIM)
        k = round(RECOMPUTED * n)
        # Distinct tokens in score order, as a top-k gives them: no locality.
        index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)]).to(device)
        tokens = (batch, n, TOKEN_DIM)
        if op == "gather_tokens":
            return rand(tokens), index
        return rand(tokens), index, rand((batch, k, TOKEN_DIM)), rand(tokens)
    return rand(), rand()


# ---------------------------------------------------------------- eager compositions
def eager_apply_residual_(hidden, residual, correction, gamma):
    hidden += residual + gamma.view(-1, 1).to(hidden.dtype) * correction


def eager_apply_residual_order2_gate(hidden, residual, c1, gamma, c2, gate):
    g = gamma.to(hidden.dtype)
    hidden += gate.unsqueeze(1) * (residual + g[:, 0, None, None] * c1 + g[:, 1, None, None] * c2)


def eager_store_residual_order2(cache, delta, out, inp, delta2):
    new = out - inp
    d1 = new - cache
    torch.sub(d1, delta, out=delta2)
    f32 = torch.float32
    stats = torch.stack([d1.abs().sum(1, dtype=f32), cache.abs().sum(1, dtype=f32),
                         d1.square().sum(1, dtype=f32), cache.square().sum(1, dtype=f32)], 1)
    delta.copy_(d1)
    cache.copy_(new)
    return stats


def eager_store_residual_(cache, delta, out, inp):
    new = out - inp
    torch.sub(new, cache, out=delta)
    f32 = torch.float32
    stats = torch.stack([delta.abs().sum(1, dtype=f32), cache.abs().sum(1, dtype=f32),
                         delta.square().sum(1, dtype=f32), cache.square().sum(1, dtype=f32)], 1)
    cache.copy_(new)
    return stats


def eager_trajectory_stats(x_next, x, x_prev):
    v1, v0 = x_next - x, x - x_prev
    f32 = torch.float32
    return torch.stack([v1.square().sum(1, dtype=f32), v0.square().sum(1, dtype=f32),
                        (v1 * v0).sum(1, dtype=f32)], 1)


def eager_rel_l1(a, b):
    f32 = torch.float32
    return torch.stack([(a - b).abs().sum(1, dtype=f32), b.abs().sum(1, dtype=f32)], 1)


def eager_token_update_(cache, index, values, hidden):
    # gather, subtract, scatter_, add: the selected tokens' out is hidden + (values -
    # hidden), within a rounding of values (the op returns values exactly).
    idx = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    cache.scatter_(1, idx, values - hidden.gather(1, idx))
    return hidden + cache


def eager_gather_tokens(x, index):
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


EAGER = {
    "apply_residual_": eager_apply_residual_,
    "apply_residual_order2_gate": eager_apply_residual_order2_gate,
    "store_residual_": eager_store_residual_,
    "store_residual_order2": eager_store_residual_order2,
    "trajectory_stats": eager_trajectory_stats,
    "rel_l1": eager_rel_l1,
    "token_update_": eager_token_update_,
    "gather_tokens": eager_gather_tokens,
}


@functools.cache
def compiled(op: str):
    """torch.compile of the reference (inductor's best fusion of the same math)."""
    return torch.compile(getattr(reference, op_of(op)), fullgraph=True, dynamic=False)


def fused(op: str, backend: str):
    """The op (or case) through omnicache.ops on one backend."""
    fn = getattr(ops, op_of(op))

    def call(*args):
        previous = ops.get_backend()
        ops.set_backend(backend)
        try:
            return fn(*args)
        finally:
            ops.set_backend(previous)

    return call


def variants(device: torch.device) -> list[str]:
    """Backends worth timing on ``device``, plus the eager and compile baselines."""
    if device.type == "cuda":
        names = [b for b in ("cuda", "triton") if b in ops.available_backends()]
    else:
        names = ["cpu"]
    return names + ["eager", "compile"]


def callable_for(op: str, variant: str):
    if variant == "eager":
        return EAGER[op]
    if variant == "compile":
        return compiled(op)
    return fused(op, variant)


def bytes_moved(op: str, numel: int, dtype) -> int:
    """Fewest bytes case ``op`` must move for ``numel`` elements per tensor."""
    return round(TRAFFIC[op] * numel * torch.empty((), dtype=dtype).element_size())
