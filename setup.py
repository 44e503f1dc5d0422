"""Builds omnicache._C: the C++ CPU kernels always, the CUDA kernels when torch has
CUDA and nvcc exists. Build with torch outside build isolation:

    pip install --no-build-isolation -e .
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - set-up error path
    sys.exit("omnicache: install torch first, then `pip install --no-build-isolation .`")


def cuda_unavailable_reason() -> str | None:
    if os.environ.get("OMNICACHE_NO_CUDA", "0") == "1":
        return "OMNICACHE_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found"
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
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "-DNDEBUG", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "omnicache._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}
    )


setup(
    packages=find_packages(include=["omnicache", "omnicache.*"]) + ["omnicache.kernels"],
    package_dir={"omnicache": "omnicache", "omnicache.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
