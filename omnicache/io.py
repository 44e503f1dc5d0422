"""Atomic file writes: the destination holds either its old complete content or the new
complete content, never a truncated mix, whatever happens during the write (a full disk,
a file-size limit, an exception, SIGKILL, a power cut after the rename).

Every writer in the package goes through here:

    atomic_write_text(path, text)           # plans, JSON results, Markdown tables
    atomic_write_json(path, obj, indent=1)  # json.dumps(obj, allow_nan=False) + newline
    with atomic_path(path) as tmp:          # writers that want a file name of their own
        fig.savefig(tmp)                    # (matplotlib, safetensors' save_file)

How: the data goes to a temporary file in the destination's folder (same file system, so
the rename is atomic), is flushed and ``fsync``-ed, then ``os.replace`` puts it in place
and the folder is ``fsync``-ed. On any error the temporary file is removed and the error
propagates; the destination is untouched. A SIGKILL can leave a temporary file behind
(``.<name>.<random>.tmp<suffix>``), never a damaged destination.

The new file gets the mode an ordinary ``open(path, "w")`` would give it (``0o666`` less
the umask), or the existing destination's mode when it replaces one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


def _target(path) -> Path:
    path = Path(os.fspath(path))
    # Writing through a symlink replaces the file it points to, not the link itself.
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, expected a file path")
    return path


def _new_temp(dest: Path) -> tuple[Path, int]:
    """A fresh temporary file beside ``dest`` (created exclusively), and its descriptor."""
    for _ in range(100):
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp{dest.suffix}")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"{dest}: could not create a temporary file beside it")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, dest: Path) -> None:
    """Give ``tmp`` the destination's mode, rename it over ``dest``, sync the folder."""
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(dest).st_mode))
    except FileNotFoundError:
        pass
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (same suffix, so writers that pick the format
    from the extension still do); when the block ends without an error, the file written
    there is synced and renamed over ``path``. On an error it is removed and ``path`` is
    left as it was.

    >>> with atomic_path("samples.png") as tmp:   # doctest: +SKIP
    ...     fig.savefig(tmp)
    """
    dest = _target(path)
    tmp, fd = _new_temp(dest)
    os.close(fd)
    try:
        yield str(tmp)
        with open(tmp, "rb+") as f:  # the writer may have closed without syncing
            os.fsync(f.fileno())
        _commit(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    dest = _target(path)
    tmp, fd = _new_temp(dest)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, encoded as ``encoding`` (UTF-8)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path, obj, *, indent: int | None = 1, allow_nan: bool = False) -> None:
    """Write ``obj`` as JSON plus a newline, atomically; ``allow_nan=False`` (the default)
    refuses NaN and Infinity (not JSON) before anything is written."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


def read_safetensors(source, where: str) -> dict:
    """The tensors of a safetensors file (a path or a ``Traversable``); a malformed file is a
    ``ValueError`` naming ``where``. Never unpickles anything."""
    from safetensors.torch import load as load_safetensors_bytes

    raw = source.read_bytes()  # a missing file raises FileNotFoundError with its path
    try:
        return load_safetensors_bytes(raw)
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise ValueError(f"{where}: not a valid safetensors file ({e})") from None


def check_state(tensors: dict, expected: dict, where: str, hint: str = "") -> None:
    """Weights ``tensors`` against a skeleton's ``expected`` state dict (e.g. built on the meta
    device): the same names and shapes, floating point, finite; else a ``ValueError`` naming
    ``where`` and the tensor (``hint`` is appended to shape errors, e.g. the config field)."""
    import torch

    for key in expected:
        if key not in tensors:
            raise ValueError(f"{where}: missing tensor '{key}'")
    for key, value in tensors.items():
        if key not in expected:
            raise ValueError(f"{where}: unexpected tensor '{key}'")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{where}: tensor '{key}' has shape {tuple(value.shape)}, "
                             f"expected {tuple(expected[key].shape)}{hint}")
        if not value.is_floating_point():
            raise ValueError(f"{where}: tensor '{key}' must be floating point, got {value.dtype}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{where}: tensor '{key}' has non-finite values")
