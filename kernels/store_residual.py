"""Triton kernel for ``store_residual_``: ``cache = out - inp`` (or ``out``), ``delta`` =
its change and ``delta2`` = the change of that, with per-sample statistics of the change.

Semantics: :func:`omnicache.reference.store_residual_`. The writes and stage 1 of the
deterministic two-stage reduction are one fused pass; stage 2 is
:func:`.utils.sum_partials`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (REDUCE_BLOCK, REDUCE_CHUNK, REDUCE_WARPS, batch_and_n, check_blocking,
                    contiguous, device_guard, new_partials, sum_partials)


@triton.jit
def _store_residual_kernel(
    cache_ptr,  # [B, N] contiguous, float32/float16/bfloat16; read, then overwritten
    delta_ptr,  # [B, N] contiguous, same dtype; written if HAS_DELTA (else a dummy)
    out_ptr,  # [B, N] contiguous, same dtype
    inp_ptr,  # [B, N] contiguous, same dtype (a dummy unless HAS_INP)
    delta2_ptr,  # [B, N] contiguous, same dtype; written if HAS_DELTA2 (else a dummy)
    part_ptr,  # float32 [B, n_chunks, 4]
    N,
    n_chunks,
    HAS_INP: tl.constexpr,  # new = out - inp (else new = out: a branch output, not a difference)
    HAS_DELTA: tl.constexpr,  # write delta = new - old
    HAS_DELTA2: tl.constexpr,  # write delta2 = (new - old) - old delta (needs HAS_DELTA)
    CHUNK: tl.constexpr,  # elements of one sample handled by one program (fixed)
    BLOCK: tl.constexpr,  # elements per step; CHUNK % BLOCK == 0
):
    """For sample ``s`` and chunk ``c`` (program ``s * n_chunks + c``), with ``i`` over
    ``[c*CHUNK, min((c+1)*CHUNK, N))`` and all arithmetic in float32::

        new = out[s, i] - inp[s, i]          # out[s, i] unless HAS_INP; unrounded
        old = cache[s, i]
        d = new - old
        delta2[s, i] = d - delta[s, i]       # if HAS_DELTA2 (old delta), rounded
        delta[s, i] = d                      # if HAS_DELTA, rounded to the dtype
        cache[s, i] = new                    # rounded to the dtype
        part[s, c, :] = Σ_i |d|, Σ_i |old|, Σ_i d², Σ_i old²

    Each element is read and written by the same program. Terms are added ``BLOCK``
    at a time into per-lane accumulators, then ``tl.sum``: a fixed order.
    """
    pid = tl.program_id(0).to(tl.int64)
    s = pid // n_chunks
    c = pid - s * n_chunks
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, N)
    row = s * N
    acc_abs_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_abs_old = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq_old = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(start, end, BLOCK):
        i = row + i0 + tl.arange(0, BLOCK)
        mask = i < row + end
        new = tl.load(out_ptr + i, mask=mask, other=0.0).to(tl.float32)
        if HAS_INP:
            new = new - tl.load(inp_ptr + i, mask=mask, other=0.0).to(tl.float32)
        old = tl.load(cache_ptr + i, mask=mask, other=0.0).to(tl.float32)
        d = new - old
        if HAS_DELTA2:
            d_old = tl.load(delta_ptr + i, mask=mask, other=0.0).to(tl.float32)
            tl.store(delta2_ptr + i, (d - d_old).to(delta2_ptr.dtype.element_ty), mask=mask)
        if HAS_DELTA:
            tl.store(delta_ptr + i, d.to(delta_ptr.dtype.element_ty), mask=mask)
        tl.store(cache_ptr + i, new.to(cache_ptr.dtype.element_ty), mask=mask)
        acc_abs_d += tl.abs(d)
        acc_abs_old += tl.abs(old)
        acc_sq_d += d * d
        acc_sq_old += old * old
    part = part_ptr + pid * 4
    tl.store(part, tl.sum(acc_abs_d, axis=0))
    tl.store(part + 1, tl.sum(acc_abs_old, axis=0))
    tl.store(part + 2, tl.sum(acc_sq_d, axis=0))
    tl.store(part + 3, tl.sum(acc_sq_old, axis=0))


def store_residual_(
    cache: Tensor, delta: Tensor | None, out: Tensor, inp: Tensor | None,
    delta2: Tensor | None = None, *, block: int = REDUCE_BLOCK, chunk: int = REDUCE_CHUNK,
) -> Tensor:
    """Store the block residual and measure its change, in one pass.

    ``new = out - inp`` (``out`` when ``inp`` is None); ``d1 = new - cache``;
    ``delta2 = d1 - delta`` (if ``delta2`` is given); ``delta = d1`` (if ``delta`` is
    given); ``cache = new``.
    Returns ``[B, 4]`` float32 per sample: ``Σ|new-old|, Σ|old|, Σ(new-old)², Σold²``
    with ``old`` the previous ``cache`` and ``new`` unrounded.

    Parameters
    ----------
    cache : Tensor
        ``[B, ...]`` float32/float16/bfloat16, contiguous; overwritten.
    delta, delta2 : Tensor or None
        Like ``cache``, contiguous; overwritten when given (``delta2`` needs ``delta``).
    out, inp : Tensor
        Like ``cache``; may be strided (copied to contiguous); ``inp`` may be None.
        Validated by the caller.
    block, chunk : int
        Tuning only (tests lower them); defaults are fixed so results are bitwise
        reproducible.
    """
    check_blocking(block, chunk)
    batch, n = batch_and_n(cache)
    if cache.numel() == 0:
        return torch.zeros(batch, 4, dtype=torch.float32, device=cache.device)
    out, inp = contiguous(out, inp)
    partials = new_partials(batch, n, 4, chunk, cache.device)
    n_chunks = partials.shape[1]
    with device_guard(cache):
        _store_residual_kernel[(batch * n_chunks,)](
            cache, cache if delta is None else delta, out, out if inp is None else inp,
            cache if delta2 is None else delta2, partials, n, n_chunks,
            HAS_INP=inp is not None, HAS_DELTA=delta is not None, HAS_DELTA2=delta2 is not None,
            CHUNK=chunk, BLOCK=block, num_warps=REDUCE_WARPS,
        )
    return sum_partials(partials)
