"""omnicache.io: a write either lands complete or leaves the old file as it was, under a
failing writer, a file-size limit (RLIMIT_FSIZE) and SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from omnicache.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text

resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE needs a POSIX system")


def leftovers(folder, name):
    return [p.name for p in folder.iterdir() if p.name != name]


def test_writes_and_replaces(tmp_path):
    dest = tmp_path / "out.json"
    atomic_write_text(dest, "old\n")
    assert dest.read_text() == "old\n"
    os.chmod(dest, 0o640)
    atomic_write_json(dest, {"a": 1})
    assert dest.read_text() == '{\n "a": 1\n}\n'
    assert oct(dest.stat().st_mode & 0o777) == oct(0o640)  # the replaced file's mode is kept
    atomic_write_bytes(tmp_path / "new.bin", b"\x00\x01")
    assert (tmp_path / "new.bin").read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # as open(path, "w") would
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.bin", "out.json"]


def test_failing_writer_leaves_the_old_file(tmp_path):
    dest = tmp_path / "plot.png"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(dest) as tmp:
            assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("boom")
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path, "plot.png") == []
    with pytest.raises(ValueError):  # NaN is refused before anything is written
        atomic_write_json(dest, {"x": float("nan")})
    assert dest.read_bytes() == b"old"
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert dest.read_bytes() == b"new" and leftovers(tmp_path, "plot.png") == []


def test_folder_destination_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        atomic_write_text(tmp_path, "x")
    assert list(tmp_path.iterdir()) == []


def test_symlink_destination_replaces_its_target(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


# omnicache.io alone, without the package (and torch): fast subprocess start-up.
IMPORT_IO = f"""
import importlib.util
_spec = importlib.util.spec_from_file_location("omnicache_io", {str(__import__("omnicache.io").io.__file__)!r})
io_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(io_mod)
atomic_path, atomic_write_bytes = io_mod.atomic_path, io_mod.atomic_write_bytes
"""


def _limited(code: str, limit: int):
    """Run ``code`` in a fresh Python under RLIMIT_FSIZE = ``limit`` bytes."""
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", IMPORT_IO + textwrap.dedent(code)], capture_output=True, text=True,
                          preexec_fn=preexec, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


@pytest.mark.parametrize("writer", ["bytes", "path"])
def test_file_size_limit_leaves_the_old_file(tmp_path, writer):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"old complete file\n")
    code = f"""
        data = b"n" * 100_000
        if {writer!r} == "bytes":
            atomic_write_bytes({str(dest)!r}, data)
        else:
            with atomic_path({str(dest)!r}) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
        """
    proc = _limited(code, 4096)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr
    assert dest.read_bytes() == b"old complete file\n"
    assert leftovers(tmp_path, "data.bin") == []


def test_plan_save_under_a_file_size_limit_keeps_the_good_plan(tmp_path):
    from omnicache.plan import CachePlan
    from omnicache.policies import TaylorSeerConfig

    good = tmp_path / "good.json"
    TaylorSeerConfig(interval=2).plan(4, 2).save(good)
    before = good.read_bytes()
    proc = _limited(f"""
        from omnicache.policies import FORAConfig
        FORAConfig(interval=2).plan(200, 28).save({str(good)!r})
        """, 4096)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr
    assert good.read_bytes() == before
    CachePlan.load(good)
    assert leftovers(tmp_path, "good.json") == []


def test_sigkill_leaves_an_old_or_a_new_complete_file(tmp_path):
    """A writer killed at random moments: the file is always one complete version."""
    dest = tmp_path / "big.bin"
    size = 4 << 20
    dest.write_bytes(b"0" * size)
    code = f"""
        import sys
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        i = 0
        while True:
            i += 1
            atomic_write_bytes({str(dest)!r}, bytes([ord("a") + i % 26]) * {size})
        """
    seen = set()
    for delay in (0.05, 0.17, 0.4):
        proc = subprocess.Popen([sys.executable, "-c", IMPORT_IO + textwrap.dedent(code)], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = dest.read_bytes()
        assert len(data) == size and data == data[:1] * size, "a torn or truncated file"
        seen.add(data[:1])
    assert seen - {b"0"}, "the writer never completed a write; the test checked nothing"


DEMO_WRITE = """
import pathlib, types, torch
from omnicache.cli import run
rows = [dict(policy=name, compute_fraction=1.0, samples=torch.rand(3, 1, 8, 8)) for name in ("uncached", "fora")]
bench = types.SimpleNamespace(labels=torch.arange(3), guidance=2.0)
args = types.SimpleNamespace(device="cpu", steps=4, sampler="flow", seed=0)
run._write_demo(pathlib.Path({out!r}), rows, bench, args)
"""


def test_demo_output_under_a_file_size_limit_keeps_the_old_pair(tmp_path):
    """The demo's image and JSON: both new or both old, never a truncated PNG."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-c", DEMO_WRITE.format(out=str(out))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(old) == ["demo.json", "samples.png"] and old["samples.png"][:4] == b"\x89PNG"
    (out / "demo.json").write_text('{"old": true}\n')
    (out / "samples.png").write_bytes(b"old png")
    proc = _limited(DEMO_WRITE.format(out=str(out)), 4096)  # the PNG is larger than 4 KiB
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert (out / "demo.json").read_text() == '{"old": true}\n'
    assert (out / "samples.png").read_bytes() == b"old png"
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "samples.png"]


def test_demo_json_failure_keeps_the_old_image(tmp_path, monkeypatch):
    import types

    import torch

    from omnicache.cli import run

    out = tmp_path
    (out / "samples.png").write_bytes(b"old png")
    (out / "demo.json").write_text("old json")

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(run, "atomic_write_text", fail)
    rows = [dict(policy="uncached", samples=torch.rand(2, 1, 8, 8))]
    bench = types.SimpleNamespace(labels=torch.arange(2), guidance=2.0)
    args = types.SimpleNamespace(device="cpu", steps=4, sampler="flow", seed=0)
    with pytest.raises(OSError, match="disk full"):
        run._write_demo(out, rows, bench, args)
    assert (out / "samples.png").read_bytes() == b"old png" and (out / "demo.json").read_text() == "old json"
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "samples.png"]


def test_every_writer_goes_through_omnicache_io():
    """No module writes a file in place (a failed write would destroy the old file)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    raw = re.compile(r"\.write_(text|bytes)\(|torch\.save\(|open\([^)]*['\"][wa]b?\+?['\"]")
    named = re.compile(r"\b(savefig|save_file)\(")
    offenders = []
    for path in [*(root / "omnicache").rglob("*.py"), *(root / "benchmarks").glob("*.py")]:
        if path.name == "io.py":
            continue
        text = path.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            if raw.search(line) or (named.search(line) and "atomic_path" not in text):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "write through omnicache.io instead:\n" + "\n".join(offenders)
