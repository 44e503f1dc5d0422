"""store_residual_: cache = out - inp, delta = new - old, [B,4] statistics."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omnicache.ops as ops
from omnicache import reference
from opsutil import DTYPES, rows, assert_elementwise, assert_stats, exact, make
from strategies import dtypes, seeds, shapes


def run_case(shape, dtype, seed, *, strided, with_delta, device="cpu"):
    cache = make(shape, dtype, seed=seed, device=device)
    delta = torch.full(shape, 123.0, dtype=dtype, device=device) if with_delta else None
    out = make(shape, dtype, seed=seed + 1, strided=strided, device=device)
    inp = make(shape, dtype, seed=seed + 2, strided=strided, device=device)

    cache64, delta64 = exact(cache), exact(delta)
    stats64 = reference.store_residual_(cache64, delta64, exact(out), exact(inp), acc=torch.float64)
    new_scale = exact(out).abs() + exact(inp).abs()
    old = exact(cache)
    term_scale = torch.stack(
        [rows(new_scale + old.abs()).sum(1), rows(old.abs()).sum(1),
         rows((new_scale + old.abs()) ** 2).sum(1), rows(old**2).sum(1)], dim=1)

    stats = ops.store_residual_(cache, delta, out, inp)
    assert_stats(stats, stats64, term_scale)
    assert_elementwise(cache, cache64, new_scale)
    if with_delta:
        assert_elementwise(delta, delta64, new_scale + old.abs())


@given(shape=shapes, dtype=dtypes, seed=seeds, strided=st.booleans(), with_delta=st.booleans())
def test_matches_reference(cpu_backend, shape, dtype, seed, strided, with_delta):
    run_case(shape, dtype, seed, strided=strided, with_delta=with_delta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
def test_many_chunks_per_sample(cpu_backend, dtype, with_delta):
    run_case((2, 50001), dtype, 11, strided=False, with_delta=with_delta)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_returns_zeros(cpu_backend, shape):
    stats = ops.store_residual_(torch.empty(shape), torch.empty(shape), torch.empty(shape),
                                torch.empty(shape))
    assert stats.shape == (shape[0], 4) and stats.dtype == torch.float32
    assert not stats.any()
