"""Triton kernel for ``apply_residual_``:
``hidden += gate[b] * (residual + γ1[b]·correction + γ2[b]·correction2)``.

Semantics: :func:`omnicache.reference.apply_residual_`. One flat elementwise pass over
the ``B*N`` elements; the sample of an element (for the γ and the gate) is ``offset // N``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .utils import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, batch_and_n, check_blocking, contiguous, device_guard

GAMMA_ONE, GAMMA_SCALAR, GAMMA_PER_SAMPLE = 0, 1, 2


@triton.jit
def _apply_residual_kernel(
    hidden_ptr,  # [B*N] contiguous, float32/float16/bfloat16; updated in place
    residual_ptr,  # [B*N] contiguous, same dtype
    correction_ptr,  # [B*N] contiguous, same dtype (a dummy unless HAS_CORRECTION)
    correction2_ptr,  # [B*N] contiguous, same dtype (a dummy unless HAS_CORRECTION2)
    gate_ptr,  # [B, D] contiguous, same dtype (a dummy unless HAS_GATE)
    gamma_ptr,  # float32 [], [B], [2] or [B, 2] (a dummy when GAMMA_MODE == 0)
    total,  # B*N
    N,  # elements per sample
    D,  # hidden's last dim (the gate's row length)
    B,
    HAS_CORRECTION: tl.constexpr,  # add γ1 * correction
    HAS_CORRECTION2: tl.constexpr,  # add γ2 * correction2 (gamma then holds (γ1, γ2))
    HAS_GATE: tl.constexpr,  # multiply the sum by gate[b, i % D]
    GAMMA_MODE: tl.constexpr,  # 0: γ = 1; 1: one gamma for all samples; 2: gamma[b] per sample
    N_GE_BLOCK: tl.constexpr,  # N >= BLOCK: a block spans at most two samples (no division per element)
    BLOCK: tl.constexpr,  # elements per program
):
    """For every flat index ``j = b*N + i`` in this program's block, in float32::

        s = residual[j]
        s = s + g1_b * correction[j]       # if HAS_CORRECTION
        s = s + g2_b * correction2[j]      # if HAS_CORRECTION2
        s = s * gate[b, j % D]             # if HAS_GATE
        hidden[j] = hidden[j] + s

    with ``(g1_b, g2_b)`` = 1, the shared gamma or ``gamma[b]`` (GAMMA_MODE 0/1/2; the
    pair when HAS_CORRECTION2), rounded once to the dtype on store.
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < total
    GSTRIDE: tl.constexpr = 2 if HAS_CORRECTION2 else 1  # floats per sample's gamma
    if GAMMA_MODE == 2 or HAS_GATE:
        b0 = start // N  # sample of the block's first element
        local = (start - b0 * N) + tl.arange(0, BLOCK)  # index within sample b0
        if N_GE_BLOCK:
            b = b0 + (local >= N).to(tl.int64)
        else:
            # N < BLOCK, so local < 2*BLOCK: a cheap 32-bit division.
            b = b0 + (local.to(tl.int32) // N).to(tl.int64)
    s = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CORRECTION:
        c = tl.load(correction_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GAMMA_MODE == 0:
            s += c
        elif GAMMA_MODE == 1:
            s += tl.load(gamma_ptr) * c
        elif GAMMA_MODE == 2:
            s += tl.load(gamma_ptr + b * GSTRIDE, mask=mask, other=0.0) * c
    if HAS_CORRECTION2:
        c2 = tl.load(correction2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GAMMA_MODE == 0:
            s += c2
        elif GAMMA_MODE == 1:
            s += tl.load(gamma_ptr + 1) * c2
        elif GAMMA_MODE == 2:
            s += tl.load(gamma_ptr + b * GSTRIDE + 1, mask=mask, other=0.0) * c2
    if HAS_GATE:
        col = (offs - b * N).to(tl.int32) % D  # index within the sample (< N) fits int32: no 64-bit modulo
        s *= tl.load(gate_ptr + b * D + col, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(hidden_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(hidden_ptr + offs, (h + s).to(hidden_ptr.dtype.element_ty), mask=mask)


def apply_residual_(
    hidden: Tensor, residual: Tensor, correction: Tensor | None = None,
    gamma: Tensor | None = None, correction2: Tensor | None = None, gate: Tensor | None = None,
    *, block: int = ELEMENTWISE_BLOCK,
) -> None:
    """Reuse a cached residual in place:
    ``hidden[b] += gate[b] * (residual[b] + g1_b * correction[b] + g2_b * correction2[b])``.

    ``(g1_b, g2_b)``: from ``gamma`` (float32 ``[]``/``[B]`` for g1 alone, ``[2]``/``[B, 2]``
    for the pair when ``correction2`` is given), 1 when ``gamma`` is None. Absent terms
    drop out; the gate ``[B, D]`` broadcasts over hidden's middle dims. Arithmetic in
    float32, one rounding to the dtype.

    Parameters
    ----------
    hidden : Tensor
        ``[B, ..., D]`` float32/float16/bfloat16, contiguous; updated in place.
    residual, correction, correction2 : Tensor
        Like ``hidden``; may be strided (copied to contiguous). The corrections are optional.
    gamma : Tensor or None
        float32, shape ``[]``/``[B]`` or, with ``correction2``, ``[2]``/``[B, 2]``.
    gate : Tensor or None
        ``[B, D]`` in hidden's dtype; may be strided.
    block : int
        Tuning only (tests lower it).
    """
    check_blocking(block)
    total = hidden.numel()
    if total == 0:
        return
    batch, n = batch_and_n(hidden)
    residual, correction, correction2, gamma, gate = contiguous(
        residual, correction, correction2, gamma, gate)
    has_c1, has_c2 = correction is not None, correction2 is not None
    per_sample_dim = 2 if has_c2 else 1  # gamma's dim when it holds one entry per sample
    if not (has_c1 or has_c2) or gamma is None:
        mode = GAMMA_ONE
    elif gamma.dim() < per_sample_dim or batch == 1:
        mode = GAMMA_SCALAR
    else:
        mode = GAMMA_PER_SAMPLE
    with device_guard(hidden):
        _apply_residual_kernel[(triton.cdiv(total, block),)](
            hidden, residual, correction if has_c1 else residual,
            correction2 if has_c2 else residual, gate if gate is not None else residual,
            gamma if mode != GAMMA_ONE else hidden, total, n, hidden.shape[-1], batch,
            HAS_CORRECTION=has_c1, HAS_CORRECTION2=has_c2, HAS_GATE=gate is not None,
            GAMMA_MODE=mode, N_GE_BLOCK=n >= block, BLOCK=block, num_warps=ELEMENTWISE_WARPS,
        )
