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


def order2_step(hidden, cache, delta, delta2, gamma2, gate, out, inp):
    """A second-order store (F, D1, D2 in one call, as TaylorSeer order 2) followed by a
    gated second-order reuse, with reads of the caches between and after."""
    before = delta * 1  # the old D1, read before the store writes it
    stats = ops.store_residual_(cache, delta, out, inp, delta2)
    branch = ops.store_residual_(torch.zeros_like(cache), None, out, None)  # inp=None
    ops.apply_residual_(hidden, cache, delta, gamma2, delta2, gate)
    return hidden * 2, stats, branch, before, delta2 + 0, delta * 1, cache - 0


def order2_inputs(dtype):
    shape = (2, 9, 16)
    return dict(hidden=make(shape, dtype, seed=1), cache=make(shape, dtype, seed=2),
                delta=make(shape, dtype, seed=3), delta2=torch.zeros(shape, dtype=dtype),
                gamma2=torch.tensor([[0.5, 0.25], [-1.0, 2.0]]), gate=make((2, 16), dtype, seed=6),
                out=make(shape, dtype, seed=4), inp=make(shape, dtype, seed=5))


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


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_order2_store_and_gated_reuse_compile(cpu_backend, backend):
    """Order-2 store and gated reuse under fullgraph compile equal eager, in-place
    writes included: the schema's alias annotations (a!, b!, c!) order the reads of
    delta before and after the store (the mis-ordering the engines used to dodge)."""
    compiled_equals_eager(order2_step, order2_inputs, cpu_backend, backend,
                          ("hidden", "cache", "delta", "delta2"))


def compiled_equals_eager(step, make_inputs, cpu_backend, backend, written):
    """``step`` under fullgraph compile returns what eager returns, bit for bit, and
    leaves the same values in the tensors it writes in place (``written``)."""
    if backend == "inductor" and cpu_backend == "torch":
        pytest.skip("the torch backend is re-fused by inductor: covered by the aot_eager run")
    torch._dynamo.reset()
    eager_args, compiled_args = make_inputs(torch.float32), make_inputs(torch.float32)
    want = step(**eager_args)
    got = torch.compile(step, fullgraph=True, backend=backend)(**compiled_args)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for name in written:
        assert torch.equal(eager_args[name], compiled_args[name]), name


def toca_step(cache, index, hidden):
    """A ToCa unit step: gather the recomputed tokens, run the unit on them (x 2: exact,
    so inductor cannot round it differently), update the cache; reads of the cache
    before and after the in-place update."""
    before = cache * 1
    values = ops.gather_tokens(hidden, index) * 2
    out = ops.token_update_(cache, index, values, hidden)
    return out * 2, before, cache - 0


def toca_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return dict(cache=make((2, 11, 16), dtype, seed=1), index=torch.randint(0, 11, (2, 6), generator=g),
                hidden=make((2, 11, 16), dtype, seed=2))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_token_ops_compile(cpu_backend, backend):
    """gather_tokens and token_update_ (cache mutated: Tensor(a!)) under fullgraph compile
    equal eager, the in-place update included."""
    compiled_equals_eager(toca_step, toca_inputs, cpu_backend, backend, ("cache",))
