"""The kernels round float32 results to half and bf16 exactly as torch does (round to
nearest even, with subnormals, overflow to inf, inf and NaN), bit for bit."""

import pytest
import torch

import omnicache.ops as ops
from opsutil import INTERPRET


def wide_range(n: int, seed: int) -> torch.Tensor:
    """float32 values from far below the smallest half subnormal to past the half max."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.rand(n, generator=g) + 1.0
    exp = torch.randint(-30, 18, (n,), generator=g).float()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0,
                            65519.0, 65520.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14,
                            3.3895e38, -3.3895e38, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11])
    return torch.cat([sign * mant * torch.exp2(exp), special])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_store_residual_rounds_like_torch(cpu_backend, dtype):
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates when casting to bf16 (a known limitation)")
    # Differences of two exactly representable values give float32 results that are
    # not representable in dtype: each lands somewhere between two dtype values.
    x = wide_range(4096, 0).to(dtype)
    y = (wide_range(4096, 1) * 2.0**-9).to(dtype)
    out, inp = x.reshape(4, -1), y.reshape(4, -1)
    cache, delta = torch.zeros_like(out), torch.zeros_like(out)  # old = 0: delta = new
    ops.store_residual_(cache, delta, out, inp)
    want = (out.float() - inp.float()).to(dtype)
    for name, got in (("cache", cache), ("delta", delta)):
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        assert same.all(), f"{name}: {int((~same).sum())} values rounded differently from torch"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inputs_widen_exactly(cpu_backend, dtype):
    """Every finite bit pattern of the dtype reads back unchanged (residual of zeros)."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 emulation flushes subnormals (and truncates)")
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    values = values[values.isfinite()].reshape(1, -1)
    hidden = values.clone()
    ops.apply_residual_(hidden, torch.zeros_like(hidden))
    # x + 0 == x bitwise, except -0 + 0 = +0 (IEEE), as in torch.
    want = (values.float() + 0.0).to(dtype)
    assert torch.equal(hidden.view(torch.int16), want.view(torch.int16))
