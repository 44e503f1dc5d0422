"""Every op refuses bad input with a ValueError naming the argument (a TypeError for
a non-tensor), and leaves its in-place targets exactly as they were."""

import numpy as np
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


def numpy_views(dtype=np.float32):
    """Two [B, N] tensors over one numpy buffer, overlapping by half a row, each made by
    its own torch.from_numpy: two storages that share memory."""
    buf = np.random.default_rng(0).standard_normal(B * N + N // 2).astype(dtype)
    a = torch.from_numpy(buf[: B * N].reshape(B, N))
    b = torch.from_numpy(buf[N // 2 :].reshape(B, N))
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    return a, b


def frombuffer_views():
    """Two [B, N] tensors from torch.frombuffer over one bytearray, half a row apart."""
    raw = bytearray(np.random.default_rng(1).standard_normal(B * N + N // 2).astype(np.float32).tobytes())
    a = torch.frombuffer(raw, dtype=torch.float32, count=B * N).view(B, N)
    b = torch.frombuffer(raw, dtype=torch.float32, count=B * N, offset=4 * (N // 2)).view(B, N)
    return a, b


def apply_cases():
    h = t()
    a, b = buf_views()
    na, nb = numpy_views()
    fa, fb = frombuffer_views()
    h3 = t(B, 3, N)
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
        ("numpy views overlap", lambda: (na, nb, None, None), "hidden"),
        ("frombuffer views overlap", lambda: (fa, t(), fb, None), "hidden"),
        ("correction2 shape", lambda: (h3, t(B, 3, N), None, None, t(B, 3, N + 1)), "correction2"),
        ("correction2 dtype", lambda: (h3, t(B, 3, N), None, None, t(B, 3, N, dtype=torch.float16)),
         "correction2"),
        ("correction2 device", lambda: (h3, t(B, 3, N), None, None, t(B, 3, N, device="meta")),
         "correction2"),
        ("gamma [B, 1] with correction2", lambda: (h3, t(B, 3, N), t(B, 3, N), torch.ones(B, 1),
                                                   t(B, 3, N)), "gamma"),
        ("gamma [] with correction2", lambda: (h3, t(B, 3, N), t(B, 3, N), torch.tensor(1.0),
                                               t(B, 3, N)), "gamma"),
        ("gamma [B, 2] without correction2", lambda: (h3, t(B, 3, N), t(B, 3, N),
                                                      torch.ones(B, 2)), "gamma"),
        ("gamma [B+1, 2]", lambda: (h3, t(B, 3, N), None, torch.ones(B + 1, 2), t(B, 3, N)), "gamma"),
        ("gamma [3]", lambda: (h3, t(B, 3, N), None, torch.ones(3), t(B, 3, N)), "gamma"),
        ("gate shape [B, 3]", lambda: (h3, t(B, 3, N), None, None, None, t(B, 3)), "gate"),
        ("gate shape [B, 3, N]", lambda: (h3, t(B, 3, N), None, None, None, t(B, 3, N)), "gate"),
        ("gate dtype", lambda: (h3, t(B, 3, N), None, None, None, t(B, N, dtype=torch.bfloat16)),
         "gate"),
        ("gate device", lambda: (h3, t(B, 3, N), None, None, None, t(B, N, device="meta")), "gate"),
        ("gate with 1-d hidden", lambda: (t(B), t(B), None, None, None, t(B, B)), "gate"),
        ("gate inside hidden", lambda: (h, t(), None, None, None, h[:, :N]), "hidden"),
        ("correction2 inside hidden", lambda: (h3, t(B, 3, N), None, None, h3), "hidden"),
    ]


def store_cases():
    c = t()
    a, b = buf_views()
    na, nb = numpy_views()
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
        ("numpy views: cache overlaps out", lambda: (na, None, nb, t()), "cache"),
        ("numpy views: cache overlaps delta", lambda: (na, nb, t(), None), "cache"),
        ("delta2 without delta", lambda: (c, None, t(), t(), t()), "delta2"),
        ("delta2 shape", lambda: (c, t(), t(), t(), t(B, N + 1)), "delta2"),
        ("delta2 dtype", lambda: (c, t(), t(), None, t(dtype=torch.float16)), "delta2"),
        ("non-contiguous delta2", lambda: (c, t(), t(), t(), t(N, B).t()), "delta2"),
        ("delta2 is delta", lambda: (t(), c, t(), t(), c), "delta"),
        ("delta2 overlaps out", lambda: (t(), t(), b, None, a), "delta2"),
        ("delta2 overlaps cache (numpy)", lambda: (na, t(), t(), None, nb), "cache"),
        ("inp shape, no delta", lambda: (c, None, t(), t(B, 1)), "inp"),
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


K = 3


def token_cases():
    """token_update_(cache, index, values, hidden): [B, N, C] = [2, 8, 4], K = 3."""
    c, h, v = t(B, N, 4), t(B, N, 4), t(B, K, 4)
    i = torch.tensor([[0, 7, 7], [3, 1, 0]])
    buf = torch.zeros(2 * B * N * 4)  # cache and an int64 index over one buffer
    return [
        ("2-d hidden", lambda: (t(), i, v, t()), "hidden"),
        ("integer hidden", lambda: (c, i, v, torch.ones(B, N, 4, dtype=torch.int32)), "hidden"),
        ("cache shape", lambda: (t(B, N + 1, 4), i, v, h), "cache"),
        ("cache dtype", lambda: (t(B, N, 4, dtype=torch.float16), i, v, h), "cache"),
        ("cache device", lambda: (t(B, N, 4, device="meta"), i, v, h), "cache"),
        ("index int32", lambda: (c, i.int(), v, h), "index"),
        ("index float", lambda: (c, i.float(), v, h), "index"),
        ("index shape [B+1, K]", lambda: (c, torch.zeros(B + 1, K, dtype=torch.int64), v, h), "index"),
        ("index 1-d", lambda: (c, i[0], v, h), "index"),
        ("index device", lambda: (c, i.to("meta"), v, h), "index"),
        ("index = N", lambda: (c, torch.tensor([[0, N, 1], [0, 1, 2]]), v, h), "index"),
        ("index negative", lambda: (c, torch.tensor([[0, 1, 2], [-1, 1, 2]]), v, h), "index"),
        ("values shape [B, K+1, C]", lambda: (c, i, t(B, K + 1, 4), h), "values"),
        ("values shape [B, K, C+1]", lambda: (c, i, t(B, K, 5), h), "values"),
        ("values dtype", lambda: (c, i, t(B, K, 4, dtype=torch.bfloat16), h), "values"),
        ("values device", lambda: (c, i, t(B, K, 4, device="meta"), h), "values"),
        ("non-contiguous cache", lambda: (t(B, 4, N).transpose(1, 2), i, v, h), "cache"),
        ("cache is hidden", lambda: (c, i, v, c), "cache"),
        ("cache overlaps values", lambda: (c, i, c[:, :K], h), "cache"),
        ("cache overlaps index", lambda: (buf[: B * N * 4].view(B, N, 4), buf.view(torch.int64)[: B * K].view(B, K),
                                          v, h), "cache"),
    ]


def gather_cases():
    x, i = t(B, N, 4), torch.tensor([[0, 7, 7], [3, 1, 0]])
    return [
        ("2-d x", lambda: (t(), i), "x"),
        ("integer x", lambda: (torch.ones(B, N, 4, dtype=torch.int64), i), "x"),
        ("index int32", lambda: (x, i.int()), "index"),
        ("index shape", lambda: (x, i[:1]), "index"),
        ("index device", lambda: (x, i.to("meta")), "index"),
        ("index = N", lambda: (x, torch.tensor([[0, 1, 2], [N, 1, 2]])), "index"),
        ("index negative", lambda: (x, torch.tensor([[-3, 1, 2], [0, 1, 2]])), "index"),
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
    targets = [args[0], args[1], args[4] if len(args) > 4 else None]
    before = snapshot(*targets)
    with pytest.raises(ValueError, match=rf"store_residual_: .*\b{argname}\b"):
        ops.store_residual_(*args)
    assert_unchanged(targets, before)


@pytest.mark.parametrize("case", reduction_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def test_reductions_refuse(cpu_backend, case):
    opname, _, make_args, argname = case
    with pytest.raises(ValueError, match=rf"{opname}: .*\b{argname}\b"):
        getattr(ops, opname)(*make_args())


@pytest.mark.parametrize("case", token_cases(), ids=lambda c: c[0])
def test_token_update_refuses(cpu_backend, case):
    _, make_args, argname = case
    args = make_args()
    targets = [args[0]] if args[0].device.type != "meta" else []
    before = snapshot(*targets)
    with pytest.raises(ValueError, match=rf"token_update_: .*\b{argname}\b"):
        ops.token_update_(*args)
    assert_unchanged(targets, before)


@pytest.mark.parametrize("case", gather_cases(), ids=lambda c: c[0])
def test_gather_tokens_refuses(cpu_backend, case):
    _, make_args, argname = case
    with pytest.raises(ValueError, match=rf"gather_tokens: .*\b{argname}\b"):
        ops.gather_tokens(*make_args())


def test_direct_torch_ops_refuse_too():
    """torch.ops.omnicache.* called without the Python wrapper checks in C++."""
    a, b = buf_views()
    before = snapshot(a)
    with pytest.raises(ValueError, match="overlaps residual"):
        torch.ops.omnicache.apply_residual_(a, b)
    assert_unchanged([a], before)


def test_direct_torch_ops_refuse_numpy_views():
    """The C++ overlap check compares addresses: two storages over one numpy buffer."""
    a, b = numpy_views()
    before = snapshot(a)
    with pytest.raises(ValueError, match="hidden is written in place and overlaps residual"):
        torch.ops.omnicache.apply_residual_(a, b)
    assert_unchanged([a], before)
    with pytest.raises(ValueError, match="cache is written in place and overlaps out"):
        torch.ops.omnicache.store_residual_(a, None, b, None)
    assert_unchanged([a], before)


def test_disjoint_numpy_views_are_accepted(cpu_backend):
    """Two halves of one numpy buffer that do not overlap: accepted, correct result."""
    buf = np.arange(2 * B * N, dtype=np.float32)
    a = torch.from_numpy(buf[: B * N].reshape(B, N))
    b = torch.from_numpy(buf[B * N :].reshape(B, N))
    want = a + b
    ops.apply_residual_(a, b)
    assert torch.equal(a, want)


NOT_TENSORS = [None, 1.5, np.ones((B, N), dtype=np.float32), [[1.0] * N] * B]


@pytest.mark.parametrize("value", NOT_TENSORS, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("opname,position,argname", [
    ("rel_l1", 0, "a"), ("rel_l1", 1, "b"),
    ("trajectory_stats", 0, "x_next"), ("trajectory_stats", 1, "x"), ("trajectory_stats", 2, "x_prev"),
    ("apply_residual_", 0, "hidden"), ("apply_residual_", 1, "residual"),
    ("store_residual_", 0, "cache"), ("store_residual_", 2, "out"),
    ("token_update_", 0, "cache"), ("token_update_", 1, "index"), ("token_update_", 2, "values"),
    ("token_update_", 3, "hidden"), ("gather_tokens", 0, "x"), ("gather_tokens", 1, "index"),
])
def test_non_tensor_argument_is_a_type_error(cpu_backend, opname, position, argname, value):
    args = {"rel_l1": [t(), t()], "trajectory_stats": [t(), t(), t()],
            "apply_residual_": [t(), t()], "store_residual_": [t(), None, t(), t()],
            "token_update_": [t(B, N, 4), torch.zeros(B, K, dtype=torch.int64), t(B, K, 4), t(B, N, 4)],
            "gather_tokens": [t(B, N, 4), torch.zeros(B, K, dtype=torch.int64)]}[opname]
    args[position] = value
    with pytest.raises(TypeError, match=rf"{opname}: {argname} must be a Tensor"):
        getattr(ops, opname)(*args)


@pytest.mark.parametrize("value", NOT_TENSORS[1:], ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("opname,position,argname", [
    ("apply_residual_", 2, "correction"), ("apply_residual_", 3, "gamma"),
    ("apply_residual_", 4, "correction2"), ("apply_residual_", 5, "gate"),
    ("store_residual_", 1, "delta"), ("store_residual_", 3, "inp"), ("store_residual_", 4, "delta2"),
])
def test_non_tensor_optional_argument_is_a_type_error(cpu_backend, opname, position, argname, value):
    h = t()
    args = [h, t(), None, None, None, None] if opname == "apply_residual_" else [h, t(), t(), t(), None]
    args[position] = value
    before = snapshot(h)
    with pytest.raises(TypeError, match=rf"{opname}: {argname} must be a Tensor or None"):
        getattr(ops, opname)(*args)
    assert_unchanged([h], before)
