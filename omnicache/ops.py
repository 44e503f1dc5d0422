"""The omnicache ops: fused bookkeeping for DiT feature caching.

``import omnicache.ops`` loads the compiled library, which registers
``torch.ops.omnicache.<op>`` for every op in ``OPS`` (C++ kernels for CPU, CUDA kernels
when built), registers the Triton kernels as the opaque custom ops
``torch.ops.omnicache_triton.<op>``, and gives each op's fake impl so all of them trace
under ``torch.compile(fullgraph=True)``.

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

Layout: the backend choice, then one section per op with all of its Python side: its
Triton custom op and its public function, whose ``_register`` decorator names the
op's argument checks (``_checks``), its spec (``reference``) and its fake's result, and
so makes its fake impl and its ``torch`` backend. ``OPS``, ``__all__`` and the dispatch
come from that one registry. Each public docstring names the op's kernel files.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.omnicache.*)
from . import _checks, reference

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


# -------------------------------------------------------------------- backends
def cuda_kernels_built() -> bool:
    """Whether ``omnicache._C`` was compiled with the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("omnicache::rel_l1", "CUDA")


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


# -------------------------------------------------------------------- registry
class _Op(NamedTuple):
    """One op's Python side (its C++ and CUDA kernels are ``torch.ops.omnicache.<name>``)."""

    name: str
    public: Callable  # omnicache.ops.<name>: checks the types, picks the backend
    fake: Callable  # argument checks, then the result's shape (both namespaces)
    triton: Callable  # the opaque custom op torch.ops.omnicache_triton.<name>
    torch_backend: Callable  # argument checks, then omnicache.reference.<name>


_REGISTRY: dict[str, _Op] = {}


def _triton_op(name: str, mutates_args: tuple[str, ...]):
    """Declares ``omnicache_triton::<name>`` as an opaque custom op: torch.compile treats
    it as one call (torch.library.triton_op would trace into the kernel, which the
    interpreter cannot run)."""
    return torch.library.custom_op(f"omnicache_triton::{name}", mutates_args=mutates_args)


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


def _register(*, check: Callable, spec: Callable, triton: Callable, result: Callable | None = None):
    """Decorates an op's public function and enters the op in the registry (``OPS``,
    ``__all__``, the dispatch). ``check``: the op's argument checks (``_checks``);
    ``spec``: its ``reference`` function; ``triton``: its Triton custom op; ``result``:
    the fake's result from the arguments (shapes only; None: the op returns nothing).

    The fake (registered for ``omnicache::<name>`` and ``omnicache_triton::<name>``) is
    ``check`` then ``result``: the kernels' checks minus the memory-overlap test, which
    fake tensors cannot do. The ``torch`` backend is ``check`` then ``spec``."""

    def fake(*args):
        check(*args)
        return None if result is None else result(*args)

    def torch_backend(*args):
        check(*args)
        return spec(*args)

    def register(public: Callable) -> Callable:
        name = public.__name__
        for namespace in ("omnicache", "omnicache_triton"):
            torch.library.register_fake(f"{namespace}::{name}")(fake)
        _REGISTRY[name] = _Op(name, public, fake, triton, torch_backend)
        return public

    return register


def _kernel(op: str, t: Tensor) -> Callable:
    """What runs ``op`` (first tensor argument ``t``) under the current backend."""
    backend = _resolve(op, t)
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.omnicache, op)
    if backend == "triton":
        return getattr(torch.ops.omnicache_triton, op)
    return _REGISTRY[op].torch_backend


# ------------------------------------------------------------- apply_residual_
@_triton_op("apply_residual_", mutates_args=("hidden",))
def _triton_apply_residual_(hidden: Tensor, residual: Tensor, correction: Tensor | None = None,
                            gamma: Tensor | None = None, correction2: Tensor | None = None,
                            gate: Tensor | None = None) -> None:
    _checks.check_apply_residual(hidden, residual, correction, gamma, correction2, gate)
    _triton_device_ok(hidden)
    _triton_kernels().apply_residual.apply_residual_(hidden, residual, correction, gamma,
                                                     correction2, gate)


@_register(check=_checks.check_apply_residual, spec=reference.apply_residual_,
           triton=_triton_apply_residual_)
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

    Kernels: csrc/cpu/apply_residual.h (CPU), csrc/cuda/apply_residual.cu (CUDA),
    kernels/apply_residual.py (Triton); spec: omnicache.reference.apply_residual_.
    """
    _checks.check_types("apply_residual_", {"hidden": hidden, "residual": residual},
                        {"correction": correction, "gamma": gamma, "correction2": correction2,
                         "gate": gate})
    _kernel("apply_residual_", hidden)(hidden, residual, correction, gamma, correction2, gate)


# ------------------------------------------------------------- store_residual_
@_triton_op("store_residual_", mutates_args=("cache", "delta", "delta2"))
def _triton_store_residual_(cache: Tensor, delta: Tensor | None, out: Tensor, inp: Tensor | None,
                            delta2: Tensor | None = None) -> Tensor:
    _checks.check_store_residual(cache, delta, out, inp, delta2)
    _triton_device_ok(cache)
    return _triton_kernels().store_residual.store_residual_(cache, delta, out, inp, delta2)


@_register(check=_checks.check_store_residual, spec=reference.store_residual_,
           triton=_triton_store_residual_,
           result=lambda cache, *_: cache.new_empty((cache.shape[0], 4), dtype=torch.float32))
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

    Kernels: csrc/cpu/store_residual.h (CPU), csrc/cuda/store_residual.cu (CUDA),
    kernels/store_residual.py (Triton); spec: omnicache.reference.store_residual_.
    """
    _checks.check_types("store_residual_", {"cache": cache, "out": out},
                        {"delta": delta, "inp": inp, "delta2": delta2})
    return _kernel("store_residual_", cache)(cache, delta, out, inp, delta2)


# ------------------------------------------------------------- trajectory_stats
@_triton_op("trajectory_stats", mutates_args=())
def _triton_trajectory_stats(x_next: Tensor, x: Tensor, x_prev: Tensor) -> Tensor:
    _checks.check_trajectory_stats(x_next, x, x_prev)
    _triton_device_ok(x)
    return _triton_kernels().trajectory_stats.trajectory_stats(x_next, x, x_prev)


@_register(check=_checks.check_trajectory_stats, spec=reference.trajectory_stats,
           triton=_triton_trajectory_stats,
           result=lambda x_next, x, x_prev: x.new_empty((x.shape[0], 3), dtype=torch.float32))
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

    Kernels: csrc/cpu/trajectory_stats.h (CPU), csrc/cuda/trajectory_stats.cu (CUDA),
    kernels/trajectory_stats.py (Triton); spec: omnicache.reference.trajectory_stats.
    """
    _checks.check_types("trajectory_stats", {"x_next": x_next, "x": x, "x_prev": x_prev})
    return _kernel("trajectory_stats", x_next)(x_next, x, x_prev)


# ---------------------------------------------------------------------- rel_l1
@_triton_op("rel_l1", mutates_args=())
def _triton_rel_l1(a: Tensor, b: Tensor) -> Tensor:
    _checks.check_rel_l1(a, b)
    _triton_device_ok(a)
    return _triton_kernels().rel_l1.rel_l1(a, b)


@_register(check=_checks.check_rel_l1, spec=reference.rel_l1, triton=_triton_rel_l1,
           result=lambda a, *_: a.new_empty((a.shape[0], 2), dtype=torch.float32))
def rel_l1(a: Tensor, b: Tensor) -> Tensor:
    """Relative-L1 terms: returns ``[B, 2]`` float32 per sample: ``Σ|a - b|, Σ|b|``.

    Parameters
    ----------
    a, b : Tensor
        ``[B, ...]`` float32/float16/bfloat16, same shape; may be strided.

    Bytes moved: 2N·s.

    Kernels: csrc/cpu/rel_l1.h (CPU), csrc/cuda/rel_l1.cu (CUDA), kernels/rel_l1.py
    (Triton); spec: omnicache.reference.rel_l1.
    """
    _checks.check_types("rel_l1", {"a": a, "b": b})
    return _kernel("rel_l1", a)(a, b)


# --------------------------------------------------------------- token_update_
@_triton_op("token_update_", mutates_args=("cache",))
def _triton_token_update_(cache: Tensor, index: Tensor, values: Tensor, hidden: Tensor) -> Tensor:
    _checks.check_token_update(cache, index, values, hidden)
    _triton_device_ok(hidden)
    return _triton_kernels().token_update.token_update_(cache, index, values, hidden)


@_register(check=_checks.check_token_update, spec=reference.token_update_,
           triton=_triton_token_update_,
           result=lambda cache, index, values, hidden: hidden.new_empty(hidden.shape))
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

    Kernels: csrc/cpu/token_update.h (CPU; the owner map in csrc/cpu/ops_cpu.cpp),
    csrc/cuda/token_update.cu (CUDA), kernels/token_update.py (Triton); spec:
    omnicache.reference.token_update_.
    """
    _checks.check_types("token_update_", {"cache": cache, "index": index, "values": values,
                                          "hidden": hidden})
    return _kernel("token_update_", hidden)(cache, index, values, hidden)


# --------------------------------------------------------------- gather_tokens
@_triton_op("gather_tokens", mutates_args=())
def _triton_gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    _checks.check_gather_tokens(x, index)
    _triton_device_ok(x)
    return _triton_kernels().token_update.gather_tokens(x, index)


@_register(check=_checks.check_gather_tokens, spec=reference.gather_tokens,
           triton=_triton_gather_tokens,
           result=lambda x, index: x.new_empty((x.shape[0], index.shape[1], x.shape[2])))
def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``out[b, k] = x[b, index[b, k]]``: ``[B, N, C]``, ``[B, K]`` int64 -> ``[B, K, C]``.

    Whole rows copied (bit for bit), not torch.gather's per-element index. ``x`` may be
    strided (a view with a contiguous last dim is read in place). ``index`` as in
    :func:`token_update_`; on a GPU a row whose index is outside ``[0, N)`` is NaN.

    Bytes moved: ``2K·C·s`` per sample, plus the index.

    Kernels: csrc/cpu/ops_cpu.cpp (CPU; row copies in the torch glue),
    csrc/cuda/token_update.cu (CUDA), kernels/token_update.py (Triton); spec:
    omnicache.reference.gather_tokens.
    """
    _checks.check_types("gather_tokens", {"x": x, "index": index})
    return _kernel("gather_tokens", x)(x, index)


# ------------------------------------------------------------------ the op list
OPS = tuple(_REGISTRY)  # every op, in section order
__all__ = [*OPS, "set_backend", "get_backend", "available_backends"]

try:
    set_backend(os.environ.get("OMNICACHE_BACKEND", "auto"))
except (ValueError, RuntimeError) as err:
    raise RuntimeError(f"OMNICACHE_BACKEND: {err}") from None
