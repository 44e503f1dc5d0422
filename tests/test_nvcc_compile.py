"""CUDA compile track: ``nvcc`` builds every framework-free kernel file for sm_80 and sm_90a.

Runs on CPU CI (no GPU, CPU-only torch): the ``.cu`` files under ``csrc/cuda/`` include
only CUDA headers, so they compile without a CUDA torch; the torch glue
(``csrc/cuda/ops_cuda.cpp``) is built by ``setup.py`` only against a CUDA torch and is
not compiled here. Both architectures are compiled in one ``nvcc`` call per file, with
torch's own half/bfloat16 defines (as ``torch.utils.cpp_extension`` passes them) and
every nvcc and host-compiler warning an error. Skipped when ``nvcc`` is not on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
HEADERS = sorted(CUDA_DIR.glob("*.h"))  # launcher headers; a .cuh is device code included by the .cu only
DEVICE_HEADERS = sorted(CUDA_DIR.glob("*.cuh"))
NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not on PATH: the CUDA compile track needs a CUDA toolkit"
)

ARCH_FLAGS = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90a,code=sm_90a",
]  # fmt: skip
# What torch.utils.cpp_extension adds to every nvcc call of the real build.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
WARNINGS_AS_ERRORS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
FRAMEWORK_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|pybind11|Python)', re.M)


def _nvcc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.parametrize("path", SOURCES + HEADERS + DEVICE_HEADERS, ids=lambda p: p.name)
def test_kernel_files_are_framework_free(path: Path):
    # The CPU torch wheel lacks complete CUDA headers: kernel files may include only
    # CUDA and standard headers, so that this track can compile them.
    found = FRAMEWORK_INCLUDE.findall(path.read_text())
    assert not found, f"{path.name} includes framework headers ({found}); keep them in ops_cuda.cpp"


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source: Path, tmp_path: Path):
    args = [
        "-std=c++17", "-O3", "-c", *ARCH_FLAGS, *TORCH_NVCC_DEFINES, *WARNINGS_AS_ERRORS,
        f"-I{CUDA_DIR}", str(source), "-o", str(tmp_path / f"{source.stem}.o"),
    ]  # fmt: skip
    result = _nvcc(args, tmp_path)
    assert result.returncode == 0, (
        f"nvcc failed on {source.name} (exit {result.returncode}):\n{result.stderr}{result.stdout}"
    )
    assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


@needs_nvcc
@pytest.mark.parametrize("header", HEADERS, ids=lambda p: p.name)
def test_launcher_header_compiles_as_host_cpp(header: Path, tmp_path: Path):
    # The torch glue includes the launcher header from plain C++ (the host compiler,
    # no device pass): it must stand alone there too.
    main = tmp_path / "include_only.cpp"
    main.write_text(f'#include "{header.name}"\nint main() {{ return 0; }}\n')
    args = ["-std=c++17", "-x", "c++", "-c", *WARNINGS_AS_ERRORS, f"-I{CUDA_DIR}", str(main),
            "-o", str(tmp_path / "include_only.o")]  # fmt: skip
    result = _nvcc(args, tmp_path)
    assert result.returncode == 0, (
        f"{header.name} does not compile alone as host C++:\n{result.stderr}{result.stdout}"
    )
