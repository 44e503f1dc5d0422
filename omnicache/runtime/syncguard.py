"""``no_host_sync()``: make any device-to-host synchronisation an error (for tests).

A static cache plan must run its whole sampling loop without the host waiting on the
device. Inside ``no_host_sync()`` every tensor method that reads a value back to Python
(``item``, ``tolist``, ``cpu``, ``numpy``, ``bool()/int()/float()`` conversions,
``__index__``) raises ``RuntimeError``, on every device, so a CPU-only CI catches the
syncs a GPU run would pay for. With CUDA, ``torch.cuda.set_sync_debug_mode("error")``
additionally catches syncs inside ATen (e.g. ``nonzero``, ``masked_select``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["no_host_sync", "HostSyncError"]

_SYNCING = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__index__: "__index__",
}


class HostSyncError(RuntimeError):
    """A tensor value was read back to the host inside ``no_host_sync()``."""


class _NoHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _SYNCING.get(func)
        if name is not None:
            raise HostSyncError(f"host sync: Tensor.{name}() called inside no_host_sync()")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Raise ``HostSyncError`` (a ``RuntimeError``) on any host sync inside the block."""
    cuda = torch.cuda.is_available()
    previous = torch.cuda.get_sync_debug_mode() if cuda else 0
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _NoHostSync():
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)
