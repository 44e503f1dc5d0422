"""trajectory_stats: ‖v1‖², ‖v0‖², ⟨v1, v0⟩ of three consecutive points."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omnicache.ops as ops
from omnicache import reference
from opsutil import DTYPES, rows, assert_stats, exact, make
from strategies import dtypes, seeds, shapes


def run_case(shape, dtype, seed, *, strided, device="cpu"):
    xs = [make(shape, dtype, seed=seed + i, strided=strided, device=device) for i in range(3)]
    want = reference.trajectory_stats(*map(exact, xs), acc=torch.float64)
    v1 = rows(exact(xs[0]) - exact(xs[1]))
    v0 = rows(exact(xs[1]) - exact(xs[2]))
    scale = torch.stack([(v1 * v1).sum(1), (v0 * v0).sum(1), (v1 * v0).abs().sum(1)], dim=1)
    scale = scale + 1e-6 * (rows(sum(exact(x).abs() for x in xs)) ** 2).sum(1, keepdim=True)
    assert_stats(ops.trajectory_stats(*xs), want, scale)


@given(shape=shapes, dtype=dtypes, seed=seeds, strided=st.booleans())
def test_matches_reference(cpu_backend, shape, dtype, seed, strided):
    run_case(shape, dtype, seed, strided=strided)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_chunks_per_sample(cpu_backend, dtype):
    run_case((2, 3, 20011), dtype, 5, strided=True)


def test_straight_line_has_zero_curvature(cpu_backend):
    x = torch.randn(3, 100)
    step = torch.randn(3, 100)
    n1, n0, dot = ops.trajectory_stats(x + 2 * step, x + step, x).unbind(1)
    cos = dot / (n1 * n0).sqrt()
    torch.testing.assert_close(cos, torch.ones(3), rtol=1e-5, atol=1e-5)


def test_empty_returns_zeros(cpu_backend):
    stats = ops.trajectory_stats(*(torch.empty(4, 0) for _ in range(3)))
    assert stats.shape == (4, 3) and not stats.any()
