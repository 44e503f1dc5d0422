"""The CPU and CUDA kernels of every op have the same C++ signature.

A CUDA build of torch refuses (aborts the process at `import omnicache._C`) when two
dispatch keys register one op with C++ functions of different types, e.g. `at::Tensor`
by value on CPU and `const at::Tensor&` on CUDA. A CPU-only torch never sees the CUDA
registration, so this source-level check is what catches a divergence on CPU CI; the
CUDA build track (tools/cuda_build_track.sh) also imports the real CUDA build.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CPU = CSRC / "cpu" / "ops_cpu.cpp"
CUDA = CSRC / "cuda" / "ops_cuda.cpp"
SCHEMAS = CSRC / "ops.cpp"

IMPL = re.compile(r'm\.impl\(\s*"(\w+)"\s*,\s*&?\s*(\w+)\s*\)')
DEF = re.compile(r'm\.def\(\s*"(\w+)\(')


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _normalise(decl: str) -> str:
    decl = re.sub(r"\s+", " ", decl).strip()
    decl = re.sub(r"\s*([(),&*<>])\s*", r"\1", decl)
    # `const T&` and `T const&` are the same type.
    decl = re.sub(r"\bconst ([\w:]+(?:<[^<>]*>)?)&", r"\1 const&", decl)
    return decl


def _param_types(params: str) -> list[str]:
    """Types of a parameter list, names and defaults dropped."""
    out, depth, cur = [], 0, ""
    for ch in params:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    types = []
    for p in out:
        p = p.split("=")[0].strip()
        p = re.sub(r"\s*\b\w+$", "", p)  # the parameter name
        types.append(_normalise(p))
    return types


def signatures(path: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """op name -> (return type, parameter types) of the function each m.impl registers."""
    text = _strip_comments(path.read_text())
    result = {}
    for op, fn in IMPL.findall(text):
        m = re.search(r"([\w:<>]+(?:\s*[&*])?)\s+" + fn + r"\s*\(([^)]*)\)\s*\{", text)
        assert m is not None, f"{path.name}: no definition of {fn} (registered for {op})"
        result[op] = (_normalise(m.group(1)), tuple(_param_types(m.group(2))))
    return result


def test_parser_sees_through_spelling():
    assert _param_types("at::Tensor const & a, const at::Tensor& b") == ["at::Tensor const&"] * 2
    assert _param_types("const std::optional<at::Tensor>& g") == ["std::optional<at::Tensor> const&"]
    assert _param_types("at::Tensor hidden") == ["at::Tensor"]


def test_every_op_has_a_cpu_and_a_cuda_kernel():
    ops = set(DEF.findall(SCHEMAS.read_text()))
    assert ops, "no schemas found in csrc/ops.cpp"
    assert set(signatures(CPU)) == ops
    assert set(signatures(CUDA)) == ops


@pytest.mark.parametrize("op", sorted(set(DEF.findall(SCHEMAS.read_text()))))
def test_cpu_and_cuda_signatures_are_identical(op):
    cpu, cuda = signatures(CPU)[op], signatures(CUDA)[op]
    assert cpu == cuda, (
        f"{op}: the CPU kernel is {cpu[0]}({', '.join(cpu[1])}) but the CUDA kernel is "
        f"{cuda[0]}({', '.join(cuda[1])}); a CUDA torch aborts the import on this"
    )
