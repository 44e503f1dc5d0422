"""The omnicache ops: fused bookkeeping for DiT feature caching.

``import omnicache.ops`` loads the compiled library, which registers
``torch.ops.omnicache.{apply_residual_, store_residual_, trajectory_stats, rel_l1,
token_update_, gather_tokens}``
(C++ kernels for CPU, CUDA kernels when built), registers the Triton kernels as the
opaque custom ops ``torch.ops.omnicache_triton.*``, and gives each op's fake impl so
all of them trace under ``torch.compile(fullgraph=True)``.

The functions below are what engines call. Each picks a backend:

- ``cpu``: the C++ kernels (CPU tensors);
- ``cuda``: the CUDA kernels (CUDA tensors; present when built against a CUDA torch);
- ``triton``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``torch``: :mod:`omnicache.reference`, the pure-torch specification;
- ``auto`` (default): ``cpu`` on CPU tensors; on CUDA tensors the backend measured
  faster for the op and size on this device (``omnicache/data/auto_backend.json``,
  written by ``benchmarks/auto_backend.py``), else ``cuda`` if built, else ``triton``.

``set_backend`` or the environment variable ``OMNICACHE_BACKEND`` chooses; a backend
that is not built or cannot run here is an error that names it, never a silent
substitute. Every backend checks its arguments before it writes anything, so a
refused call leaves the in-place target exactly as it was.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.omnicache.*)
from . import _checks, reference

__all__ = [
    "apply_residual_",
    "store_residual_",
    "trajectory_stats",
    "rel_l1",
    "token_update_",
    "gather_tokens",
    "set_backend",
    "get_backend",
    "available_backends",
]

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
OPS = ("apply_residual_", "store_residual_", "trajectory_stats", "rel_l1", "token_update_", "gather_tokens")


# ----------------------------------------------------------------------------- fakes
# Shapes only, plus the same argument checks as the kernels (minus the memory-overlap
# test, which fake tensors cannot do).
def _fake_apply_residual_(hidden, residual, correction=None, gamma=None, correction2=None,
                          gate=None):
    _checks.check_apply_residual(hidden, residual, correction, gamma, correction2, gate)


def _fake_store_residual_(cache, delta, out, inp, delta2=None):
    _checks.check_store_residual(cache, delta, out, inp, delta2)
    return cache.new_empty((cache.shape[0], 4), dtype=torch.float32)


def _fake_trajectory_stats(x_next, x, x_prev):
    _checks.check_trajectory_stats(x_next, x, x_prev)
    return x.new_empty((x.shape[0], 3), dtype=torch.float32)


def _fake_rel_l1(a, b):
    _checks.check_rel_l1(a, b)
    return a.new_empty((a.shape[0], 2), dtype=torch.float32)


def _fake_token_update_(cache, index, values, hidden):
    _checks.check_token_update(cache, index, values, hidden)
    return hidden.new_empty(hidden.shape)


def _fake_gather_tokens(x, index):
    _checks.check_gather_tokens(x, index)
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


_FAKES = {
    "apply_residual_": _fake_apply_residual_,
    "store_residual_": _fake_store_residual_,
    "trajectory_stats": _fake_trajectory_stats,
    "rel_l1": _fake_rel_l1,
    "token_update_": _fake_token_update_,
    "gather_tokens": _fake_gather_tokens,
}
for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"omnicache::{_name}")(_fake)


# -------------------------------------------------------------------- triton ops
# Opaque custom ops: torch.compile treats each as one call (torch.library.triton_op
# would trace into the kernel, which the interpreter cannot run).
def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_kernels():
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("omnicache: backend 'triton' needs the triton package, which is not installed")
    from . import kernels

    return kernels


def _triton_device_ok(t: Tensor) -> None:
    if t.device.type == "cpu" and not _triton_interpret():
        raise RuntimeError(
            "omnicache: backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1 "
            "(set before triton is imported)"
        )


@torch.library.custom_op("omnicache_triton::apply_residual_", mutates_args=("hidden",))
def _triton_apply_residual_(hidden: Tensor, residual: Tensor, correction: Tensor | None = None,
                            gamma: Tensor | None = None, correction2: Tensor | None = None,
                            gate: Tensor | None = None) -> None:
    _checks.check_apply_residual(hidden, residual, correction, gamma, correction2, gate)
    _triton_device_ok(hidden)
    _triton_kernels().apply_residual.apply_residual_(hidden, residual, correction, gamma,
                                                     correction2, gate)


@torch.library.custom_op("omnicache_triton::store_residual_", mutates_args=("cache", "delta", "delta2"))
def _triton_store_residual_(cache: Tensor, delta: Tensor | None, out: Tensor, inp: Tensor | None,
                            delta2: Tensor | None = None) -> Tensor:
    _checks.check_store_residual(cache, delta, out, inp, delta2)
    _triton_device_ok(cache)
    return _triton_kernels().store_residual.store_residual_(cache, delta, out, inp, delta2)


@torch.library.custom_op("omnicache_triton::trajectory_stats", mutates_args=())
def _triton_trajectory_stats(x_next: Tensor, x: Tensor, x_prev: Tensor) -> Tensor:
    _checks.check_trajectory_stats(x_next, x, x_prev)
    _triton_device_ok(x)
    return _triton_kernels().trajectory_stats.trajectory_stats(x_next, x, x_prev)


@torch.library.custom_op("omnicache_triton::rel_l1", mutates_args=())
def _triton_rel_l1(a: Tensor, b: Tensor) -> Tensor:
    _checks.check_rel_l1(a, b)
    _triton_device_ok(a)
    return _triton_kernels().rel_l1.rel_l1(a, b)


@torch.library.custom_op("omnicache_triton::token_update_", mutates_args=("cache",))
def _triton_token_update_(cache: Tensor, index: Tensor, values: Tensor, hidden: Tensor) -> Tensor:
    _checks.check_token_update(cache, index, values, hidden)
    _triton_device_ok(hidden)
    return _triton_kernels().token_update.token_update_(cache, index, values, hidden)


@torch.library.custom_op("omnicache_triton::gather_tokens", mutates_args=())
def _triton_gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    _checks.check_gather_tokens(x, index)
    _triton_device_ok(x)
    return _triton_kernels().token_update.gather_tokens(x, index)


for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"omnicache_triton::{_name}")(_fake)


# ----------------------------------------------------------------- torch backend
def _torch_apply_residual_(hidden, residual, correction=None, gamma=None, correction2=None,
                           gate=None):
    _checks.check_apply_residual(hidden, residual, correction, gamma, correction2, gate)
    reference.apply_residual_(hidden, residual, correction, gamma, correction2, gate)


def _torch_store_residual_(cache, delta, out, inp, delta2=None):
    _checks.check_store_residual(cache, delta, out, inp, delta2)
    return reference.store_residual_(cache, delta, out, inp, delta2)


def _torch_trajectory_stats(x_next, x, x_prev):
    _checks.check_trajectory_stats(x_next, x, x_prev)
    return reference.trajectory_stats(x_next, x, x_prev)


def _torch_rel_l1(a, b):
    _checks.check_rel_l1(a, b)
    return reference.rel_l1(a, b)


def _torch_token_update_(cache, index, values, hidden):
    _checks.check_token_update(cache, index, values, hidden)
    return reference.token_update_(cache, index, values, hidden)


def _torch_gather_tokens(x, index):
    _checks.check_gather_tokens(x, index)
    return reference.gather_tokens(x, index)


class _Torch:
    apply_residual_ = staticmethod(_torch_apply_residual_)
    store_residual_ = staticmethod(_torch_store_residual_)
    trajectory_stats = staticmethod(_torch_trajectory_stats)
    rel_l1 = staticmethod(_torch_rel_l1)
    token_update_ = staticmethod(_torch_token_update_)
    gather_tokens = staticmethod(_torch_gather_tokens)


def _impls(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.omnicache
    if backend == "triton":
        return torch.ops.omnicache_triton
    return _Torch


# -------------------------------------------------------------------- backends
def cuda_kernels_built() -> bool:
    """Whether ``omnicache._C`` was compiled with the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("omnicache::rel_l1", "CUDA")


def _unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None if it can."""
    if backend == "cuda":
        if not cuda_kernels_built():
            return "omnicache._C was built without CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        if not (torch.cuda.is_available() or _triton_interpret()):
            return "no CUDA device is available and TRITON_INTERPRET=1 is not set"
    return None


def available_backends() -> list[str]:
    """The backends that can run here (``auto`` always can)."""
    return ["auto"] + [b for b in BACKENDS[1:] if _unavailable(b) is None]


_backend = "auto"


def set_backend(name: str) -> None:
    """Choose the backend for every op: one of ``auto, cpu, cuda, triton, torch``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` for a backend that
    is not built or cannot run here.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"omnicache: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    reason = _unavailable(name)
    if reason is not None:
        raise RuntimeError(f"omnicache: backend {name!r} is not available: {reason}")
    _backend = name


def get_backend() -> str:
    """The backend chosen by :func:`set_backend` or ``OMNICACHE_BACKEND``."""
    return _backend


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _auto_cuda(op: str, t: Tensor) -> str:
    """``auto`` on CUDA: the backend measured faster for this op and size on this device
    (``omnicache/data/auto_backend.json``, see :mod:`omnicache.backend_table`), else
    ``cuda`` if built, else ``triton``."""
    from . import backend_table

    name = _cuda_device_name(t.device.index if t.device.index is not None else torch.cuda.current_device())
    choice = backend_table.choose(op, t.numel(), name)
    if choice is not None and _unavailable(choice) is None:
        return choice
    return "cuda" if cuda_kernels_built() else "triton"


def _resolve(op: str, t: Tensor) -> str:
    """The backend that runs ``op`` with first argument ``t`` under the current choice."""
    kind = t.device.type
    if _backend == "auto":
        if kind == "cpu":
            return "cpu"
        if kind == "cuda":
            return _auto_cuda(op, t)
        return "torch"
    if _backend in ("cpu", "cuda") and kind != _backend:
        raise ValueError(f"omnicache: backend {_backend!r} cannot run on {kind} tensors")
    if _backend == "triton" and kind not in ("cuda", "cpu"):
        raise ValueError(f"omnicache: backend 'triton' cannot run on {kind} tensors")
    return _backend


# ------------------------------------------------------------------- the ops
def apply_residual_(hidden: Tensor, residual: Tensor, correction: Tensor | None = None,
                    gamma: Tensor | None = None, correction2: Tensor | None = None,
                    gate: Tensor | None = None) -> None:
    """Add a cached residual, its corrections and the adaLN gate to ``hidden`` in place.

    For each sample ``b`` and element ``i`` (``d`` its index in the last dim)::

        hidden[b, i] += gate[b, d] * (residual[b, i] + γ1[b] * correction[b, i]
                                                     + γ2[b] * correction2[b, i])

    in float32, evaluated left to right and rounded once to ``hidden.dtype``. An absent
    term drops out; ``gate`` and the γ default to 1. With ``correction`` alone this is
    first-order forecasting (``hidden += residual + γ·D1``), with ``correction2`` too
    second-order; ``gate`` is the current step's adaLN gate for branch reuse.

    Parameters
    ----------
    hidden : Tensor
        ``[B, ..., D]`` float32/float16/bfloat16, contiguous; written in place.
    residual, correction, correction2 : Tensor
        Same shape, dtype and device as ``hidden``; may be strided. ``correction`` and
        ``correction2`` may be None.
    gamma : Tensor, optional
        float32 on hidden's device. Without ``correction2``: ``[]`` or ``[B]`` (γ1).
        With ``correction2``: ``[2]`` or ``[B, 2]`` holding (γ1, γ2). Needs a correction.
    gate : Tensor, optional
        ``[B, D]``, hidden's dtype and device (broadcast over the middle dims).

    Bytes moved: ``(2 + k)·N·s + B·D·s`` (read hidden, residual and k corrections,
    write hidden; the gate once), for N elements of s bytes: 3N·s to 5N·s.
    """
    _checks.check_types("apply_residual_", {"hidden": hidden, "residual": residual},
                        {"correction": correction, "gamma": gamma, "correction2": correction2,
                         "gate": gate})
    _impls(_resolve("apply_residual_", hidden)).apply_residual_(
        hidden, residual, correction, gamma, correction2, gate)


def store_residual_(cache: Tensor, delta: Tensor | None, out: Tensor, inp: Tensor | None,
                    delta2: Tensor | None = None) -> Tensor:
    """Store a block's (or branch's) output and its finite differences, with statistics.

    In one pass, in float32, per element::

        new = out - inp                  # new = out when inp is None (branch caching)
        d1 = new - cache                 # cache before the call: ``old``
        delta2 = d1 - delta              # if delta2 is given (needs delta): old delta
        delta = d1                       # if delta is given
        cache = new

    Returns ``[B, 4]`` float32 per sample: ``Σ|new - old|, Σ|old|, Σ(new - old)², Σold²``
    with ``new`` and ``d1`` unrounded.

    Parameters
    ----------
    cache : Tensor
        ``[B, ...]`` float32/float16/bfloat16, contiguous; written in place.
    delta, delta2 : Tensor or None
        Like ``cache``, contiguous; written in place (``delta`` also read with ``delta2``).
    out : Tensor
        Like ``cache``; may be strided.
    inp : Tensor or None
        Like ``cache``; may be strided.

    Bytes moved: ``(r + w)·N·s`` with r reads (out, inp if given, cache, delta if
    ``delta2``) and w writes (cache, delta, delta2 if given): 3N·s to 7N·s.
    """
    _checks.check_types("store_residual_", {"cache": cache, "out": out},
                        {"delta": delta, "inp": inp, "delta2": delta2})
    return _impls(_resolve("store_residual_", cache)).store_residual_(cache, delta, out, inp, delta2)


def trajectory_stats(x_next: Tensor, x: Tensor, x_prev: Tensor) -> Tensor:
    """Second-order statistics of three consecutive points of a trajectory.

    ``v1 = x_next - x``, ``v0 = x - x_prev``; returns ``[B, 3]`` float32 per sample:
    ``‖v1‖², ‖v0‖², ⟨v1, v0⟩``. The curvature is ``1 - ⟨v1,v0⟩ / (‖v1‖‖v0‖)`` and
    the least-squares γ of ``v1 ≈ γ v0`` is ``⟨v1,v0⟩ / ‖v0‖²``.

    Parameters
    ----------
    x_next, x, x_prev : Tensor
        ``[B, ...]`` float32/float16/bfloat16, same shape; may be strided.

    Bytes moved: 3N·s.
    """
    _checks.check_types("trajectory_stats", {"x_next": x_next, "x": x, "x_prev": x_prev})
    return _impls(_resolve("trajectory_stats", x_next)).trajectory_stats(x_next, x, x_prev)


def rel_l1(a: Tensor, b: Tensor) -> Tensor:
    """Relative-L1 terms: returns ``[B, 2]`` float32 per sample: ``Σ|a - b|, Σ|b|``.

    Parameters
    ----------
    a, b : Tensor
        ``[B, ...]`` float32/float16/bfloat16, same shape; may be strided.

    Bytes moved: 2N·s.
    """
    _checks.check_types("rel_l1", {"a": a, "b": b})
    return _impls(_resolve("rel_l1", a)).rel_l1(a, b)


def token_update_(cache: Tensor, index: Tensor, values: Tensor, hidden: Tensor) -> Tensor:
    """ToCa's token-wise update: store the recomputed tokens' residuals, reuse the rest.

    ``index[b]`` lists the K tokens of sample b the unit recomputed this step and
    ``values`` is the unit's output for them (``block(gather_tokens(hidden, index))``).
    For a selected token ``n = index[b, k]`` (a repeated n: the largest k wins)::

        cache[b, n] = values[b, k] - hidden[b, n]        # its new residual
        out[b, n] = values[b, k]                         # exactly

    and for every other token ``out[b, n] = hidden[b, n] + cache[b, n]`` (reuse), in
    float32, rounded once to the dtype. Returns ``out``.

    Parameters
    ----------
    cache : Tensor
        ``[B, N, C]`` float32/float16/bfloat16, contiguous; updated in place.
    index : Tensor
        ``[B, K]`` int64, entries in ``[0, N)``. Checked on CPU tensors (``ValueError``);
        on a GPU it is not read back (no sync): a call with an entry outside ``[0, N)``
        writes nothing to ``cache`` and returns ``out`` all NaN.
    values : Tensor
        ``[B, K, C]``, hidden's dtype and device; may be strided.
    hidden : Tensor
        ``[B, N, C]``, like ``cache``; may be strided.

    Bytes moved: ``(3N + K)·C·s`` per sample (reused: hidden, cache, out; selected:
    values, hidden, cache, out), plus the index.
    """
    _checks.check_types("token_update_", {"cache": cache, "index": index, "values": values,
                                          "hidden": hidden})
    return _impls(_resolve("token_update_", hidden)).token_update_(cache, index, values, hidden)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``out[b, k] = x[b, index[b, k]]``: ``[B, N, C]``, ``[B, K]`` int64 -> ``[B, K, C]``.

    Whole rows copied (bit for bit), not torch.gather's per-element index. ``x`` may be
    strided (a view with a contiguous last dim is read in place). ``index`` as in
    :func:`token_update_`; on a GPU a row whose index is outside ``[0, N)`` is NaN.

    Bytes moved: ``2K·C·s`` per sample, plus the index.
    """
    _checks.check_types("gather_tokens", {"x": x, "index": index})
    return _impls(_resolve("gather_tokens", x)).gather_tokens(x, index)


try:
    set_backend(os.environ.get("OMNICACHE_BACKEND", "auto"))
except (ValueError, RuntimeError) as err:
    raise RuntimeError(f"OMNICACHE_BACKEND: {err}") from None
