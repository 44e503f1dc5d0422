"""Reductions are bitwise-reproducible: on repeat, for any number of threads and for
every CPU instruction set the C++ kernels are compiled for."""

import os
import subprocess
import sys

import pytest
import torch

import omnicache.ops as ops
from opsutil import DTYPES, make

SHAPE = (3, 70001)  # several fixed-size chunks per sample


def all_reductions(dtype):
    xs = [make(SHAPE, dtype, seed=s) for s in range(3)]
    cache = make(SHAPE, dtype, seed=10)
    cache2, delta, delta2 = make(SHAPE, dtype, seed=11), make(SHAPE, dtype, seed=12), torch.empty_like(cache)
    return torch.cat([
        ops.trajectory_stats(*xs),
        ops.rel_l1(xs[0], xs[1]),
        ops.store_residual_(cache, torch.empty_like(cache), xs[0], xs[1]),
        ops.store_residual_(cache2, delta, xs[2], None, delta2),
    ], dim=1), cache


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_equal_on_repeat(cpu_backend, dtype):
    first, cache1 = all_reductions(dtype)
    second, cache2 = all_reductions(dtype)
    assert torch.equal(first, second) and torch.equal(cache1, cache2)


def over_thread_counts(fn, counts=(1, 2, 3, 4)):
    """``[fn() for each number of torch threads in counts]``, the setting restored."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_equal_across_thread_counts(cpu_backend, dtype):
    results = over_thread_counts(lambda: all_reductions(dtype)[0])
    for r in results[1:]:
        assert torch.equal(results[0], r)


def token_ops(dtype):
    """token_update_ with many repeated tokens (every index drawn with replacement) over
    several parallel ranges, and gather_tokens."""
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 700, (3, 900), generator=g)
    cache = make((3, 700, 65), dtype, seed=20)
    out = ops.token_update_(cache, index, make((3, 900, 65), dtype, seed=21), make((3, 700, 65), dtype, seed=22))
    return out, cache, ops.gather_tokens(out, index)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_ops_bitwise_equal_on_repeat_and_across_thread_counts(cpu_backend, dtype):
    results = over_thread_counts(lambda: token_ops(dtype), (1, 2, 3, 1))
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


_ISA_SCRIPT = r"""
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
import omnicache.ops as ops
from opsutil import make
torch.set_num_threads(1)
h = hashlib.sha256()
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for shape in ((3, 70001), (2, 5, 37)):
        xs = [make(shape, dtype, seed=s) for s in range(6)]
        gate = make((shape[0], shape[-1]), dtype, seed=9)
        out = [ops.trajectory_stats(*xs[:3]), ops.rel_l1(xs[0], xs[1])]
        c, d1, d2 = xs[3].clone(), xs[4].clone(), torch.empty_like(xs[0])
        out += [ops.store_residual_(c, d1, xs[0], xs[1], d2), c, d1, d2]
        hid = xs[5].clone()
        ops.apply_residual_(hid, xs[0], xs[1], torch.rand(shape[0], 2, generator=torch.Generator().manual_seed(1)), xs[2], gate)
        out.append(hid)
        n = min(shape[1], 3001)
        idx = torch.randint(0, n, (shape[0], 7 * n // 5), generator=torch.Generator().manual_seed(2))
        tok = [make((shape[0], n, 67), dtype, seed=s) for s in (7, 8)]
        vals = make((shape[0], idx.shape[1], 67), dtype, seed=9)
        out += [ops.token_update_(tok[0], idx, vals, tok[1]), tok[0], ops.gather_tokens(tok[1], idx)]
        for t in out:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_bitwise_equal_across_instruction_sets():
    """The baseline, AVX2 and AVX-512 tables (OMNICACHE_CPU_ISA caps the choice) give the
    same bits: same lanes, same order, no FMA contraction."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("C++ kernels only (main process track)")
    tests = os.path.dirname(os.path.abspath(__file__))
    digests = {}
    for isa in ("baseline", "avx2", ""):
        env = dict(os.environ, OMNICACHE_CPU_ISA=isa, OMNICACHE_BACKEND="cpu", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(tests=tests)], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        digests[isa or "best"] = proc.stdout.strip()
    assert len(set(digests.values())) == 1, digests
