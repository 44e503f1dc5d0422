"""token_update_ and gather_tokens (ToCa): selected tokens store their new residual and
pass their value through, the others reuse the cache; the last occurrence of a repeated
token wins; gather_tokens copies rows."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omnicache.ops as ops
from omnicache import reference
from opsutil import DTYPES, INTERPRET, assert_elementwise, exact, make
from strategies import dtypes, seeds

# (B, N, C, K): K may exceed N (then tokens repeat) or be 0.
token_shapes = st.tuples(st.integers(1, 3), st.integers(1, 23), st.integers(1, 37),
                         st.integers(0, 30))


def make_index(batch, n, k, seed, *, unique=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if unique:
        k = min(k, n)
        idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])
    else:
        idx = torch.randint(0, n, (batch, k), generator=g)
    return idx.reshape(batch, k).to(device)


def token_inputs(shape, dtype, seed, *, strided=False, unique=False, device="cpu"):
    b, n, c, k = shape
    index = make_index(b, n, k, seed, unique=unique, device=device)
    k = index.shape[1]
    return (make((b, n, c), dtype, seed=seed + 1, device=device),
            index,
            make((b, k, c), dtype, seed=seed + 2, strided=strided, device=device),
            make((b, n, c), dtype, seed=seed + 3, strided=strided, device=device))


def run_case(shape, dtype, seed, *, strided=False, unique=False, device="cpu"):
    cache, index, values, hidden = token_inputs(shape, dtype, seed, strided=strided,
                                                unique=unique, device=device)
    cache64 = exact(cache)
    out64 = reference.token_update_(cache64, index.cpu(), exact(values), exact(hidden),
                                    acc=torch.float64)
    before = cache.clone()
    out = ops.token_update_(cache, index, values, hidden)
    assert out.shape == hidden.shape and out.dtype == dtype and out.device == hidden.device
    assert out.is_contiguous()
    h64, c64 = exact(hidden).abs(), exact(before).abs()
    sel = reference._token_owners(index.cpu(), shape[1]) >= 0
    # The selected tokens' out is values itself, bit for bit; their residual one rounding
    # of values - hidden; the other tokens' cache is untouched.
    assert torch.equal(bits(out.cpu()[sel]), bits(values.cpu()[_owner_rows(index.cpu(), shape[1])]))
    assert_elementwise(out, out64, h64 + c64)
    assert_elementwise(cache, cache64, h64 + exact(out).abs())
    assert torch.equal(cache.cpu()[~sel], before.cpu()[~sel])
    return out


def _owner_rows(index, n):
    """(b, owner) of every selected token, in the order of a [B, N] boolean mask."""
    owner = reference._token_owners(index, n)
    b = torch.arange(index.shape[0]).unsqueeze(1).expand_as(owner)
    sel = owner >= 0
    return b[sel], owner[sel]


@given(shape=token_shapes, dtype=dtypes, seed=seeds, strided=st.booleans(), unique=st.booleans())
def test_token_update_matches_reference(cpu_backend, shape, dtype, seed, strided, unique):
    run_case(shape, dtype, seed, strided=strided, unique=unique)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_update_many_tasks(cpu_backend, dtype):
    """Enough tokens for several parallel ranges (CPU) / programs (Triton), C not a
    multiple of any vector width, and the ToCa proportion (15% recomputed)."""
    n = 96 if INTERPRET else 1500
    run_case((2, n, 67, n * 15 // 100), dtype, 5, unique=True)
    run_case((2, n, 67, n // 2), dtype, 6, strided=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_call_streams_the_same_bits(cpu_backend, dtype):
    """An out of >= 32 MiB is written with streaming stores (C++ kernels): the same bits as
    the float32 reference, as on small calls."""
    if cpu_backend != "cpu":
        pytest.skip("the streaming stores are in the C++ kernels")
    c = 65  # odd rows: vectors start misaligned in every other row
    n = (32 << 20) // (c * torch.empty((), dtype=dtype).element_size()) + 3
    cache, index, values, hidden = token_inputs((1, n, c, n // 7), dtype, 1, unique=True)
    want_cache = cache.clone()
    want = reference.token_update_(want_cache, index, values, hidden)
    got = ops.token_update_(cache, index, values, hidden)
    assert torch.equal(bits(got), bits(want)) and torch.equal(bits(cache), bits(want_cache))


def test_last_occurrence_wins(cpu_backend):
    hidden = torch.zeros(1, 4, 2)
    cache = torch.full((1, 4, 2), 7.0)
    index = torch.tensor([[2, 0, 2, 2, 0]])
    values = torch.arange(10.0).reshape(1, 5, 2)
    out = ops.token_update_(cache, index, values, hidden)
    assert torch.equal(out[0, 2], values[0, 3]) and torch.equal(cache[0, 2], values[0, 3])
    assert torch.equal(out[0, 0], values[0, 4]) and torch.equal(cache[0, 0], values[0, 4])
    for n in (1, 3):  # not selected: hidden + cache, cache kept
        assert torch.equal(out[0, n], torch.full((2,), 7.0)) and torch.equal(cache[0, n], torch.full((2,), 7.0))


def test_no_token_selected_is_plain_reuse(cpu_backend):
    hidden, cache = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    before = cache.clone()
    out = ops.token_update_(cache, torch.empty(2, 0, dtype=torch.int64), torch.empty(2, 0, 3), hidden)
    assert torch.equal(out, hidden + before) and torch.equal(cache, before)


@pytest.mark.parametrize("shape", [(0, 4, 3, 2), (2, 0, 3, 0), (2, 4, 0, 3)])
def test_token_update_empty(cpu_backend, shape):
    b, n, c, k = shape
    cache, hidden = torch.empty(b, n, c), torch.empty(b, n, c)
    index = torch.zeros(b, k, dtype=torch.int64)
    out = ops.token_update_(cache, index, torch.empty(b, k, c), hidden)
    assert out.shape == (b, n, c)
    got = ops.gather_tokens(hidden, index)
    assert got.shape == (b, k, c)


def test_toca_step_recomputes_the_selected_tokens(cpu_backend):
    """gather -> unit -> token_update_: a unit recomputed on all tokens gives the same out
    for the selected ones, and the cache then holds their residuals."""
    torch.manual_seed(0)
    w = torch.randn(8, 8) / 3
    unit = lambda x: x + torch.tanh(x @ w)  # noqa: E731
    hidden = torch.randn(2, 12, 8)
    cache = unit(hidden) - hidden  # the residuals of an earlier full step
    hidden2 = hidden + 0.01 * torch.randn(2, 12, 8)
    index = make_index(2, 12, 4, 3, unique=True)
    values = unit(ops.gather_tokens(hidden2, index))
    out = ops.token_update_(cache, index, values, hidden2)
    full = unit(hidden2)
    rows = torch.arange(2).unsqueeze(1)
    torch.testing.assert_close(out[rows, index], full[rows, index], rtol=0, atol=0)
    torch.testing.assert_close(cache[rows, index], full[rows, index] - hidden2[rows, index])


@given(shape=token_shapes, dtype=dtypes, seed=seeds, layout=st.sampled_from(["contig", "rows", "strided"]))
def test_gather_tokens_copies_rows(cpu_backend, shape, dtype, seed, layout):
    b, n, c, k = shape
    x = make((b, n, c), dtype, seed=seed, strided=layout == "strided")
    if layout == "rows":  # a view with a contiguous last dim: every other token
        x = make((b, 2 * n, c), dtype, seed=seed)[:, ::2]
    index = make_index(b, n, k, seed)
    got = ops.gather_tokens(x, index)
    want = torch.stack([x[i, index[i]] for i in range(b)]) if b else torch.empty(0, k, c, dtype=dtype)
    assert got.shape == (b, k, c) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(bits(got), bits(want))


def bits(t):
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_gather_tokens_keeps_nan_and_signed_zero_bits(cpu_backend):
    x = torch.tensor([[[float("nan"), -0.0], [1.0, float("-inf")]]])
    got = ops.gather_tokens(x, torch.tensor([[1, 0, 0]]))
    assert torch.equal(bits(got), bits(x[:, [1, 0, 0]]))


def test_reference_device_semantics_for_an_index_out_of_range():
    """What the GPU kernels do without a host check (the spec, in reference.py): no cache
    element written, out all NaN; gather_tokens: NaN rows where the index is outside."""
    cache, hidden, values = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 2, 3)
    before = cache.clone()
    for bad in (5, -1):
        index = torch.tensor([[0, 1], [2, bad]])
        out = reference.token_update_(cache, index, values, hidden)
        assert out.isnan().all() and torch.equal(cache, before)
        rows = reference.gather_tokens(hidden, index)
        assert rows[1, 1].isnan().all() and torch.equal(rows[0], hidden[0, :2])
