"""Builds omnicache._C: the C++ CPU kernels always, the CUDA kernels when torch has
CUDA and nvcc exists. Build with torch outside build isolation:

    pip install --no-build-isolation -e .
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - set-up error path
    sys.exit("omnicache: install torch first, then `pip install --no-build-isolation .`")


# SASS for sm_80 (A100) and sm_90a (H100/H200), plus PTX for compute_90, which the
# driver JIT-compiles on newer GPUs ("+PTX" on an arch-specific "a" target gives the PTX
# of its portable base: sm_90a code runs only on sm_90). Override with
# OMNICACHE_CUDA_GENCODE (same syntax as TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0a;10.0+PTX").
DEFAULT_GENCODE = "8.0;9.0a+PTX"


def _has_runtime_header(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) or bool(
        glob.glob(os.path.join(root, "targets", "*", "include", "cuda_runtime.h"))
    )


def _toolkit_of_nvcc(nvcc: str) -> str | None:
    """The toolkit root (the folder with include/cuda_runtime.h) of an nvcc: symlinks
    resolved, and a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``)
    followed to the nvcc it runs."""
    path, seen = nvcc, set()
    while path not in seen and len(seen) < 8:
        seen.add(path)
        real = os.path.realpath(path)
        root = os.path.dirname(os.path.dirname(real))
        if _has_runtime_header(root):
            return root
        try:
            with open(real, "rb") as f:
                head = f.read(8192)
        except OSError:
            return None
        if not head.startswith(b"#!"):
            return None  # a binary outside a toolkit layout
        targets = [m.decode() for m in re.findall(rb"(/[^\s\"'$;|&]*/nvcc)(?![\w.])", head)]
        targets = [t for t in targets if os.path.isfile(t) and os.path.realpath(t) != real]
        if not targets:
            return None
        path = targets[0]
    return None


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit root, where it came from): CUDA_HOME or CUDA_PATH, then the nvcc on
    PATH (through symlinks and wrapper scripts), then /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if not os.path.isfile(os.path.join(root, "bin", "nvcc")):
                sys.exit(f"omnicache: {var}={root} has no bin/nvcc")
            return root, var
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        root = _toolkit_of_nvcc(nvcc)
        if root is not None:
            return root, f"nvcc on PATH ({nvcc})"
        print(f"omnicache: nvcc on PATH ({nvcc}) is not inside a CUDA toolkit; ignoring it",
              file=sys.stderr)
    if os.path.isfile("/usr/local/cuda/bin/nvcc") and _has_runtime_header("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda"), "/usr/local/cuda"
    return None, "no CUDA toolkit found (CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda)"


def nvcc_version(root: str) -> str:
    out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True, check=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        sys.exit(f"omnicache: cannot read the version of {root}/bin/nvcc")
    return f"{found.group(1)}.{found.group(2)}"


def gencode_flags(spec: str) -> list[str]:
    """"8.0;9.0a+PTX" -> nvcc -gencode flags: SASS for each arch, and PTX where marked
    (of the portable base arch for an "a"/"f" target)."""
    flags = []
    for item in filter(None, (x.strip() for x in re.split(r"[;\s]+", spec))):
        arch = item.removesuffix("+PTX").replace(".", "")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if item.endswith("+PTX"):
            base = arch.rstrip("af")
            flags += ["-gencode", f"arch=compute_{base},code=compute_{base}"]
    return flags


def cuda_unavailable_reason() -> str | None:
    if os.environ.get("OMNICACHE_NO_CUDA", "0") == "1":
        return "OMNICACHE_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    root, source = find_cuda_home()
    if root is None:
        return source
    nvcc = nvcc_version(root)
    if nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        sys.exit(f"omnicache: CUDA major version mismatch: torch {torch.__version__} is built "
                 f"with CUDA {torch.version.cuda} but nvcc in {root} is CUDA {nvcc}; use a "
                 f"CUDA {torch.version.cuda.split('.')[0]}.x toolkit (CUDA_HOME=...) or "
                 "OMNICACHE_NO_CUDA=1")
    print(f"omnicache: CUDA toolkit {root} (from {source}), nvcc {nvcc}, torch CUDA "
          f"{torch.version.cuda}", file=sys.stderr)
    # torch.utils.cpp_extension finds nvcc through its CUDA_HOME, which it guessed at
    # import (for a wrapper script in /usr/local/bin: /usr/local, wrong): use ours.
    cpp_extension.CUDA_HOME = root
    os.environ["CUDA_HOME"] = root
    return None


def extension():
    sources = ["csrc/ops.cpp", "csrc/checks.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # fp-contract=off: the AVX2 and baseline CPU paths round identically.
    # no-trapping-math lets GCC if-convert (and so vectorise) the half conversions;
    # torch builds with the same two flags. Never -ffast-math: it would reorder sums.
    cxx = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"]
    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"omnicache: building without CUDA kernels ({reason}); CPU and Triton only",
              file=sys.stderr)
        return cpp_extension.CppExtension("omnicache._C", sources, extra_compile_args={"cxx": cxx})
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    # Explicit -gencode flags: torch then adds no arch flags of its own (whatever
    # TORCH_CUDA_ARCH_LIST or the local GPU says).
    spec = os.environ.get("OMNICACHE_CUDA_GENCODE", DEFAULT_GENCODE)
    print(f"omnicache: CUDA kernels for {spec}", file=sys.stderr)
    nvcc = ["-O3", "-DNDEBUG", "-lineinfo", *gencode_flags(spec)]
    return cpp_extension.CUDAExtension(
        "omnicache._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}
    )


setup(
    packages=find_packages(include=["omnicache", "omnicache.*"]) + ["omnicache.kernels"],
    package_dir={"omnicache": "omnicache", "omnicache.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
