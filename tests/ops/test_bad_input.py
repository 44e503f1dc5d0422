"""Every op refuses bad input with a ValueError naming the argument, and leaves its
in-place targets exactly as they were."""

import pytest
import torch

import omnicache.ops as ops

B, N = 2, 8


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape or (B, N)).to(dtype=dtype, device=device)


def buf_views():
    """Two [B, N] views of one buffer that overlap by half a row."""
    buf = torch.randn(B * N + N // 2)
    return buf[: B * N].view(B, N), buf[N // 2 :].view(B, N)


def apply_cases():
    h = t()
    a, b = buf_views()
    gview = torch.randn(B * N)  # gamma that is a view of the target's memory
    return [
        ("residual shape", lambda: (h, t(B, N + 1), None, None), "residual"),
        ("correction shape", lambda: (h, t(), t(B + 1, N), None), "correction"),
        ("residual dtype", lambda: (h, t(dtype=torch.float16), None, None), "residual"),
        ("integer hidden", lambda: (torch.ones(B, N, dtype=torch.int32),
                                    torch.ones(B, N, dtype=torch.int32), None, None), "hidden"),
        ("float64 hidden", lambda: (t(dtype=torch.float64), t(dtype=torch.float64), None, None), "hidden"),
        ("residual device", lambda: (h, t(device="meta"), None, None), "residual"),
        ("gamma shape [B+1]", lambda: (h, t(), t(), torch.ones(B + 1)), "gamma"),
        ("gamma shape [B,1]", lambda: (h, t(), t(), torch.ones(B, 1)), "gamma"),
        ("gamma dtype", lambda: (h, t(), t(), torch.ones(B, dtype=torch.float16)), "gamma"),
        ("gamma without correction", lambda: (h, t(), None, torch.ones(B)), "gamma"),
        ("gamma device", lambda: (h, t(), t(), torch.ones(B, device="meta")), "gamma"),
        ("0-d hidden", lambda: (torch.tensor(1.0), torch.tensor(1.0), None, None), "hidden"),
        ("non-contiguous hidden", lambda: (t(N, B).t(), t(), None, None), "hidden"),
        ("column slice target", lambda: (h[:, : N // 2], h[:, N // 2 :], None, None), "hidden"),
        ("hidden is residual", lambda: (h, h, None, None), "hidden"),
        ("overlapping residual", lambda: (a, b, None, None), "hidden"),
        ("overlapping correction", lambda: (a, t(), b, None), "hidden"),
        ("gamma inside hidden", lambda: (gview.view(B, N), t(), t(), gview[:B]), "hidden"),
    ]


def store_cases():
    c = t()
    a, b = buf_views()
    return [
        ("out shape", lambda: (c, None, t(B, N - 1), t()), "out"),
        ("inp dtype", lambda: (c, None, t(), t(dtype=torch.bfloat16)), "inp"),
        ("delta shape", lambda: (c, t(B, 1), t(), t()), "delta"),
        ("integer cache", lambda: (torch.zeros(B, N, dtype=torch.int64), None,
                                   torch.zeros(B, N, dtype=torch.int64),
                                   torch.zeros(B, N, dtype=torch.int64)), "cache"),
        ("out device", lambda: (c, None, t(device="meta"), t()), "out"),
        ("non-contiguous cache", lambda: (t(N, B).t(), None, t(), t()), "cache"),
        ("non-contiguous delta", lambda: (c, t(N, B).t(), t(), t()), "delta"),
        ("cache is delta", lambda: (c, c, t(), t()), "cache"),
        ("cache is out", lambda: (c, None, c, t()), "cache"),
        ("cache overlaps inp", lambda: (a, None, t(), b), "cache"),
        ("delta overlaps out", lambda: (c, a, b, t()), "delta"),
    ]


def reduction_cases():
    return [
        ("trajectory_stats", "shape", lambda: (t(), t(B, N + 1), t()), "x"),
        ("trajectory_stats", "dtype", lambda: (t(), t(), t(dtype=torch.float16)), "x_prev"),
        ("trajectory_stats", "integer", lambda: (torch.ones(B, N, dtype=torch.int16),) * 3, "x_next"),
        ("trajectory_stats", "device", lambda: (t(), t(device="meta"), t()), "x"),
        ("rel_l1", "shape", lambda: (t(), t(B + 1, N)), "b"),
        ("rel_l1", "dtype", lambda: (t(dtype=torch.bfloat16), t()), "b"),
        ("rel_l1", "integer", lambda: (torch.ones(B, N, dtype=torch.uint8),) * 2, "a"),
        ("rel_l1", "device", lambda: (t(), t(device="meta")), "b"),
        ("rel_l1", "0-d", lambda: (torch.tensor(1.0), torch.tensor(2.0)), "a"),
    ]


def snapshot(*targets):
    return [None if x is None else x.detach().clone() for x in targets]


def assert_unchanged(targets, before):
    for x, x0 in zip(targets, before):
        if x is not None:
            assert torch.equal(x, x0), "an in-place target was modified by a refused call"


@pytest.mark.parametrize("case", apply_cases(), ids=lambda c: c[0])
def test_apply_residual_refuses(cpu_backend, case):
    _, make_args, argname = case
    args = make_args()
    before = snapshot(args[0])
    with pytest.raises(ValueError, match=rf"apply_residual_: .*\b{argname}\b"):
        ops.apply_residual_(*args)
    assert_unchanged([args[0]], before)


@pytest.mark.parametrize("case", store_cases(), ids=lambda c: c[0])
def test_store_residual_refuses(cpu_backend, case):
    _, make_args, argname = case
    args = make_args()
    before = snapshot(args[0], args[1])
    with pytest.raises(ValueError, match=rf"store_residual_: .*\b{argname}\b"):
        ops.store_residual_(*args)
    assert_unchanged([args[0], args[1]], before)


@pytest.mark.parametrize("case", reduction_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def test_reductions_refuse(cpu_backend, case):
    opname, _, make_args, argname = case
    with pytest.raises(ValueError, match=rf"{opname}: .*\b{argname}\b"):
        getattr(ops, opname)(*make_args())


def test_direct_torch_ops_refuse_too():
    """torch.ops.omnicache.* called without the Python wrapper checks in C++."""
    a, b = buf_views()
    before = snapshot(a)
    with pytest.raises(ValueError, match="overlaps residual"):
        torch.ops.omnicache.apply_residual_(a, b)
    assert_unchanged([a], before)
