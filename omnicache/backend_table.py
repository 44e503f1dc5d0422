"""Measured backend choice per op and size: ``omnicache/data/auto_backend.json``.

``benchmarks/auto_backend.py`` times the ``cuda`` and ``triton`` backends of every op at
several sizes on a GPU and writes the table; :func:`choose` reads it, so the ``auto``
backend can run whichever measured faster on *this* device. The file is JSON (never a
pickle), validated on load; a malformed file raises ``ValueError`` naming the field::

    {"device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "triton": "3.x", "date": "YYYY-MM-DD",
     "choices": {"rel_l1": [[1048576, "triton"], [null, "cuda"]], ...}}

``choices[op]`` is a list of ``[max_numel, backend]`` with ``max_numel`` strictly
increasing; ``numel <= max_numel`` selects the first matching entry. ``null`` as the
last bound means "any size"; without it, sizes above the last bound use the last entry
(the largest size measured). Optional keys: ``command``, ``dtype``, ``batch``,
``measured`` (the timings behind the choice; not read here).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

__all__ = ["DEFAULT_PATH", "OPS", "TABLE_BACKENDS", "choose", "load", "validate", "table_from_timings",
           "clear_cache"]

DEFAULT_PATH = pathlib.Path(__file__).parent / "data" / "auto_backend.json"
OPS = ("apply_residual_", "store_residual_", "trajectory_stats", "rel_l1", "token_update_", "gather_tokens")
TABLE_BACKENDS = ("cuda", "triton")
_REQUIRED = ("device", "torch", "triton", "date", "choices")
_OPTIONAL = ("command", "dtype", "batch", "measured")


def _fail(where, field: str, message: str):
    raise ValueError(f"{where}: {field}: {message}")


def validate(table, where: str = "auto_backend table") -> dict:
    """Check a loaded table; returns it. ``ValueError`` naming the field on any problem."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: the top level must be a JSON object, got {type(table).__name__}")
    for name in _REQUIRED:
        if name not in table:
            _fail(where, name, "missing")
    for name in table:
        if name not in _REQUIRED + _OPTIONAL:
            _fail(where, name, "unknown field")
    for name in ("device", "torch", "date"):
        if not isinstance(table[name], str) or not table[name]:
            _fail(where, name, f"must be a non-empty string, got {table[name]!r}")
    if table["triton"] is not None and not isinstance(table["triton"], str):
        _fail(where, "triton", f"must be a string or null, got {table['triton']!r}")
    choices = table["choices"]
    if not isinstance(choices, dict):
        _fail(where, "choices", f"must be an object {{op: [[max_numel, backend], ...]}}, got {type(choices).__name__}")
    for op, entries in choices.items():
        field = f"choices.{op}"
        if op not in OPS:
            _fail(where, field, f"unknown op (known: {', '.join(OPS)})")
        if not isinstance(entries, list) or not entries:
            _fail(where, field, f"must be a non-empty list of [max_numel, backend], got {entries!r:.60}")
        last = 0
        for i, entry in enumerate(entries):
            f = f"{field}[{i}]"
            if not isinstance(entry, list) or len(entry) != 2:
                _fail(where, f, f"must be a pair [max_numel, backend], got {entry!r:.60}")
            bound, backend = entry
            if bound is None:
                if i != len(entries) - 1:
                    _fail(where, f"{f}[0]", "null (any size) is allowed only in the last entry")
            elif isinstance(bound, bool) or not isinstance(bound, int) or bound <= last:
                _fail(where, f"{f}[0]", f"max_numel must be an int > {last} (strictly increasing), got {bound!r}")
            else:
                last = bound
            if backend not in TABLE_BACKENDS:
                _fail(where, f"{f}[1]", f"backend must be one of {', '.join(TABLE_BACKENDS)}, got {backend!r}")
    return table


@functools.lru_cache(maxsize=8)
def _load_cached(path: str):
    p = pathlib.Path(path)
    if not p.is_file():
        return None
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not a UTF-8 JSON file ({e.reason}); the table is JSON, never a pickle") from None
    try:
        table = json.loads(text)  # JSON only: nothing is ever unpickled
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    return validate(table, str(p))


def load(path=None) -> dict | None:
    """The validated table at ``path`` (default: the package's), or None when absent.

    Cached per path; call :func:`clear_cache` after rewriting the file in the same process.
    """
    return _load_cached(str(DEFAULT_PATH if path is None else path))


def clear_cache() -> None:
    _load_cached.cache_clear()


def choose(op: str, numel: int, device_name: str, *, path=None) -> str | None:
    """The backend measured fastest for ``op`` at ``numel`` elements on ``device_name``.

    None when the table is absent, was measured on another device (``device_name`` must
    equal the table's ``device``, as ``torch.cuda.get_device_name`` writes it), or has no
    entry for ``op``. Raises ``ValueError`` naming the field if the file is malformed.
    """
    table = load(path)
    if table is None or table["device"] != device_name:
        return None
    entries = table["choices"].get(op)
    if entries is None:
        return None
    for bound, backend in entries:
        if bound is None or numel <= bound:
            return backend
    return entries[-1][1]


def table_from_timings(timings: dict, *, device: str, torch_version: str, triton_version: str | None,
                       date: str, **extra) -> dict:
    """Build (and validate) a table from ``{op: {numel: {backend: seconds}}}``.

    At each measured size the fastest backend wins; consecutive sizes with the same winner
    merge; the last entry's bound is null (any larger size). A size where no backend has
    a finite time is skipped.
    """
    choices = {}
    for op, by_size in timings.items():
        entries = []
        for numel in sorted(by_size):
            times = {b: t for b, t in by_size[numel].items() if t is not None and math.isfinite(t)}
            if not times:
                continue
            best = min(sorted(times), key=lambda b: times[b])
            if entries and entries[-1][1] == best:
                entries[-1][0] = int(numel)
            else:
                entries.append([int(numel), best])
        if entries:
            entries[-1][0] = None
            choices[op] = entries
    table = dict(device=device, torch=torch_version, triton=triton_version, date=date, choices=choices, **extra)
    return validate(table)
