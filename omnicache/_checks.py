"""Argument checks for the Python-side backends (triton, torch) and the fake impls.

Mirrors csrc/checks.cpp rule for rule, so every backend refuses the same inputs
with a ``ValueError`` naming the op and the argument, before anything is written.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(op: str, message: str) -> None:
    raise ValueError(f"omnicache.{op}: {message}")


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta"


def _byte_range(t: Tensor) -> tuple[int, int]:
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _overlaps(a: Tensor, b: Tensor) -> bool:
    # Fake tensors and traced code have no addresses: overlap is checked when the
    # kernel runs (the C++ ops check it themselves).
    if torch.compiler.is_compiling() or _is_fake(a) or _is_fake(b):
        return False
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    # Addresses, not storages: two storages can share memory (torch.from_numpy or
    # torch.frombuffer views of one buffer).
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_types(op: str, required: dict, optional: dict | None = None) -> None:
    """Every ``required`` value is a Tensor, every ``optional`` one a Tensor or None:
    a ``TypeError`` naming the argument otherwise (before anything else looks at it)."""
    for name, value in required.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"omnicache.{op}: {name} must be a Tensor, got {type(value).__name__}")
    for name, value in (optional or {}).items():
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"omnicache.{op}: {name} must be a Tensor or None, "
                            f"got {type(value).__name__}")


def _check_like(op: str, ref: tuple[str, Tensor], others: list[tuple[str, Tensor]]) -> None:
    rname, r = ref
    if r.dtype not in FLOAT_DTYPES:
        _fail(op, f"{rname} must be float32, float16 or bfloat16, got {_dtype(r)}")
    if r.dim() < 1:
        _fail(op, f"{rname} must have a batch dimension (dim >= 1), got a 0-d tensor")
    for name, t in others:
        if t.device != r.device:
            _fail(op, f"{name} is on {t.device} but {rname} is on {r.device}")
        if t.dtype != r.dtype:
            _fail(op, f"{name} has dtype {_dtype(t)} but {rname} has dtype {_dtype(r)}")
        if t.shape != r.shape:
            _fail(op, f"{name} has shape {_fmt(t.shape)} but {rname} has shape {_fmt(r.shape)}")


def _check_target(op: str, target: tuple[str, Tensor], others: list[tuple[str, Tensor]]) -> None:
    tname, t = target
    if not t.is_contiguous():
        _fail(op, f"{tname} is written in place and must be contiguous")
    for name, o in others:
        if _overlaps(t, o):
            _fail(op, f"{tname} is written in place and overlaps {name}")


def _check_gamma(op: str, gamma: Tensor, hidden: Tensor, second_order: bool) -> None:
    if gamma.dtype != torch.float32:
        _fail(op, f"gamma must be float32, got {_dtype(gamma)}")
    if gamma.device != hidden.device:
        _fail(op, f"gamma is on {gamma.device} but hidden is on {hidden.device}")
    b = hidden.shape[0]
    if second_order:
        if tuple(gamma.shape) not in ((2,), (b, 2)):
            _fail(op, f"gamma must have shape [2] or [B, 2] = [{b}, 2] (γ1, γ2) when "
                      f"correction2 is given, got {_fmt(gamma.shape)}")
    elif not (gamma.dim() == 0 or (gamma.dim() == 1 and gamma.shape[0] == b)):
        _fail(op, f"gamma must have shape [] or [B] = [{b}], got {_fmt(gamma.shape)}")


def _check_gate(op: str, gate: Tensor, hidden: Tensor) -> None:
    if hidden.dim() < 2:
        _fail(op, f"gate needs hidden of shape [B, ..., D], got {_fmt(hidden.shape)}")
    if gate.device != hidden.device:
        _fail(op, f"gate is on {gate.device} but hidden is on {hidden.device}")
    if gate.dtype != hidden.dtype:
        _fail(op, f"gate has dtype {_dtype(gate)} but hidden has dtype {_dtype(hidden)}")
    want = (hidden.shape[0], hidden.shape[-1])
    if tuple(gate.shape) != want:
        _fail(op, f"gate must have shape [B, D] = {_fmt(want)}, got {_fmt(gate.shape)}")


def check_apply_residual(hidden: Tensor, residual: Tensor, correction: Tensor | None = None,
                         gamma: Tensor | None = None, correction2: Tensor | None = None,
                         gate: Tensor | None = None) -> None:
    op = "apply_residual_"
    check_types(op, {"hidden": hidden, "residual": residual},
                {"correction": correction, "gamma": gamma, "correction2": correction2, "gate": gate})
    reads = [("residual", residual)]
    reads += [("correction", correction)] if correction is not None else []
    reads += [("correction2", correction2)] if correction2 is not None else []
    _check_like(op, ("hidden", hidden), reads)
    if gamma is not None:
        if correction is None and correction2 is None:
            _fail(op, "gamma is given but correction is None")
        _check_gamma(op, gamma, hidden, correction2 is not None)
        reads.append(("gamma", gamma))
    if gate is not None:
        _check_gate(op, gate, hidden)
        reads.append(("gate", gate))
    _check_target(op, ("hidden", hidden), reads)


def check_store_residual(cache: Tensor, delta: Tensor | None, out: Tensor, inp: Tensor | None,
                         delta2: Tensor | None = None) -> None:
    op = "store_residual_"
    check_types(op, {"cache": cache, "out": out}, {"delta": delta, "inp": inp, "delta2": delta2})
    if delta2 is not None and delta is None:
        _fail(op, "delta2 is given but delta is None (delta2 = new delta - old delta)")
    reads = [("out", out)] + ([("inp", inp)] if inp is not None else [])
    targets = [("cache", cache)]
    targets += [("delta", delta)] if delta is not None else []
    targets += [("delta2", delta2)] if delta2 is not None else []
    _check_like(op, ("cache", cache), targets[1:] + reads)
    for k, target in enumerate(targets):
        _check_target(op, target, targets[:k] + targets[k + 1:] + reads)


def check_trajectory_stats(x_next: Tensor, x: Tensor, x_prev: Tensor) -> None:
    check_types("trajectory_stats", {"x_next": x_next, "x": x, "x_prev": x_prev})
    _check_like("trajectory_stats", ("x_next", x_next), [("x", x), ("x_prev", x_prev)])


def check_rel_l1(a: Tensor, b: Tensor) -> None:
    check_types("rel_l1", {"a": a, "b": b})
    _check_like("rel_l1", ("a", a), [("b", b)])


# ------------------------------------------------------------------ token ops
INT32_MAX = 2**31 - 1


def _check_tokens(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, float16 or bfloat16, got {_dtype(t)}")
    if t.dim() != 3:
        _fail(op, f"{name} must have shape [B, N, C], got {_fmt(t.shape)}")


def _check_index(op: str, index: Tensor, ref: tuple[str, Tensor]) -> None:
    """int64 ``[B, K]`` on ref's device; on the CPU every entry in ``[0, N)`` (on a GPU
    that would synchronise: the kernels handle it on the device, see reference.py)."""
    rname, r = ref
    if index.dtype != torch.int64:
        _fail(op, f"index must be int64, got {_dtype(index)}")
    if index.device != r.device:
        _fail(op, f"index is on {index.device} but {rname} is on {r.device}")
    if index.dim() != 2 or index.shape[0] != r.shape[0]:
        _fail(op, f"index must have shape [B, K] with B = {r.shape[0]}, got {_fmt(index.shape)}")
    if index.shape[1] > INT32_MAX:
        _fail(op, f"index has {index.shape[1]} columns; at most {INT32_MAX}")
    n = r.shape[1]
    if (index.device.type == "cpu" and index.numel() and not _is_fake(index)
            and not torch.compiler.is_compiling()):
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= n:
            _fail(op, f"index must lie in [0, N) = [0, {n}), got values from {lo} to {hi}")


def check_token_update(cache: Tensor, index: Tensor, values: Tensor, hidden: Tensor) -> None:
    op = "token_update_"
    check_types(op, {"cache": cache, "index": index, "values": values, "hidden": hidden})
    _check_tokens(op, "hidden", hidden)
    _check_like(op, ("hidden", hidden), [("cache", cache)])
    _check_index(op, index, ("hidden", hidden))
    if values.device != hidden.device:
        _fail(op, f"values is on {values.device} but hidden is on {hidden.device}")
    if values.dtype != hidden.dtype:
        _fail(op, f"values has dtype {_dtype(values)} but hidden has dtype {_dtype(hidden)}")
    want = (hidden.shape[0], index.shape[1], hidden.shape[2])
    if tuple(values.shape) != want:
        _fail(op, f"values must have shape [B, K, C] = {_fmt(want)}, got {_fmt(values.shape)}")
    _check_target(op, ("cache", cache), [("hidden", hidden), ("values", values), ("index", index)])


def check_gather_tokens(x: Tensor, index: Tensor) -> None:
    check_types("gather_tokens", {"x": x, "index": index})
    _check_tokens("gather_tokens", "x", x)
    _check_index("gather_tokens", index, ("x", x))
