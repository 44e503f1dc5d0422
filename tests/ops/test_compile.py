"""torch.compile(fullgraph=True) of code that calls every op: no graph break, and the
same results as eager."""

import pytest
import torch

import omnicache.ops as ops
from opsutil import make


def cache_step(hidden, residual, delta, gamma, out, inp, x_prev):
    """One caching step's bookkeeping, touching all four ops."""
    stats = ops.store_residual_(residual, delta, out, inp)
    ops.apply_residual_(hidden, residual, delta, gamma)
    curv = ops.trajectory_stats(out, inp, x_prev)
    dist = ops.rel_l1(out, inp)
    return hidden * 2, stats, curv, dist


def inputs(dtype):
    shape = (2, 9, 16)
    return dict(hidden=make(shape, dtype, seed=1), residual=make(shape, dtype, seed=2),
                delta=torch.zeros(shape, dtype=dtype), gamma=torch.tensor([0.5, -1.0]),
                out=make(shape, dtype, seed=3), inp=make(shape, dtype, seed=4),
                x_prev=make(shape, dtype, seed=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fullgraph_compile_equals_eager(cpu_backend, dtype):
    torch._dynamo.reset()
    eager_args, compiled_args = inputs(dtype), inputs(dtype)
    want = cache_step(**eager_args)
    got = torch.compile(cache_step, fullgraph=True, backend="aot_eager")(**compiled_args)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for name in ("hidden", "residual", "delta"):  # the in-place writes happened too
        assert torch.equal(eager_args[name], compiled_args[name]), name


def test_inductor_compile_equals_eager(cpu_backend):
    """The default backend (inductor) too, float32; one run because it is slow on CPU.

    The kernels are opaque to inductor, so their results are bitwise-equal; the torch
    backend's sums are re-fused by inductor and agree to float32 rounding."""
    torch._dynamo.reset()
    eager_args, compiled_args = inputs(torch.float32), inputs(torch.float32)
    want = cache_step(**eager_args)
    got = torch.compile(cache_step, fullgraph=True)(**compiled_args)
    tol = dict(rtol=1e-6, atol=1e-4) if cpu_backend == "torch" else dict(rtol=0, atol=0)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, **tol)
    torch.testing.assert_close(compiled_args["hidden"], eager_args["hidden"], **tol)
