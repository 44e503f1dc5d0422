"""Backend choice: set_backend, OMNICACHE_BACKEND, available_backends, clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import omnicache.ops as ops
from opsutil import INTERPRET, backend


def test_available_backends_lists_what_runs_here():
    names = ops.available_backends()
    assert names[:1] == ["auto"] and "torch" in names and "cpu" in names
    assert ("cuda" in names) == (ops.cuda_kernels_built() and torch.cuda.is_available())
    assert ("triton" in names) == (torch.cuda.is_available() or INTERPRET)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.set_backend("fast")
    assert ops.get_backend() == "auto"


@pytest.mark.skipif(ops.cuda_kernels_built() and torch.cuda.is_available(), reason="cuda runs here")
def test_unavailable_cuda_backend_is_named():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ops.set_backend("cuda")


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRET, reason="triton runs here")
def test_triton_on_cpu_needs_the_interpreter():
    with pytest.raises(RuntimeError, match="backend 'triton' is not available.*TRITON_INTERPRET"):
        ops.set_backend("triton")
    # Calling the opaque op directly says the same, and writes nothing.
    h = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.omnicache_triton.apply_residual_(h, torch.ones(2, 3))
    assert not h.any()


def test_cpu_backend_refuses_other_devices():
    with backend("cpu"), pytest.raises(ValueError, match="backend 'cpu' cannot run on meta"):
        ops.rel_l1(torch.empty(2, 3, device="meta"), torch.empty(2, 3, device="meta"))


def test_backends_agree_on_cpu():
    x = [torch.randn(3, 1000) for _ in range(3)]
    results = {}
    for name in ops.available_backends():
        with backend(name):
            results[name] = ops.trajectory_stats(*x)
    for name, r in results.items():
        torch.testing.assert_close(r, results["torch"], rtol=1e-5, atol=1e-4, msg=name)


def test_token_ops_agree_bitwise_on_cpu():
    """Every backend that runs here gives the same bits (elementwise in float32, one
    rounding; the last occurrence of a repeated token wins everywhere)."""
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 40, (2, 30), generator=g)
    values, hidden, cache0 = torch.randn(2, 30, 24).bfloat16(), torch.randn(2, 40, 24).bfloat16(), \
        torch.randn(2, 40, 24).bfloat16()
    results = {}
    for name in ops.available_backends():
        with backend(name):
            cache = cache0.clone()
            results[name] = (ops.token_update_(cache, index, values, hidden), cache,
                             ops.gather_tokens(hidden, index))
    for name, r in results.items():
        tol = dict(rtol=0, atol=0) if name != "triton" else dict(rtol=2**-7, atol=0)  # interpreter: bf16 truncation
        for a, b in zip(r, results["torch"]):
            torch.testing.assert_close(a, b, **tol, msg=name)


def run_env(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMNICACHE_BACKEND=value)
    env.pop("TRITON_INTERPRET", None)
    code = "import omnicache.ops as o; print(o.get_backend())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_variable_sets_backend():
    proc = run_env("torch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "torch"


def test_environment_variable_bad_value_is_named():
    proc = run_env("nope")
    assert proc.returncode != 0
    assert "OMNICACHE_BACKEND" in proc.stderr and "unknown backend 'nope'" in proc.stderr
