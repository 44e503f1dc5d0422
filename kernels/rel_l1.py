"""Triton kernel for ``rel_l1``: per-sample ``Σ|a - b|`` and ``Σ|b|``.

Semantics: :func:`omnicache.reference.rel_l1`. Two-stage deterministic reduction:
stage 1 below, stage 2 :func:`.utils.sum_partials`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (REDUCE_BLOCK, REDUCE_CHUNK, REDUCE_WARPS, batch_and_n, check_blocking,
                    contiguous, device_guard, new_partials, sum_partials)


@triton.jit
def _rel_l1_partials_kernel(
    a_ptr,  # [B, N] contiguous, float32/float16/bfloat16
    b_ptr,  # [B, N] contiguous, same dtype
    part_ptr,  # float32 [B, n_chunks, 2]
    N,
    n_chunks,
    CHUNK: tl.constexpr,  # elements of one sample summed by one program (fixed)
    BLOCK: tl.constexpr,  # elements loaded per step; CHUNK % BLOCK == 0
):
    """Stage 1: for sample ``s`` and chunk ``c`` (program ``s * n_chunks + c``), with
    ``i`` over ``[c*CHUNK, min((c+1)*CHUNK, N))`` and all arithmetic in float32::

        part[s, c, 0] = Σ_i |a[s, i] - b[s, i]|
        part[s, c, 1] = Σ_i |b[s, i]|

    Terms are added ``BLOCK`` at a time into per-lane accumulators, then ``tl.sum``:
    a fixed order.
    """
    pid = tl.program_id(0).to(tl.int64)
    s = pid // n_chunks
    c = pid - s * n_chunks
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, N)
    row = s * N
    acc_diff = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ref = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(start, end, BLOCK):
        i = row + i0 + tl.arange(0, BLOCK)
        mask = i < row + end
        a = tl.load(a_ptr + i, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + i, mask=mask, other=0.0).to(tl.float32)
        acc_diff += tl.abs(a - b)
        acc_ref += tl.abs(b)
    out = part_ptr + pid * 2
    tl.store(out, tl.sum(acc_diff, axis=0))
    tl.store(out + 1, tl.sum(acc_ref, axis=0))


def rel_l1(a: Tensor, b: Tensor, *, block: int = REDUCE_BLOCK, chunk: int = REDUCE_CHUNK) -> Tensor:
    """Per-sample relative-L1 terms: returns ``[B, 2]`` float32, ``Σ|a - b|, Σ|b|``.

    Parameters
    ----------
    a, b : Tensor
        Same shape ``[B, ...]``, dtype (float32/float16/bfloat16) and device; may be
        strided (copied to contiguous). Validated by the caller.
    block, chunk : int
        Tuning only (tests lower them); defaults are fixed so results are bitwise
        reproducible.
    """
    check_blocking(block, chunk)
    batch, n = batch_and_n(a)
    if a.numel() == 0:
        return torch.zeros(batch, 2, dtype=torch.float32, device=a.device)
    a, b = contiguous(a, b)
    partials = new_partials(batch, n, 2, chunk, a.device)
    n_chunks = partials.shape[1]
    with device_guard(a):
        _rel_l1_partials_kernel[(batch * n_chunks,)](
            a, b, partials, n, n_chunks, CHUNK=chunk, BLOCK=block, num_warps=REDUCE_WARPS,
        )
    return sum_partials(partials)
