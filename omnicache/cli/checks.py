"""What every ``omnicache`` command checks before its first slow step: one-line argument
errors, and the device, numbers, seeds and output paths a command will need at its end,
so a bad argument costs nothing and touches no file."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit status 2, no usage dump or traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_device(text: str) -> None:
    """``--device``: a device this torch can allocate on (not ``meta``)."""
    from ..api import resolve_device

    try:
        resolve_device(text)
    except ValueError as e:
        raise ValueError(f"--device {text}: {e}") from None


def check_number(flag: str, value) -> None:
    """An optional float option: None or finite."""
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{flag} {value}: must be a finite number")


def check_seed(flag: str, value) -> None:
    """An optional seed: None or an int torch's generators take."""
    if value is not None and not -2**63 <= value < 2**64:  # what torch's generators take
        raise ValueError(f"{flag} {value}: must be an int in [-2**63, 2**64)")


def _writable_folder(flag: str, text: str, folder: Path, create: bool) -> None:
    """``folder`` exists (or, with ``create``, its first existing ancestor is a folder we can
    write in, so it can be made)."""
    folder = Path(os.path.abspath(folder))
    if not create and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"{flag} {text}: folder {folder} {what}")
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{flag} {text}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {text}: folder {anc} is not writable")


def check_out_file(flag: str, text: str, create_parents: bool = False) -> None:
    """``text`` is a file path the command can write at its end: not a folder, and in a
    folder that exists (or, with ``create_parents``, can be made) and is writable (the
    atomic write renames a new file into place there)."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{flag} {text}: is a folder, expected a file path")
    _writable_folder(flag, text, path.parent, create_parents)


def check_out_folder(flag: str, text: str, files: tuple = ()) -> None:
    """``text`` is a folder (existing or creatable) where ``files`` can be written."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {text}: is a file, expected a folder")
    _writable_folder(flag, text, path, create=True)
    for name in files:
        if (path / name).is_dir():
            raise ValueError(f"{flag} {text}: {path / name} is a folder, expected a file path")

