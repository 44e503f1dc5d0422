"""Triton kernels for the token ops (ToCa): ``token_update_`` and ``gather_tokens``.

Semantics: :func:`omnicache.reference.token_update_` and
:func:`omnicache.reference.gather_tokens`. ``token_update_`` runs two kernels: the owner
pass (``atomic_max`` of ``k`` into an int32 ``[B, N]`` map initialised to -1: the last
occurrence of a repeated token wins, whatever order the programs run in) and the update
pass over ``[tokens, channels]`` tiles. An index outside ``[0, N)`` is handled on the
device, never read back on the host: the owner pass raises a flag, and the update pass
then writes no cache element and fills ``out`` with NaN; ``gather_tokens`` gives NaN rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import check_blocking, contiguous, device_guard

TOKEN_BLOCK = 16  # tokens (rows) per program
CHANNEL_BLOCK = 128  # channels per program: tiles of 16 x 128 elements
INDEX_BLOCK = 1024  # index entries per program of the owner pass
TOKEN_WARPS = 4


@triton.jit
def _token_owner_kernel(
    index_ptr,  # int64 [B, K] contiguous
    owner_ptr,  # int32 [B, N], -1 on entry; owner[b, n] = max k with index[b, k] == n
    flag_ptr,  # int32 [1], 0 on entry; 1 when an index lies outside [0, N)
    N,
    K,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = k < K
    n = tl.load(index_ptr + b * K + k, mask=live, other=0)
    inside = (n >= 0) & (n < N)
    tl.atomic_max(owner_ptr + b * N + n, k.to(tl.int32), mask=live & inside)
    tl.atomic_or(flag_ptr + k * 0, 1, mask=live & (inside == 0))


@triton.jit
def _token_update_kernel(
    cache_ptr,  # [B, N, C] contiguous, float32/float16/bfloat16; read, written where selected
    out_ptr,  # [B, N, C] contiguous, same dtype; written
    values_ptr,  # [B, K, C] contiguous, same dtype
    hidden_ptr,  # [B, N, C] contiguous, same dtype
    owner_ptr,  # int32 [B * N], from the owner pass
    flag_ptr,  # int32 [1], from the owner pass
    N,
    K,
    C,
    rows,  # B * N
    TOKENS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Tile of TOKENS tokens x BLOCK_C channels, in float32, one rounding per write::

        owner >= 0: cache = values[b, owner] - hidden;  out = values[b, owner] (bits)
        owner < 0:  out = hidden + cache
        flag set:   out = NaN, cache untouched
    """
    t = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    col = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = (t < rows)[:, None] & (col < C)[None, :]
    owner = tl.load(owner_ptr + t, mask=t < rows, other=-1)
    ok = (tl.load(flag_ptr + t * 0) == 0)[:, None]  # no index outside [0, N)
    sel = (owner >= 0)[:, None]
    offs = t[:, None] * C + col[None, :]
    src = ((t // N) * K + tl.maximum(owner, 0))[:, None] * C + col[None, :]
    h = tl.load(hidden_ptr + offs, mask=live, other=0.0)
    v = tl.load(values_ptr + src, mask=live & sel, other=0.0)
    c = tl.load(cache_ptr + offs, mask=live & (owner < 0)[:, None], other=0.0)
    dtype = out_ptr.dtype.element_ty
    hf = h.to(tl.float32)
    out = tl.where(sel, v, (hf + c.to(tl.float32)).to(dtype))
    out = tl.where(ok, out, tl.full([TOKENS, BLOCK_C], float("nan"), dtype))
    tl.store(out_ptr + offs, out, mask=live)
    tl.store(cache_ptr + offs, (v.to(tl.float32) - hf).to(dtype), mask=live & sel & ok)


@triton.jit
def _gather_tokens_kernel(
    out_ptr,  # [B, K, C] contiguous, float32/float16/bfloat16; written
    x_ptr,  # [B, N, C] with a contiguous last dim, same dtype
    index_ptr,  # int64 [B * K] contiguous
    N,
    K,
    C,
    stride_b,  # x.stride(0)
    stride_n,  # x.stride(1)
    rows,  # B * K
    TOKENS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[b, k] = x[b, index[b, k]]`` (bits), NaN where the index is outside [0, N)."""
    r = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    col = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = (r < rows)[:, None] & (col < C)[None, :]
    n = tl.load(index_ptr + r, mask=r < rows, other=0)
    inside = ((n >= 0) & (n < N))[:, None]
    src = ((r // K) * stride_b + n * stride_n)[:, None] + col[None, :]
    x = tl.load(x_ptr + src, mask=live & inside, other=float("nan"))
    tl.store(out_ptr + r[:, None] * C + col[None, :], x, mask=live)


def _rows_like(t: Tensor, rows: int, *blocks: int) -> Tensor:
    """A new contiguous ``[B, rows, C]`` tensor like ``t`` (``[B, N, C]``), once every
    block size is checked."""
    for block in blocks:
        check_blocking(block)
    return torch.empty((t.shape[0], rows, t.shape[2]), dtype=t.dtype, device=t.device)


def token_update_(cache: Tensor, index: Tensor, values: Tensor, hidden: Tensor, *,
                  tokens: int = TOKEN_BLOCK, block_c: int = CHANNEL_BLOCK,
                  index_block: int = INDEX_BLOCK) -> Tensor:
    """ToCa's token update (validated by the caller): returns ``out`` ``[B, N, C]``.

    ``cache`` contiguous (updated in place); ``values``, ``hidden`` and ``index`` may be
    strided (copied to contiguous). ``tokens``, ``block_c``, ``index_block``: tuning only
    (powers of two; tests lower them).
    """
    batch, n, c = hidden.shape
    k = index.shape[1]
    out = _rows_like(hidden, n, tokens, block_c, index_block)
    if out.numel() == 0:
        return out
    index, values, hidden = contiguous(index, values, hidden)
    owner = torch.full((batch, n), -1, dtype=torch.int32, device=hidden.device)
    flag = torch.zeros(1, dtype=torch.int32, device=hidden.device)
    with device_guard(hidden):
        if k > 0:
            _token_owner_kernel[(batch, triton.cdiv(k, index_block))](
                index, owner, flag, n, k, BLOCK=index_block, num_warps=TOKEN_WARPS)
        _token_update_kernel[(triton.cdiv(batch * n, tokens), triton.cdiv(c, block_c))](
            cache, out, values if k > 0 else hidden, hidden, owner, flag, n, k, c, batch * n,
            TOKENS=tokens, BLOCK_C=block_c, num_warps=TOKEN_WARPS)
    return out


def gather_tokens(x: Tensor, index: Tensor, *, tokens: int = TOKEN_BLOCK,
                  block_c: int = CHANNEL_BLOCK) -> Tensor:
    """``[B, N, C]``, ``[B, K]`` -> ``[B, K, C]`` rows (validated by the caller). ``x``
    needs a contiguous last dim only (other strides are followed)."""
    batch, n, c = x.shape
    k = index.shape[1]
    out = _rows_like(x, k, tokens, block_c)
    if out.numel() == 0:
        return out
    if x.stride(2) != 1:
        x = x.contiguous()
    (index,) = contiguous(index)
    with device_guard(x):
        _gather_tokens_kernel[(triton.cdiv(batch * k, tokens), triton.cdiv(c, block_c))](
            out, x, index, n, k, c, x.stride(0), x.stride(1), batch * k,
            TOKENS=tokens, BLOCK_C=block_c, num_warps=TOKEN_WARPS)
    return out
