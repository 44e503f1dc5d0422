"""Shared helpers for the op tests: which backends run here, inputs, tolerances."""

from __future__ import annotations

import contextlib
import os

import torch

import omnicache.ops as ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cpu_backends() -> list[str]:
    """Backends exercised on CPU tensors in this process.

    Under TRITON_INTERPRET=1 (the interpreter track, a separate pytest process) only
    the Triton kernels; otherwise the C++ kernels and the torch reference backend.
    """
    return ["triton"] if INTERPRET else ["cpu", "torch"]


def gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b for b in ("cuda", "triton") if b in ops.available_backends()]


@contextlib.contextmanager
def backend(name: str):
    previous = ops.get_backend()
    ops.set_backend(name)
    try:
        yield
    finally:
        ops.set_backend(previous)


def make(shape, dtype, *, seed: int, strided: bool = False, device="cpu") -> torch.Tensor:
    """Random input; ``strided`` gives a non-contiguous view with the same values layout."""
    g = torch.Generator().manual_seed(seed)
    if not strided:
        return torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    # Every other element of a wider buffer: a strided read-only input.
    wide = torch.randn((*shape[:-1], shape[-1] * 2), generator=g).to(dtype=dtype, device=device)
    return wide[..., ::2]


def exact(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64)


def assert_elementwise(actual: torch.Tensor, expected64: torch.Tensor, scale64: torch.Tensor):
    """``actual`` (any float dtype) equals the float64 result rounded to its dtype,
    within one ulp of that dtype; ``scale64`` bounds the terms for cancellation."""
    eps = torch.finfo(actual.dtype).eps
    a = actual.detach().to("cpu", torch.float64)
    tol = eps * expected64.abs() + 4 * torch.finfo(torch.float32).eps * scale64 + 1e-30
    bad = (a - expected64).abs() > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements off; worst |err| "
        f"{(a - expected64).abs().max().item():.3g} (dtype {actual.dtype})"
    )


def assert_stats(actual: torch.Tensor, expected64: torch.Tensor, scale64: torch.Tensor):
    """float32 reductions vs float64: error within 1e-5 of the sum of |terms|."""
    assert actual.dtype == torch.float32 and actual.shape == expected64.shape
    err = (actual.detach().to("cpu", torch.float64) - expected64).abs()
    tol = 1e-5 * scale64 + 1e-30
    assert (err <= tol).all(), f"stats off: err {err.max().item():.3g}, tol {tol.min().item():.3g}"


def rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` view of a ``[B, ...]`` tensor (also for 1-D tensors)."""
    return t.reshape(t.shape[0], -1)
