"""Triton kernel for ``trajectory_stats``: per-sample ‖v1‖², ‖v0‖², ⟨v1, v0⟩ with
``v1 = x_next - x`` and ``v0 = x - x_prev``.

Semantics: :func:`omnicache.reference.trajectory_stats`. Two-stage deterministic
reduction: stage 1 below, stage 2 :func:`.utils.sum_partials`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (REDUCE_BLOCK, REDUCE_CHUNK, REDUCE_WARPS, batch_and_n, check_blocking,
                    contiguous, device_guard, new_partials, sum_partials)


@triton.jit
def _trajectory_stats_partials_kernel(
    x_next_ptr,  # [B, N] contiguous, float32/float16/bfloat16
    x_ptr,  # [B, N] contiguous, same dtype
    x_prev_ptr,  # [B, N] contiguous, same dtype
    part_ptr,  # float32 [B, n_chunks, 3]
    N,
    n_chunks,
    CHUNK: tl.constexpr,  # elements of one sample summed by one program (fixed)
    BLOCK: tl.constexpr,  # elements loaded per step; CHUNK % BLOCK == 0
):
    """Stage 1: for sample ``s`` and chunk ``c`` (program ``s * n_chunks + c``), with
    ``i`` over ``[c*CHUNK, min((c+1)*CHUNK, N))`` and all arithmetic in float32::

        v1 = x_next[s, i] - x[s, i]
        v0 = x[s, i] - x_prev[s, i]
        part[s, c, 0] = Σ_i v1²
        part[s, c, 1] = Σ_i v0²
        part[s, c, 2] = Σ_i v1·v0

    Terms are added ``BLOCK`` at a time into per-lane accumulators, then ``tl.sum``:
    a fixed order.
    """
    pid = tl.program_id(0).to(tl.int64)
    s = pid // n_chunks
    c = pid - s * n_chunks
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, N)
    row = s * N
    acc_11 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_00 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_10 = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(start, end, BLOCK):
        i = row + i0 + tl.arange(0, BLOCK)
        mask = i < row + end
        xn = tl.load(x_next_ptr + i, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(x_prev_ptr + i, mask=mask, other=0.0).to(tl.float32)
        v1 = xn - x
        v0 = x - xp
        acc_11 += v1 * v1
        acc_00 += v0 * v0
        acc_10 += v1 * v0
    out = part_ptr + pid * 3
    tl.store(out, tl.sum(acc_11, axis=0))
    tl.store(out + 1, tl.sum(acc_00, axis=0))
    tl.store(out + 2, tl.sum(acc_10, axis=0))


def trajectory_stats(
    x_next: Tensor, x: Tensor, x_prev: Tensor, *, block: int = REDUCE_BLOCK,
    chunk: int = REDUCE_CHUNK,
) -> Tensor:
    """Per-sample trajectory statistics: returns ``[B, 3]`` float32, ‖v1‖², ‖v0‖², ⟨v1, v0⟩
    with ``v1 = x_next - x``, ``v0 = x - x_prev`` (sums over all but dim 0).

    Parameters
    ----------
    x_next, x, x_prev : Tensor
        Same shape ``[B, ...]``, dtype (float32/float16/bfloat16) and device; may be
        strided (copied to contiguous). Validated by the caller.
    block, chunk : int
        Tuning only (tests lower them); defaults are fixed so results are bitwise
        reproducible.
    """
    check_blocking(block, chunk)
    batch, n = batch_and_n(x)
    if x.numel() == 0:
        return torch.zeros(batch, 3, dtype=torch.float32, device=x.device)
    x_next, x, x_prev = contiguous(x_next, x, x_prev)
    partials = new_partials(batch, n, 3, chunk, x.device)
    n_chunks = partials.shape[1]
    with device_guard(x):
        _trajectory_stats_partials_kernel[(batch * n_chunks,)](
            x_next, x, x_prev, partials, n, n_chunks, CHUNK=chunk, BLOCK=block,
            num_warps=REDUCE_WARPS,
        )
    return sum_partials(partials)
