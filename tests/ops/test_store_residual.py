"""store_residual_: cache = out - inp (or out), delta = new - old, delta2 = delta's
change, [B,4] statistics."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omnicache.ops as ops
from omnicache import reference
from opsutil import DTYPES, rows, assert_elementwise, assert_stats, exact, make
from strategies import dtypes, seeds, shapes


def run_case(shape, dtype, seed, *, strided, with_delta, with_inp=True, with_delta2=False,
             device="cpu"):
    cache = make(shape, dtype, seed=seed, device=device)
    delta = None
    if with_delta2:
        delta = make(shape, dtype, seed=seed + 3, device=device)  # the old delta is read
    elif with_delta:
        delta = torch.full(shape, 123.0, dtype=dtype, device=device)
    delta2 = torch.full(shape, -7.0, dtype=dtype, device=device) if with_delta2 else None
    out = make(shape, dtype, seed=seed + 1, strided=strided, device=device)
    inp = make(shape, dtype, seed=seed + 2, strided=strided, device=device) if with_inp else None

    cache64, delta64, delta2_64 = exact(cache), exact(delta), exact(delta2)
    old_delta = exact(delta)
    stats64 = reference.store_residual_(cache64, delta64, exact(out), exact(inp), delta2_64,
                                        acc=torch.float64)
    new_scale = exact(out).abs() + (exact(inp).abs() if with_inp else 0)
    old = exact(cache)
    term_scale = torch.stack(
        [rows(new_scale + old.abs()).sum(1), rows(old.abs()).sum(1),
         rows((new_scale + old.abs()) ** 2).sum(1), rows(old**2).sum(1)], dim=1)

    stats = ops.store_residual_(cache, delta, out, inp, delta2)
    assert_stats(stats, stats64, term_scale)
    assert_elementwise(cache, cache64, new_scale)
    if delta is not None:
        assert_elementwise(delta, delta64, new_scale + old.abs())
    if with_delta2:
        # delta2 is formed from the unrounded d1, as in the reference.
        assert_elementwise(delta2, delta2_64, new_scale + old.abs() + old_delta.abs())


@given(shape=shapes, dtype=dtypes, seed=seeds, strided=st.booleans(), with_delta=st.booleans())
def test_matches_reference(cpu_backend, shape, dtype, seed, strided, with_delta):
    run_case(shape, dtype, seed, strided=strided, with_delta=with_delta)


@given(shape=shapes, dtype=dtypes, seed=seeds, strided=st.booleans(),
       mode=st.sampled_from(["no-inp", "no-inp-delta", "delta2", "no-inp-delta2"]))
def test_new_arguments_match_reference(cpu_backend, shape, dtype, seed, strided, mode):
    """inp=None (branch caching stores the output itself) and delta2 (second order)."""
    run_case(shape, dtype, seed, strided=strided, with_delta="delta" in mode,
             with_inp="no-inp" not in mode, with_delta2="delta2" in mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
def test_many_chunks_per_sample(cpu_backend, dtype, with_delta):
    run_case((2, 50001), dtype, 11, strided=False, with_delta=with_delta)
    run_case((2, 50001), dtype, 12, strided=True, with_delta=with_delta, with_inp=False,
             with_delta2=with_delta)


def test_three_stores_give_the_finite_differences(cpu_backend):
    """F, D1 = F - F_prev, D2 = D1 - D1_prev over three steps, exactly in float32."""
    outs = [torch.randn(2, 3, 8) for _ in range(3)]
    cache, d1, d2 = torch.zeros(2, 3, 8), torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)
    for o in outs:
        ops.store_residual_(cache, d1, o, None, d2)
    assert torch.equal(cache, outs[2])
    torch.testing.assert_close(d1, outs[2] - outs[1])
    torch.testing.assert_close(d2, (outs[2] - outs[1]) - (outs[1] - outs[0]))


def test_old_call_equals_new_call_with_defaults(cpu_backend):
    out, inp = torch.randn(3, 40), torch.randn(3, 40)
    c1 = torch.randn(3, 40)
    c2 = c1.clone()
    d1, d2 = torch.zeros(3, 40), torch.zeros(3, 40)
    s1 = ops.store_residual_(c1, d1, out, inp)
    s2 = ops.store_residual_(c2, d2, out, inp, None)
    assert torch.equal(s1, s2) and torch.equal(c1, c2) and torch.equal(d1, d2)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_returns_zeros(cpu_backend, shape):
    stats = ops.store_residual_(torch.empty(shape), torch.empty(shape), torch.empty(shape),
                                torch.empty(shape))
    assert stats.shape == (shape[0], 4) and stats.dtype == torch.float32
    assert not stats.any()
    stats = ops.store_residual_(torch.empty(shape), torch.empty(shape), torch.empty(shape),
                                None, torch.empty(shape))
    assert stats.shape == (shape[0], 4) and not stats.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_call_streams_the_same_bits(cpu_backend, dtype):
    """Tensors of >= 32 MiB take the streaming-store path for delta and delta2: the
    elementwise outputs equal the float32 reference bit for bit, as on small calls."""
    if cpu_backend != "cpu":
        pytest.skip("the streaming stores are in the C++ kernels (and the interpreter truncates bf16)")
    # + 17: the second sample starts misaligned (regular stores there), the first aligned.
    n = (32 << 20) // torch.empty((), dtype=dtype).element_size() // 2 + 17
    g = torch.Generator().manual_seed(0)
    out, inp, cache, delta = (torch.randn(2, n, generator=g).to(dtype) for _ in range(4))
    c, d1, d2 = cache.clone(), delta.clone(), torch.empty_like(cache)
    want_c, want_d1, want_d2 = cache.clone(), delta.clone(), torch.empty_like(cache)
    reference.store_residual_(want_c, want_d1, out, inp, want_d2)
    ops.store_residual_(c, d1, out, inp, d2)
    assert torch.equal(c, want_c) and torch.equal(d1, want_d1) and torch.equal(d2, want_d2)
    c, d1 = cache.clone(), torch.empty_like(cache)
    ops.store_residual_(c, d1, out, None)
    assert torch.equal(d1, (out.float() - cache.float()).to(dtype))
