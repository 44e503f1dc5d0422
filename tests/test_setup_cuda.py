"""setup.py's CUDA toolkit search, arch flags and version check, without a toolkit:
fake toolkits in tmp_path (an nvcc that prints a release line)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.fixture
def setup_ns():
    """setup.py's functions, without running setup()."""
    source = SETUP.read_text().split("\nsetup(\n")[0]
    ns = {"__name__": "omnicache_setup_under_test"}
    exec(compile(source, str(SETUP), "exec"), ns)
    return ns


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_toolkit(root: Path, release: str = "13.0") -> Path:
    _executable(root / "bin" / "nvcc",
                f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.88"\n')
    (root / "include").mkdir(parents=True, exist_ok=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_wrapper_script_on_path_leads_to_the_toolkit(setup_ns, tmp_path, clean_env):
    kit = fake_toolkit(tmp_path / "cuda-13.0")
    # /usr/local/bin/nvcc style: a script that execs the real one (not a symlink).
    _executable(tmp_path / "wrappers" / "nvcc", f'#!/bin/sh\nexec {kit}/bin/nvcc "$@"\n')
    clean_env.setenv("PATH", f"{tmp_path / 'wrappers'}{os.pathsep}{os.environ['PATH']}")
    root, source = setup_ns["find_cuda_home"]()
    assert root == str(kit) and "nvcc on PATH" in source
    assert setup_ns["nvcc_version"](root) == "13.0"


def test_symlinked_nvcc_resolves(setup_ns, tmp_path, clean_env):
    kit = fake_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(kit / "bin" / "nvcc")
    clean_env.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert setup_ns["find_cuda_home"]()[0] == str(kit)


def test_cuda_home_comes_first(setup_ns, tmp_path, clean_env):
    kit = fake_toolkit(tmp_path / "kit")
    clean_env.setenv("CUDA_HOME", str(kit))
    assert setup_ns["find_cuda_home"]() == (str(kit), "CUDA_HOME")
    clean_env.setenv("CUDA_HOME", str(tmp_path / "nothing"))
    with pytest.raises(SystemExit, match="has no bin/nvcc"):
        setup_ns["find_cuda_home"]()


def test_gencode_sm80_sm90a_and_portable_ptx(setup_ns):
    flags = setup_ns["gencode_flags"](setup_ns["DEFAULT_GENCODE"])
    pairs = [flags[i + 1] for i in range(0, len(flags), 2)]
    assert pairs == ["arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a",
                     "arch=compute_90,code=compute_90"]


def test_major_version_mismatch_is_one_clear_line(setup_ns, tmp_path, clean_env):
    kit = fake_toolkit(tmp_path / "cuda-12.4", release="12.4")
    clean_env.setenv("CUDA_HOME", str(kit))
    setup_ns["torch"] = SimpleNamespace(__version__="2.14.1+cu130", version=SimpleNamespace(cuda="13.0"))
    with pytest.raises(SystemExit) as exc:
        setup_ns["cuda_unavailable_reason"]()
    message = str(exc.value)
    assert "\n" not in message
    assert "CUDA 13.0" in message and "CUDA 12.4" in message and "mismatch" in message


def test_matching_toolkit_is_handed_to_cpp_extension(setup_ns, tmp_path, clean_env):
    kit = fake_toolkit(tmp_path / "cuda-13.0", release="13.0")
    clean_env.setenv("CUDA_HOME", str(kit))
    setup_ns["torch"] = SimpleNamespace(__version__="2.14.1+cu130", version=SimpleNamespace(cuda="13.0"))
    setup_ns["cpp_extension"] = fake = SimpleNamespace(CUDA_HOME=None)
    assert setup_ns["cuda_unavailable_reason"]() is None
    assert fake.CUDA_HOME == str(kit)
