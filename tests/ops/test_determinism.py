"""Reductions are bitwise-reproducible: on repeat and for any number of threads."""

import pytest
import torch

import omnicache.ops as ops
from opsutil import DTYPES, make

SHAPE = (3, 70001)  # several fixed-size chunks per sample


def all_reductions(dtype):
    xs = [make(SHAPE, dtype, seed=s) for s in range(3)]
    cache = make(SHAPE, dtype, seed=10)
    return torch.cat([
        ops.trajectory_stats(*xs),
        ops.rel_l1(xs[0], xs[1]),
        ops.store_residual_(cache, torch.empty_like(cache), xs[0], xs[1]),
    ], dim=1), cache


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_equal_on_repeat(cpu_backend, dtype):
    first, cache1 = all_reductions(dtype)
    second, cache2 = all_reductions(dtype)
    assert torch.equal(first, second) and torch.equal(cache1, cache2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_equal_across_thread_counts(cpu_backend, dtype):
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results.append(all_reductions(dtype)[0])
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(results[0], r)
