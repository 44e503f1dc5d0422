"""apply_residual_: hidden += gate * (residual + γ1·correction + γ2·correction2), against
the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omnicache.ops as ops
from omnicache import reference
from opsutil import DTYPES, assert_elementwise, exact, make
from strategies import dtypes, seeds, shapes

GAMMA_MODES = ["none", "scalar", "per_sample"]


def expected(hidden, residual, correction, gamma, correction2=None, gate=None):
    h = exact(hidden)
    reference.apply_residual_(h, exact(residual), exact(correction), exact(gamma),
                              exact(correction2), exact(gate), acc=torch.float64)
    # Bound on the terms' magnitudes: float32 rounding of each is within eps32 of it.
    g1 = g2 = torch.ones(h.shape[0], 1, dtype=torch.float64)
    if gamma is not None:
        g = exact(gamma)
        if correction2 is not None:
            g = g.expand(h.shape[0], 2)
            g1, g2 = g[:, :1], g[:, 1:]
        else:
            g1 = g.expand(h.shape[0]).reshape(-1, 1)
    rows = lambda t: exact(t).reshape(h.shape[0], -1)  # noqa: E731
    s = rows(residual).abs()
    if correction is not None:
        s = s + (g1 * rows(correction)).abs()
    if correction2 is not None:
        s = s + (g2 * rows(correction2)).abs()
    s = s.reshape(h.shape)
    if gate is not None:
        s = s * exact(gate).abs().reshape(h.shape[0], *[1] * (h.dim() - 2), h.shape[-1])
    return h, exact(hidden).abs() + 2 * s


def make_gamma(mode, batch, second_order, device="cpu"):
    if mode == "none":
        return None
    if mode == "scalar":
        return torch.tensor([0.37, -0.61] if second_order else 0.37, device=device)
    g = torch.linspace(-1.5, 2.0, 2 * batch, device=device)
    return g.reshape(batch, 2) if second_order else g[:batch].contiguous()


def run_case(shape, dtype, seed, *, strided, correction, gamma_mode, correction2=False,
             gate=False, device="cpu"):
    hidden = make(shape, dtype, seed=seed, device=device)
    residual = make(shape, dtype, seed=seed + 1, strided=strided, device=device)
    corr = make(shape, dtype, seed=seed + 2, strided=strided, device=device) if correction else None
    corr2 = make(shape, dtype, seed=seed + 3, strided=strided, device=device) if correction2 else None
    gate_t = None
    if gate:
        gate_t = make((shape[0], shape[-1]), dtype, seed=seed + 4, strided=strided, device=device)
    gamma = make_gamma(gamma_mode, shape[0], correction2, device) if (correction or correction2) else None
    want, scale = expected(hidden, residual, corr, gamma, corr2, gate_t)
    ops.apply_residual_(hidden, residual, corr, gamma, corr2, gate_t)
    assert hidden.dtype == dtype and hidden.shape == shape
    assert_elementwise(hidden, want, scale)


@given(shape=shapes, dtype=dtypes, seed=seeds, strided=st.booleans(), correction=st.booleans(),
       gamma_mode=st.sampled_from(GAMMA_MODES))
def test_matches_reference(cpu_backend, shape, dtype, seed, strided, correction, gamma_mode):
    run_case(shape, dtype, seed, strided=strided, correction=correction, gamma_mode=gamma_mode)


@given(shape=shapes.filter(lambda s: len(s) >= 2), dtype=dtypes, seed=seeds,
       strided=st.booleans(), correction=st.booleans(), correction2=st.booleans(),
       gate=st.booleans(), gamma_mode=st.sampled_from(GAMMA_MODES))
def test_new_terms_match_reference(cpu_backend, shape, dtype, seed, strided, correction,
                                   correction2, gate, gamma_mode):
    """Second-order correction and the adaLN gate, in every combination."""
    run_case(shape, dtype, seed, strided=strided, correction=correction, gamma_mode=gamma_mode,
             correction2=correction2, gate=gate)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_chunks_per_sample(cpu_backend, dtype):
    run_case((3, 40007), dtype, 7, strided=True, correction=True, gamma_mode="per_sample")
    run_case((3, 11, 3637), dtype, 8, strided=True, correction=True, gamma_mode="per_sample",
             correction2=True, gate=True)


def test_old_call_equals_new_call_with_defaults(cpu_backend):
    """The four-argument call and the six-argument call with None agree bitwise."""
    x = [make((2, 3, 17), torch.bfloat16, seed=s) for s in range(3)]
    gamma = torch.tensor([0.5, -2.0])
    a, b = x[0].clone(), x[0].clone()
    ops.apply_residual_(a, x[1], x[2], gamma)
    ops.apply_residual_(b, x[1], x[2], gamma, None, None)
    assert torch.equal(a, b)


def test_second_order_only_and_gate_of_ones(cpu_backend):
    """correction2 without correction uses γ2; a gate of ones changes nothing."""
    h = make((2, 5, 8), torch.float32, seed=1)
    r, c2 = make((2, 5, 8), torch.float32, seed=2), make((2, 5, 8), torch.float32, seed=3)
    gamma = torch.tensor([[9.0, 0.5], [9.0, -1.0]])
    a, b = h.clone(), h.clone()
    ops.apply_residual_(a, r, None, gamma, c2)
    ops.apply_residual_(b, r, None, gamma, c2, torch.ones(2, 8))
    want = h + r + gamma[:, 1].view(2, 1, 1) * c2
    torch.testing.assert_close(a, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
def test_empty_is_noop(cpu_backend, shape):
    hidden = torch.empty(shape)
    ops.apply_residual_(hidden, torch.empty(shape), torch.empty(shape), torch.ones(shape[0]))
    ops.apply_residual_(hidden, torch.empty(shape), torch.empty(shape), torch.ones(shape[0], 2),
                        torch.empty(shape), torch.empty(shape[0], shape[-1]))
    assert hidden.shape == shape


def test_transposed_residual(cpu_backend):
    hidden = make((4, 6, 10), torch.float32, seed=3)
    residual = make((4, 10, 6), torch.float32, seed=4).transpose(1, 2)
    want, scale = expected(hidden, residual, None, None)
    ops.apply_residual_(hidden, residual)
    assert_elementwise(hidden, want, scale)
