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
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


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


def check_apply_residual(hidden: Tensor, residual: Tensor, correction: Tensor | None,
                         gamma: Tensor | None) -> None:
    op = "apply_residual_"
    reads = [("residual", residual)] + ([("correction", correction)] if correction is not None else [])
    _check_like(op, ("hidden", hidden), reads)
    if gamma is not None:
        if correction is None:
            _fail(op, "gamma is given but correction is None")
        if gamma.dtype != torch.float32:
            _fail(op, f"gamma must be float32, got {_dtype(gamma)}")
        if gamma.device != hidden.device:
            _fail(op, f"gamma is on {gamma.device} but hidden is on {hidden.device}")
        if not (gamma.dim() == 0 or (gamma.dim() == 1 and gamma.shape[0] == hidden.shape[0])):
            _fail(op, f"gamma must have shape [] or [B] = [{hidden.shape[0]}], got {_fmt(gamma.shape)}")
        reads.append(("gamma", gamma))
    _check_target(op, ("hidden", hidden), reads)


def check_store_residual(cache: Tensor, delta: Tensor | None, out: Tensor, inp: Tensor) -> None:
    op = "store_residual_"
    reads = [("out", out), ("inp", inp)]
    if delta is None:
        _check_like(op, ("cache", cache), reads)
        _check_target(op, ("cache", cache), reads)
    else:
        _check_like(op, ("cache", cache), [("delta", delta)] + reads)
        _check_target(op, ("cache", cache), [("delta", delta)] + reads)
        _check_target(op, ("delta", delta), [("cache", cache)] + reads)


def check_trajectory_stats(x_next: Tensor, x: Tensor, x_prev: Tensor) -> None:
    _check_like("trajectory_stats", ("x_next", x_next), [("x", x), ("x_prev", x_prev)])


def check_rel_l1(a: Tensor, b: Tensor) -> None:
    _check_like("rel_l1", ("a", a), [("b", b)])
