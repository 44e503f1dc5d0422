"""apply_residual_: hidden += residual + gamma[b] * correction, against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import omnicache.ops as ops
from omnicache import reference
from opsutil import DTYPES, assert_elementwise, exact, make
from strategies import dtypes, seeds, shapes


def expected(hidden, residual, correction, gamma):
    h = exact(hidden)
    reference.apply_residual_(h, exact(residual), exact(correction), exact(gamma), acc=torch.float64)
    scale = exact(hidden).abs() + exact(residual).abs()
    if correction is not None:
        g = 1.0 if gamma is None else exact(gamma).expand(h.shape[0]).reshape(-1, *[1] * (h.dim() - 1))
        scale = scale + (g * exact(correction)).abs()
    return h, scale


def run_case(shape, dtype, seed, *, strided, correction, gamma_mode, device="cpu"):
    hidden = make(shape, dtype, seed=seed, device=device)
    residual = make(shape, dtype, seed=seed + 1, strided=strided, device=device)
    corr = make(shape, dtype, seed=seed + 2, strided=strided, device=device) if correction else None
    gamma = None
    if correction and gamma_mode == "scalar":
        gamma = torch.tensor(0.37, device=device)
    elif correction and gamma_mode == "per_sample":
        gamma = torch.linspace(-1.5, 2.0, shape[0], device=device)
    want, scale = expected(hidden, residual, corr, gamma)
    ops.apply_residual_(hidden, residual, corr, gamma)
    assert hidden.dtype == dtype and hidden.shape == shape
    assert_elementwise(hidden, want, scale)


@given(shape=shapes, dtype=dtypes, seed=seeds, strided=st.booleans(), correction=st.booleans(),
       gamma_mode=st.sampled_from(["none", "scalar", "per_sample"]))
def test_matches_reference(cpu_backend, shape, dtype, seed, strided, correction, gamma_mode):
    run_case(shape, dtype, seed, strided=strided, correction=correction, gamma_mode=gamma_mode)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_chunks_per_sample(cpu_backend, dtype):
    run_case((3, 40007), dtype, 7, strided=True, correction=True, gamma_mode="per_sample")


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
def test_empty_is_noop(cpu_backend, shape):
    hidden = torch.empty(shape)
    ops.apply_residual_(hidden, torch.empty(shape), torch.empty(shape), torch.ones(shape[0]))
    assert hidden.shape == shape


def test_transposed_residual(cpu_backend):
    hidden = make((4, 6, 10), torch.float32, seed=3)
    residual = make((4, 10, 6), torch.float32, seed=4).transpose(1, 2)
    want, scale = expected(hidden, residual, None, None)
    ops.apply_residual_(hidden, residual)
    assert_elementwise(hidden, want, scale)
