"""Triton kernel for ``apply_residual_``: ``hidden += residual + gamma[b] * correction``.

Semantics: :func:`omnicache.reference.apply_residual_`. One flat elementwise pass over
the ``B*N`` elements; the sample of an element (for ``gamma[b]``) is ``offset // N``.
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
    gamma_ptr,  # float32 [] or [B] (a dummy when GAMMA_MODE == 0)
    total,  # B*N
    N,  # elements per sample
    B,
    HAS_CORRECTION: tl.constexpr,  # add gamma * correction
    GAMMA_MODE: tl.constexpr,  # 0: gamma = 1; 1: gamma[] (scalar); 2: gamma[b] per sample
    N_GE_BLOCK: tl.constexpr,  # N >= BLOCK: a block spans at most two samples (no division per element)
    BLOCK: tl.constexpr,  # elements per program
):
    """For every flat index ``j = b*N + i`` in this program's block, in float32::

        hidden[j] = (hidden[j] + residual[j]) + g_b * correction[j]   # if HAS_CORRECTION
        hidden[j] = hidden[j] + residual[j]                           # otherwise

    with ``g_b = 1``, ``gamma[()]`` or ``gamma[b]`` (GAMMA_MODE 0/1/2), rounded once to
    the dtype on store.
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < total
    h = tl.load(hidden_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = h + r
    if HAS_CORRECTION:
        c = tl.load(correction_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GAMMA_MODE == 0:
            acc += c
        elif GAMMA_MODE == 1:
            acc += tl.load(gamma_ptr) * c
        else:
            b0 = start // N  # sample of the block's first element
            local = (start - b0 * N) + tl.arange(0, BLOCK)  # index within sample b0
            if N_GE_BLOCK:
                g0 = tl.load(gamma_ptr + b0)
                g1 = tl.load(gamma_ptr + tl.minimum(b0 + 1, B - 1))
                g = tl.where(local < N, g0, g1)
            else:
                # N < BLOCK, so local < 2*BLOCK: a cheap 32-bit division.
                b = b0 + local.to(tl.int32) // N
                g = tl.load(gamma_ptr + b, mask=mask, other=0.0)
            acc += g * c
    tl.store(hidden_ptr + offs, acc.to(hidden_ptr.dtype.element_ty), mask=mask)


def apply_residual_(
    hidden: Tensor, residual: Tensor, correction: Tensor | None = None,
    gamma: Tensor | None = None, *, block: int = ELEMENTWISE_BLOCK,
) -> None:
    """Reuse a cached residual in place: ``hidden[b] += residual[b] + g_b * correction[b]``.

    ``g_b`` is ``gamma[b]`` (float32 ``[B]``), ``gamma[()]`` (float32 ``[]``) or 1 when
    ``gamma`` is None; without ``correction`` only the residual is added. Arithmetic in
    float32, one rounding to the dtype.

    Parameters
    ----------
    hidden : Tensor
        ``[B, ...]`` float32/float16/bfloat16, contiguous; updated in place.
    residual, correction : Tensor
        Like ``hidden``; may be strided (copied to contiguous). ``correction`` optional.
    gamma : Tensor or None
        float32, shape ``[]`` or ``[B]``; only used with ``correction``.
    block : int
        Tuning only (tests lower it).
    """
    check_blocking(block)
    total = hidden.numel()
    if total == 0:
        return
    batch, n = batch_and_n(hidden)
    residual, correction, gamma = contiguous(residual, correction, gamma)
    has_correction = correction is not None
    if not has_correction or gamma is None:
        mode = GAMMA_ONE
    elif gamma.dim() == 0 or batch == 1:
        mode = GAMMA_SCALAR
    else:
        mode = GAMMA_PER_SAMPLE
    with device_guard(hidden):
        _apply_residual_kernel[(triton.cdiv(total, block),)](
            hidden, residual, correction if has_correction else residual,
            gamma if mode != GAMMA_ONE else hidden, total, n, batch,
            HAS_CORRECTION=has_correction, GAMMA_MODE=mode, N_GE_BLOCK=n >= block,
            BLOCK=block, num_warps=ELEMENTWISE_WARPS,
        )
