"""rel_l1: Σ|a - b|, Σ|b| per sample."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omnicache.ops as ops
from omnicache import reference
from opsutil import DTYPES, rows, assert_stats, exact, make
from strategies import dtypes, seeds, shapes


def run_case(shape, dtype, seed, *, strided, device="cpu"):
    a = make(shape, dtype, seed=seed, strided=strided, device=device)
    b = make(shape, dtype, seed=seed + 1, strided=strided, device=device)
    want = reference.rel_l1(exact(a), exact(b), acc=torch.float64)
    scale = torch.stack([rows(exact(a).abs() + exact(b).abs()).sum(1),
                         rows(exact(b).abs()).sum(1)], dim=1)
    assert_stats(ops.rel_l1(a, b), want, scale)


@given(shape=shapes, dtype=dtypes, seed=seeds, strided=st.booleans())
def test_matches_reference(cpu_backend, shape, dtype, seed, strided):
    run_case(shape, dtype, seed, strided=strided)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_chunks_per_sample(cpu_backend, dtype):
    run_case((3, 33333), dtype, 9, strided=False)


def test_identical_inputs_give_zero_distance(cpu_backend):
    a = torch.randn(2, 3, 5)
    dist, norm = ops.rel_l1(a, a.clone()).unbind(1)
    assert not dist.any()
    torch.testing.assert_close(norm, rows(a.abs()).sum(1))


def test_empty_returns_zeros(cpu_backend):
    stats = ops.rel_l1(torch.empty(0, 7), torch.empty(0, 7))
    assert stats.shape == (0, 2)
