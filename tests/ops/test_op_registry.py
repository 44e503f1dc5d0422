"""omnicache.ops is one registry: every op of csrc/ops.cpp has one section in ops.py
(its Triton custom op, fake, torch backend and public function), ``OPS`` and
``__all__`` come from it, and each op's docstring names its kernel files and its spec."""

import re
from pathlib import Path

import pytest
import torch

import omnicache.ops as ops
from omnicache import reference

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = (ROOT / "csrc" / "ops.cpp").read_text()
KERNELS = re.compile(r"Kernels: (\S+) \(CPU[;)].*?, (\S+) \(CUDA\), (\S+) \(Triton\); spec: omnicache\.reference\.(\w+)\.")


def test_ops_are_the_schemas_in_order():
    assert ops.OPS == tuple(re.findall(r'm\.def\("(\w+)\(', SCHEMAS))


def test_all_is_derived_from_the_registry():
    assert ops.__all__ == [*ops.OPS, "set_backend", "get_backend", "available_backends"]
    assert all(callable(getattr(ops, name)) for name in ops.__all__)


@pytest.mark.parametrize("name", ops.OPS)
def test_each_op_is_registered_in_both_namespaces(name):
    entry = ops._REGISTRY[name]
    assert entry.public is getattr(ops, name) and entry.public.__name__ == name
    assert hasattr(torch.ops.omnicache, name) and hasattr(torch.ops.omnicache_triton, name)
    for namespace in ("omnicache", "omnicache_triton"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", "Meta")


@pytest.mark.parametrize("name", ops.OPS)
def test_docstring_names_the_kernel_files_and_the_spec(name):
    doc = " ".join(getattr(ops, name).__doc__.split())
    found = KERNELS.search(doc)
    assert found, f"{name}: no 'Kernels: ... (CPU), ... (CUDA), ... (Triton); spec: ...' line"
    *paths, spec = found.groups()
    assert spec == name and callable(getattr(reference, spec))
    stem = name.rstrip("_")
    for path in paths:
        assert (ROOT / path).is_file(), f"{name}: {path} does not exist"
        assert stem in (ROOT / path).read_text(), f"{name}: {path} does not hold its kernel"
