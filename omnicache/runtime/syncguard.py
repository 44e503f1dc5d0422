"""Host syncs caught or counted: ``no_host_sync()`` makes any device-to-host
synchronisation an error (for tests), ``count_host_syncs()`` counts them (for benchmarks).

A static cache plan must run its whole sampling loop without the host waiting on the
device. Inside ``no_host_sync()`` every tensor method that reads a value back to Python
(``item``, ``tolist``, ``cpu``, ``numpy``, ``bool()/int()/float()`` conversions,
``__index__``) raises ``RuntimeError``, on every device, so a CPU-only CI catches the
syncs a GPU run would pay for. With CUDA, ``torch.cuda.set_sync_debug_mode("error")``
additionally catches syncs inside ATen (e.g. ``nonzero``, ``masked_select``).

Both watch the same table of syncing tensor methods (:data:`SYNC_METHODS`) the same way:
each watched method of ``torch.Tensor`` is wrapped for the block (and put back after), so a
call is seen wherever Python makes it (torch's own Python code included) and nothing else
is slowed down (a ``TorchFunctionMode`` would intercept every torch call: +23% on a timed
Flux arena call, measured).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

__all__ = ["no_host_sync", "count_host_syncs", "HostSyncError", "SyncCount", "READBACKS", "SYNC_METHODS"]

# The methods that read a tensor's value back to Python: what no_host_sync() forbids.
READBACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
# Every syncing method either function can watch: the read-backs, and ``nonzero`` (its
# result's size waits for the device; ATen's sync, which CUDA's sync debug mode catches).
SYNC_METHODS = {name: getattr(torch.Tensor, name) for name in (*READBACKS, "nonzero")}


class HostSyncError(RuntimeError):
    """A tensor value was read back to the host inside ``no_host_sync()``."""


@contextlib.contextmanager
def _watch_syncs(methods, on_sync):
    """Call ``on_sync(name)`` before each call of one of ``methods`` (names of
    :data:`SYNC_METHODS`) inside the block; the methods are put back after."""
    unknown = [m for m in methods if m not in SYNC_METHODS]
    if unknown:
        raise ValueError(f"methods: {unknown} are not syncing tensor methods ({', '.join(SYNC_METHODS)})")
    saved = {m: torch.Tensor.__dict__.get(m) for m in methods}

    def watched(name, method):
        def call(self, *args, **kwargs):
            on_sync(name)
            return method(self, *args, **kwargs)
        return call

    for m in methods:
        setattr(torch.Tensor, m, watched(m, getattr(torch.Tensor, m)))
    try:
        yield
    finally:
        for m, method in saved.items():
            if method is None:
                delattr(torch.Tensor, m)
            else:
                setattr(torch.Tensor, m, method)


def _raise(name):
    raise HostSyncError(f"host sync: Tensor.{name}() called inside no_host_sync()")


@contextlib.contextmanager
def no_host_sync():
    """Raise ``HostSyncError`` (a ``RuntimeError``) on any host sync inside the block."""
    cuda = torch.cuda.is_available()
    previous = torch.cuda.get_sync_debug_mode() if cuda else 0
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _watch_syncs(READBACKS, _raise):
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)


class SyncCount:
    """What :func:`count_host_syncs` counted: ``count`` in all, ``by_method`` per method name."""

    def __init__(self):
        self.count = 0
        self.by_method = Counter()

    def add(self, name):
        self.count += 1
        self.by_method[name] += 1

    def __repr__(self):
        return f"SyncCount({self.count}, {dict(self.by_method)})"


@contextlib.contextmanager
def count_host_syncs(methods=READBACKS):
    """Count the calls of the syncing tensor ``methods`` (default: the read-backs
    :func:`no_host_sync` forbids) inside the block; yields a :class:`SyncCount`."""
    counted = SyncCount()
    with _watch_syncs(tuple(methods), counted.add):
        yield counted
