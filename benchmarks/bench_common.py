"""What several benchmark scripts share: the machine's name and a file-name slug of it.

The scripts run as ``python benchmarks/<script>.py`` (with ``PYTHONSAFEPATH=1`` the script's
folder is not on ``sys.path``), so each puts this folder on the path before importing a
sibling: ``sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))``.
"""

from __future__ import annotations

import pathlib
import platform
import re

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """``text`` as a file-name part: runs of other characters -> ``-``, at most 40 characters."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40]
