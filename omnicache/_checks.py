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
