"""Shared helpers for the Triton kernels: block sizes, input preparation, stage 2 of
the reductions.

Every reduction is deterministic and two-stage, with no atomics:

1. stage 1 (one kernel per op) runs one program per ``(sample, chunk)``; a chunk is
   ``REDUCE_CHUNK`` consecutive elements of one sample, a constant that never depends
   on the device, and the program sums it in a fixed order into
   ``partials[b, chunk, :]`` (float32, ``[B, n_chunks, K]``);
2. stage 2 (:func:`sum_partials`, shared) sums ``partials[b, :, k]`` over the chunks
   in a fixed order into ``[B, K]``.

The same inputs therefore give bitwise-equal statistics on every call on the same
device, whatever the number of SMs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elementwise kernels: one program per ELEMENTWISE_BLOCK elements of the flat [B*N] view.
ELEMENTWISE_BLOCK = 2048
ELEMENTWISE_WARPS = 4

# Reductions, stage 1: a program sums one chunk of REDUCE_CHUNK elements of one sample,
# REDUCE_BLOCK at a time. 16M elements with B = 1 make 1024 programs: enough for 132 SMs.
REDUCE_BLOCK = 2048
REDUCE_CHUNK = 16384
REDUCE_WARPS = 8

# Reductions, stage 2: one program per sample sums its partials SUM_BLOCK chunks at a time.
SUM_BLOCK = 512
SUM_WARPS = 4


def contiguous(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Return the tensors as contiguous tensors (copies only of strided read-only inputs).

    In-place targets are validated contiguous by the caller and come back unchanged.
    """
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)


def batch_and_n(t: Tensor) -> tuple[int, int]:
    """``(B, N)`` of the per-sample ``[B, N]`` view: dim 0 is the batch."""
    batch = t.shape[0]
    return batch, (t.numel() // batch if batch else 0)


def device_guard(t: Tensor):
    """Make ``t``'s GPU the current one while launching (no-op on CPU / interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_blocking(block: int, chunk: int | None = None) -> None:
    """``block`` must be a power of two (``tl.arange``), ``chunk`` a multiple of it."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if chunk is not None and (chunk <= 0 or chunk % block):
        raise ValueError(f"chunk must be a positive multiple of block={block}, got {chunk}")


def new_partials(batch: int, n: int, k: int, chunk: int, device: torch.device) -> Tensor:
    """Stage-1 output buffer ``[B, cdiv(N, chunk), k]`` float32 (every entry is written)."""
    return torch.empty(batch, triton.cdiv(n, chunk), k, dtype=torch.float32, device=device)


@triton.jit
def _sum_partials_kernel(
    part_ptr,  # float32 [B, n_chunks, K], contiguous
    out_ptr,  # float32 [B, K]
    n_chunks,
    K: tl.constexpr,  # number of statistics per chunk
    KP: tl.constexpr,  # K rounded up to a power of two (tile width)
    BLOCK: tl.constexpr,  # chunks summed per step
):
    """Stage 2: ``out[b, k] = Σ_c part[b, c, k]`` for one sample ``b`` per program.

    Chunks are added ``BLOCK`` at a time into a ``[BLOCK, KP]`` float32 accumulator
    (always in the same order), then reduced over the chunk axis with ``tl.sum``.
    """
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, KP)
    base = part_ptr + b * n_chunks * K
    acc = tl.zeros([BLOCK, KP], dtype=tl.float32)
    for c0 in range(0, n_chunks, BLOCK):
        c = c0 + rows
        mask = (c[:, None] < n_chunks) & (cols[None, :] < K)
        acc += tl.load(base + c[:, None] * K + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + b * K + cols, total, mask=cols < K)


def sum_partials(partials: Tensor) -> Tensor:
    """Stage 2 of every reduction: ``[B, n_chunks, K]`` float32 -> ``[B, K]`` float32.

    With a single chunk per sample the partials already are the result (no launch).
    """
    batch, n_chunks, k = partials.shape
    if n_chunks == 1:
        return partials.view(batch, k)
    out = torch.empty(batch, k, dtype=torch.float32, device=partials.device)
    with device_guard(partials):
        _sum_partials_kernel[(batch,)](
            partials, out, n_chunks, K=k, KP=triton.next_power_of_2(k), BLOCK=SUM_BLOCK,
            num_warps=SUM_WARPS,
        )
    return out
