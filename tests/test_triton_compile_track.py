"""The Triton compile track's discovery, and one ahead-of-time compile (no GPU).

The full track (every kernel, dtype, arch and branch: ``python
tools/triton_compile_track.py``) runs from ``.ci/run``; this keeps its discovery honest
in the main suite: every ``@triton.jit`` kernel is found, with the constexpr branches
its launcher can pick.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces @triton.jit", allow_module_level=True)
pytest.importorskip("triton")

TRACK = Path(__file__).resolve().parents[1] / "tools" / "triton_compile_track.py"


@pytest.fixture(scope="module")
def track():
    spec = importlib.util.spec_from_file_location("triton_compile_track", TRACK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernels(track):
    return {k.name: k for k in track.discover()}


def test_every_jit_kernel_is_discovered(kernels):
    import triton

    import omnicache.kernels as pkg

    jitted = set()
    for name in pkg.__all__:
        mod = getattr(pkg, name)
        jitted |= {n for n, v in vars(mod).items()
                   if isinstance(v, triton.runtime.jit.JITFunction) and v.fn.__module__ == mod.__name__}
    assert jitted and jitted == set(kernels)


def test_branches_and_sizes_come_from_the_kernels_and_launchers(kernels):
    from omnicache.kernels import utils

    apply = kernels["_apply_residual_kernel"]
    assert apply.branches["HAS_CORRECTION"] == [False, True]
    assert apply.branches["GAMMA_MODE"] == [0, 1, 2]  # == 0, == 1, else
    assert apply.pointers["gamma_ptr"] == "fp32" and apply.pointers["hidden_ptr"] == "op"
    assert apply.sizes == [{"BLOCK": utils.ELEMENTWISE_BLOCK, "num_warps": utils.ELEMENTWISE_WARPS}]
    sums = kernels["_sum_partials_kernel"]
    assert {(s["K"], s["KP"]) for s in sums.sizes} == {(2, 2), (3, 4), (4, 4)}


def test_one_compile_has_no_spills_and_vector_loads(track, kernels):
    k = kernels["_store_residual_kernel"]
    sizes = k.sizes[0]
    aligned = track.compile_one(k, "bf16", 90, "aligned", {"HAS_DELTA": True}, sizes)
    assert not aligned.problems, aligned.problems
    assert aligned.registers > 0 and aligned.spill_stores == 0
    assert aligned.load_bytes == 16  # ld.global.v4.b32
    unaligned = track.compile_one(k, "bf16", 90, "unaligned", {"HAS_DELTA": True}, sizes)
    assert unaligned.load_bytes < 8  # sizes not known divisible by 16: scalar loads


def test_branch_values_cover_every_branch(track):
    import triton
    import triton.language as tl

    @triton.jit
    def demo(x_ptr, ORDER: tl.constexpr, MODE: tl.constexpr, FLAG: tl.constexpr,
             BLOCK: tl.constexpr):
        v = tl.load(x_ptr + tl.arange(0, BLOCK))
        if ORDER >= 2:
            v = v * 2
        if FLAG and MODE == 1:
            v = v + 1
        elif 3 == MODE:
            v = v - 1
        tl.store(x_ptr + tl.arange(0, BLOCK), v)

    branches = track._branches(demo, ["ORDER", "MODE", "FLAG", "BLOCK"])
    assert branches == {"ORDER": [1, 2], "MODE": [1, 3, 4], "FLAG": [False, True]}
