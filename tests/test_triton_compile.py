"""Triton compile track for the newer constexpr branches: ``triton.compile`` of the
apply_residual_ and store_residual_ kernels ahead of time for ``GPUTarget("cuda", 80|90,
32)``, with no GPU (the interpreter track checks the numbers; this checks that the GPU
code generator accepts the kernels: scoping of values set under constexpr branches,
dtypes of the masked gamma/gate loads, the delta2 store).
"""

from __future__ import annotations

import itertools

import pytest

triton = pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")
GPUTarget = pytest.importorskip("triton.backends.compiler").GPUTarget

from omnicache.kernels import apply_residual as k_apply  # noqa: E402
from omnicache.kernels import store_residual as k_store  # noqa: E402
from omnicache.kernels import utils as k_utils  # noqa: E402

TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def _compile(fn, signature, constexprs, arch, num_warps):
    src = compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except FileNotFoundError as err:  # no ptxas bundled with this triton
        pytest.skip(f"triton cannot compile for CUDA here: {err}")


APPLY_CASES = [  # (correction, correction2, gate, gamma mode)
    (True, True, True, 2), (False, True, True, 1), (True, False, True, 0), (True, True, False, 2),
]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", APPLY_CASES, ids=str)
@pytest.mark.parametrize("n_ge_block", [True, False], ids=["N>=BLOCK", "N<BLOCK"])
def test_apply_residual_compiles(arch, case, n_ge_block):
    c1, c2, gate, mode = case
    t = TYPES["bfloat16"]
    sig = dict(hidden_ptr=t, residual_ptr=t, correction_ptr=t, correction2_ptr=t, gate_ptr=t,
               gamma_ptr="*fp32", total="i64", N="i64", D="i64", B="i32", HAS_CORRECTION="constexpr",
               HAS_CORRECTION2="constexpr", HAS_GATE="constexpr", GAMMA_MODE="constexpr",
               N_GE_BLOCK="constexpr", BLOCK="constexpr")
    const = dict(HAS_CORRECTION=c1, HAS_CORRECTION2=c2, HAS_GATE=gate, GAMMA_MODE=mode,
                 N_GE_BLOCK=n_ge_block, BLOCK=k_utils.ELEMENTWISE_BLOCK)
    kernel = _compile(k_apply._apply_residual_kernel, sig, const, arch, k_utils.ELEMENTWISE_WARPS)
    assert kernel.asm.get("cubin")


@pytest.mark.parametrize("arch", [90])
@pytest.mark.parametrize("dtype", list(TYPES))
@pytest.mark.parametrize("has_inp,has_delta2", list(itertools.product([True, False], repeat=2)))
def test_store_residual_compiles(arch, dtype, has_inp, has_delta2):
    t = TYPES[dtype]
    sig = dict(cache_ptr=t, delta_ptr=t, out_ptr=t, inp_ptr=t, delta2_ptr=t, part_ptr="*fp32",
               N="i64", n_chunks="i64", HAS_INP="constexpr", HAS_DELTA="constexpr",
               HAS_DELTA2="constexpr", CHUNK="constexpr", BLOCK="constexpr")
    const = dict(HAS_INP=has_inp, HAS_DELTA=True, HAS_DELTA2=has_delta2,
                 CHUNK=k_utils.REDUCE_CHUNK, BLOCK=k_utils.REDUCE_BLOCK)
    kernel = _compile(k_store._store_residual_kernel, sig, const, arch, k_utils.REDUCE_WARPS)
    assert kernel.asm.get("cubin")
