"""Triton compile track: every ``@triton.jit`` kernel in ``kernels/`` compiled ahead of
time for ``GPUTarget("cuda", 80|90, 32)``, with no GPU.

    python tools/triton_compile_track.py                 # check, print the table
    python tools/triton_compile_track.py --write         # also write benchmarks/results/triton-compile-<date>.{md,json}

What it does, generically (no list of kernels or branches to keep in step):

- **kernels**: every ``JITFunction`` defined in a module of ``omnicache.kernels``;
- **branches**: a ``tl.constexpr`` parameter that appears in an ``if`` test of the kernel
  body is a branch: ``P == <int>`` comparisons give those ints (plus one more value when the
  chain ends in ``else``), any other use in a test gives ``False``/``True``; the track
  compiles the cross product of all branch values;
- **sizes**: every other constexpr (``BLOCK``, ``CHUNK``, ...) and ``num_warps`` take the
  value the launcher passes (a flag it computes with a comparison or ``not``: both values): the keyword expression at the kernel's call site, evaluated
  with the module's globals and the launcher's default arguments (tuning defaults). A
  size that cannot be evaluated there needs an entry in ``SIZE_HINTS`` (the track stops
  with an error naming it, so a new kernel cannot be skipped silently);
- **arguments**: ``*_ptr`` parameters are pointers, of the op dtype (fp32, fp16, bf16)
  unless their comment starts with ``float32``, ``int64`` or ``int32``; others are ``i32``;
- **alignment**, as Triton's JIT specialises on it (``tt.divisibility`` 16):
  ``aligned``: every pointer and every integer argument divisible by 16 (shapes that are
  multiples of 16); ``unaligned``: pointers 16-byte aligned (torch's allocator) but no
  integer argument known divisible by 16.

Checks: no register spills anywhere (``ptxas -v`` on the generated PTX, the flags Triton
uses); for ``aligned`` compiles, the widest global load is a vector load (``ld.global.v2``
or ``.v4``). Unaligned compiles are reported, not asserted (masked loads on sizes not
known divisible by 16 are expected to be scalar). Exit status 1 on a failed check or a
failed compile.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import importlib
import inspect
import itertools
import json
import math
import os
import pkgutil
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (no warning)
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton compile track: unset TRITON_INTERPRET (it replaces @triton.jit)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ALIGNMENTS = ("aligned", "unaligned")
FIXED_POINTERS = {"float32": "fp32", "int64": "i64", "int32": "i32"}  # a *_ptr comment's first word
DIV = [["tt.divisibility", 16]]

# Size constexprs whose launcher value is computed at run time (not a default): the
# values that occur. Key: (kernel name, parameter) -> values.
SIZE_HINTS: dict[tuple[str, str], tuple] = {
    # stage 2 of the reductions: K statistics per chunk (rel_l1 2, trajectory_stats 3,
    # store_residual 4); KP follows from K at the call site (next power of two).
    ("_sum_partials_kernel", "K"): (2, 3, 4),
}
# Aligned compiles whose widest load may be scalar, with the reason.
SCALAR_OK: dict[tuple[str, str], str] = {
    ("_sum_partials_kernel", "K=3"): "a row of 3 float32 statistics is 12 bytes: no 8/16-byte vector",
}


@dataclass
class Kernel:
    name: str
    module: str
    fn: JITFunction
    pointers: dict[str, str]  # name -> "op" or a fixed triton dtype ("fp32")
    ints: list[str]
    branches: dict[str, list]  # constexpr -> values
    sizes: list[dict]  # one dict of size constexprs (+ num_warps) per call-site variant


@dataclass
class Result:
    kernel: str
    dtype: str
    arch: int
    alignment: str
    branch: str
    sizes: str
    num_warps: int
    registers: int | None = None
    shared: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    load: str = ""  # widest ld.global form, e.g. "v4.b32"
    load_bytes: int = 0
    store: str = ""
    compile_s: float = 0.0
    ptx_hash: str = ""  # of the PTX without comments: equal hashes are the same code
    error: str = ""
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- discovery

def _kernel_modules():
    import omnicache.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        yield importlib.import_module(f"{pkg.__name__}.{info.name}")


def _param_comments(fn: JITFunction) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(fn.fn).splitlines():
        m = re.match(r"\s*(\w+)\s*(?::[^,#]*)?,?\s*#\s*(.*)", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def _branches(fn: JITFunction, constexprs: list[str]) -> dict[str, list]:
    """Constexprs tested by an ``if`` (or a conditional expression) of the kernel body, and
    the values that take every branch: compared with an int constant ``c``, ``== c``
    gives ``c`` and one value that is none of the compared ones (the ``else``),
    ``< c``/``>= c`` give ``c - 1`` and ``c``, ``> c``/``<= c`` give ``c`` and ``c + 1``;
    any other use in a test gives ``False`` and ``True``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    tested: set[str] = set()
    ints: dict[str, set[int]] = {}
    equal: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.If, ast.IfExp, ast.While)):
            continue
        for sub in ast.walk(node.test):
            if isinstance(sub, ast.Name) and sub.id in constexprs:
                tested.add(sub.id)
            if not (isinstance(sub, ast.Compare) and len(sub.ops) == 1):
                continue
            left, op, right = sub.left, sub.ops[0], sub.comparators[0]
            if isinstance(right, ast.Name) and isinstance(left, ast.Constant):  # 2 == MODE
                left, right = right, left
                op = {ast.Lt: ast.Gt(), ast.Gt: ast.Lt(), ast.LtE: ast.GtE(), ast.GtE: ast.LtE()}.get(type(op), op)
            if not (isinstance(left, ast.Name) and left.id in constexprs and isinstance(right, ast.Constant)
                    and isinstance(right.value, int) and not isinstance(right.value, bool)):
                continue
            c = right.value
            values = ints.setdefault(left.id, set())
            if isinstance(op, (ast.Eq, ast.NotEq)):
                values.add(c)
                equal.add(left.id)
            elif isinstance(op, (ast.Lt, ast.GtE)):
                values |= {c - 1, c}
            elif isinstance(op, (ast.Gt, ast.LtE)):
                values |= {c, c + 1}
    result = {}
    for name in constexprs:  # in parameter order
        if name not in tested:
            continue
        if name not in ints:
            result[name] = [False, True]
            continue
        values = sorted(ints[name])
        if name in equal:
            values.append(max(values) + 1)
        result[name] = sorted(set(values))
    return result


def _call_sites(kernel_name: str, modules) -> list[tuple[object, ast.Call, ast.FunctionDef | None]]:
    sites = []
    for mod in modules:
        tree = ast.parse(inspect.getsource(mod))
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)):
                continue
            target = node.func.value
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
            if name != kernel_name:
                continue
            launcher = node
            while launcher is not None and not isinstance(launcher, ast.FunctionDef):
                launcher = parents.get(launcher)
            sites.append((mod, node, launcher))
    return sites


def _sizes(kernel_name: str, sizes: list[str], modules) -> list[dict]:
    """Values of the size constexprs and num_warps at every call site."""
    variants = []
    sites = _call_sites(kernel_name, modules)
    if not sites:
        raise SystemExit(f"triton compile track: no launch of {kernel_name} found in kernels/")
    for mod, call, launcher in sites:
        namespace = dict(vars(mod))
        if launcher is not None:
            sig = inspect.signature(getattr(mod, launcher.name))
            namespace.update({p.name: p.default for p in sig.parameters.values()
                              if p.default is not inspect.Parameter.empty and p.default is not None})
        keywords = {kw.arg: kw.value for kw in call.keywords if kw.arg}
        wanted = [*sizes, "num_warps"]
        # Each size either evaluates at the call site, or comes from SIZE_HINTS (then the
        # local name it was passed as is bound, so that later sizes can use it).
        choices: list[list[tuple[str, object, str | None]]] = []
        for name in wanted:
            expr = keywords.get(name)
            if expr is None:
                if name == "num_warps":
                    choices.append([(name, 4, None)])  # Triton's default
                    continue
                raise SystemExit(f"triton compile track: {kernel_name} launched without {name}=")
            hint = SIZE_HINTS.get((kernel_name, name))
            local = expr.id if isinstance(expr, ast.Name) else None
            if hint is not None:
                choices.append([(name, v, local) for v in hint])
            elif isinstance(expr, (ast.Compare, ast.BoolOp)) or (
                    isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not)):
                # A flag the launcher computes (`gate is not None`) that no `if` tests
                # (e.g. used in tl.where): both values.
                choices.append([(name, False, None), (name, True, None)])
            else:
                choices.append([(name, expr, local)])
        for combo in itertools.product(*choices):
            env, values = dict(namespace), {}
            for name, value, local in combo:
                if isinstance(value, ast.AST):
                    try:
                        value = eval(compile(ast.Expression(value), "<launch>", "eval"), env)
                    except Exception as exc:  # noqa: BLE001
                        raise SystemExit(
                            f"triton compile track: cannot evaluate {name}="
                            f"{ast.unparse(value)} at {mod.__name__}'s launch of {kernel_name} "
                            f"({exc}); add ({kernel_name!r}, {name!r}) to SIZE_HINTS") from None
                elif local is not None:
                    env[local] = value
                values[name] = value
            if values not in variants:
                variants.append(values)
    return variants


def discover() -> list[Kernel]:
    modules = list(_kernel_modules())
    kernels, seen = [], set()
    for mod in modules:
        for obj in vars(mod).values():
            if not isinstance(obj, JITFunction) or id(obj) in seen or obj.fn.__module__ != mod.__name__:
                continue
            seen.add(id(obj))
            comments = _param_comments(obj)
            constexprs = [p.name for p in obj.params if p.is_constexpr]
            pointers, ints = {}, []
            for p in obj.params:
                if p.is_constexpr:
                    continue
                if p.name.endswith("_ptr"):  # the op dtype unless the comment starts with a fixed one
                    note = comments.get(p.name, "").lower()
                    pointers[p.name] = next((t for w, t in FIXED_POINTERS.items() if note.startswith(w)), "op")
                else:
                    ints.append(p.name)
            branches = _branches(obj, constexprs)
            sizes = [c for c in constexprs if c not in branches]
            kernels.append(Kernel(obj.__name__, mod.__name__, obj, pointers, ints, branches,
                                  _sizes(obj.__name__, sizes, modules)))
    if not kernels:
        raise SystemExit("triton compile track: no @triton.jit kernel found in omnicache.kernels")
    return kernels


# ------------------------------------------------------------------------------ compiling

def _ptxas_report(ptx: str, arch: int, fp_fusion: bool) -> tuple[int, int, int, int]:
    """(registers, spill stores, spill loads, static shared bytes) from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
               "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return regs, int(spill.group(1)), int(spill.group(2)), int(smem.group(1)) if smem else 0


_LD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?(?:\.(v[248]))?\.([bfsu])(8|16|32|64|128)\b")
_ST = re.compile(r"\bst\.global(?:\.[a-z0-9_:]+)*?(?:\.(v[248]))?\.([bfsu])(8|16|32|64|128)\b")


def _widest(pattern: re.Pattern, ptx: str) -> tuple[str, int]:
    best, best_bytes = "", 0
    for vec, kind, bits in pattern.findall(ptx):
        n = int(vec[1:]) if vec else 1
        nbytes = n * int(bits) // 8
        if nbytes > best_bytes:
            best, best_bytes = f"{vec + '.' if vec else ''}{kind}{bits}", nbytes
    return best, best_bytes


def compile_one(k: Kernel, dtype: str, arch: int, alignment: str, branch: dict, sizes: dict) -> Result:
    num_warps = sizes.get("num_warps", 4)
    size_consts = {n: v for n, v in sizes.items() if n != "num_warps"}
    res = Result(kernel=k.name, dtype=dtype, arch=arch, alignment=alignment,
                 branch=" ".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in branch.items()) or "-",
                 sizes=" ".join(f"{n}={v}" for n, v in size_consts.items()), num_warps=num_warps)
    signature, attrs = {}, {}
    for i, p in enumerate(k.fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in k.pointers:
            t = k.pointers[p.name]
            signature[p.name] = "*" + (dtype if t == "op" else t)
            attrs[(i,)] = DIV
        else:
            signature[p.name] = "i32"
            if alignment == "aligned":
                attrs[(i,)] = DIV
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(
                ASTSource(k.fn, signature, {**branch, **size_consts}, attrs),
                target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps},
            )
        ptx = compiled.asm["ptx"]
        fusion = getattr(compiled.metadata, "enable_fp_fusion", True)
        res.registers, res.spill_stores, res.spill_loads, _ = _ptxas_report(ptx, arch, fusion)
        res.shared = int(compiled.metadata.shared)
        res.load, res.load_bytes = _widest(_LD, ptx)
        res.store, _ = _widest(_ST, ptx)
        body = "\n".join(line for line in ptx.splitlines() if not line.lstrip().startswith("//"))
        res.ptx_hash = hashlib.sha256(body.encode()).hexdigest()[:16]
    except Exception as exc:  # noqa: BLE001 - reported per compile
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    res.compile_s = round(time.perf_counter() - start, 2)
    if res.error:
        res.problems.append(f"compile failed: {res.error}")
        return res
    if res.spill_stores or res.spill_loads:
        res.problems.append(f"register spills ({res.spill_stores} B stored, {res.spill_loads} B loaded)")
    if alignment == "aligned" and res.load_bytes < 8:
        why = next((r for (kn, cond), r in SCALAR_OK.items()
                    if kn == k.name and cond in f"{res.branch} {res.sizes}".split()), None)
        if why is None:
            res.problems.append(f"scalar global loads ({res.load or 'none'}) on an aligned shape")
    return res


def run(archs=ARCHS, dtypes=tuple(DTYPES), log=print) -> tuple[list[Kernel], list[Result]]:
    kernels = discover()
    results = []
    for k in kernels:
        op_dtypes = dtypes if "op" in k.pointers.values() else ("fp32",)
        _ALL_VALUES_OF.update({n: len(v) for n, v in k.branches.items()})
        branch_names = list(k.branches)
        combos = [dict(zip(branch_names, vals)) for vals in itertools.product(*k.branches.values())]
        log(f"{k.module}.{k.name}: branches {k.branches or '-'}; sizes {k.sizes}; "
            f"{len(combos) * len(k.sizes) * len(op_dtypes) * len(archs) * len(ALIGNMENTS)} compiles")
        for sizes, branch, dtype, arch, alignment in itertools.product(
                k.sizes, combos, op_dtypes, archs, ALIGNMENTS):
            r = compile_one(k, dtype, arch, alignment, branch, sizes)
            results.append(r)
            if r.problems:
                log(f"  FAIL {k.name} {dtype} sm_{arch} {alignment} [{r.branch}] {r.sizes}: "
                    + "; ".join(r.problems))
    return kernels, results


# -------------------------------------------------------------------------------- report

def versions() -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    return {"triton": triton.__version__, "ptxas": get_ptxas(90).version, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _fold(branches: list[str]) -> str:
    """``A=0 B=0 / A=0 B=1`` -> ``A=0 B=*`` when the rows are a full cross product."""
    if len(branches) == 1:
        return branches[0]
    dicts = [dict(kv.split("=", 1) for kv in b.split()) for b in branches]
    names = list(dicts[0])
    values = {n: sorted({d[n] for d in dicts}) for n in names}
    if math.prod(len(v) for v in values.values()) != len(set(branches)):
        return " / ".join(branches)
    return " ".join(f"{n}={'*' if len(v) > 1 and len(v) == _ALL_VALUES_OF.get(n) else '|'.join(v)}"
                    for n, v in values.items())


_ALL_VALUES_OF: dict[str, int] = {}  # constexpr -> number of values compiled (set by run)


def table(results: list[Result], meta: dict, wall_s: float) -> str:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    by_key: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by_key.setdefault((r.kernel, r.sizes, r.dtype, r.arch, r.branch), {})[r.alignment] = r
    # Branch values that give the same PTX (aligned and unaligned) as an earlier row are
    # folded into it: the constexpr does not matter in that combination.
    rows: dict[tuple, list] = {}
    for (kernel, sizes, dtype, arch, branch), pair in by_key.items():
        same = (kernel, sizes, dtype, arch, tuple(pair[a].ptx_hash if a in pair else "" for a in ALIGNMENTS))
        if same in rows and all(pair[a].ptx_hash for a in pair):
            rows[same][1].append(branch)
        else:
            rows[same] = [pair, [branch]]
    lines = [  # the header, then one row per kernel, dtype, arch and folded branches
        "# Triton compile track", "",
        f"`python tools/triton_compile_track.py --write` on {meta['date']}: triton {meta['triton']}, "
        f"ptxas {meta['ptxas']}, no GPU (ahead-of-time `triton.compile` for "
        f"`GPUTarget(\"cuda\", 80|90, 32)`). {len(results)} compiles in {wall_s:.0f} s, "
        f"{sum(1 for r in results if r.problems)} failed checks.",
        "",
        "Registers and spills from `ptxas -v` on the generated PTX (Triton's flags); shared = "
        "Triton's shared-memory size in bytes. *aligned*: every pointer and integer argument "
        "known divisible by 16 (shapes that are multiples of 16); *unaligned*: pointers "
        "aligned, sizes not known divisible. Load/store: the widest `ld.global`/`st.global` "
        "in the PTX (v4.b32 = 16 bytes per thread). Branch values that compile to the same "
        "PTX as another row are folded into it (`*`: any value). Registers and shared "
        "memory are those of the aligned compile.",
        "",
        "| kernel | dtype | arch | branch | sizes, warps | registers | shared | spills "
        "| load aligned | store aligned | load unaligned | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, sizes, dtype, arch, _), (pair, branches) in rows.items():
        a, u = pair.get("aligned"), pair.get("unaligned")
        ref = a or u
        status = "; ".join(p for r in (a, u) if r for p in r.problems) or "ok"
        spills = max((r.spill_stores or 0) + (r.spill_loads or 0) for r in (a, u) if r)
        lines.append(
            f"| {kernel} | {dtype} | {sm_arch_from_capability(arch)} | {_fold(branches)} | "
            f"{sizes}, {ref.num_warps} | {ref.registers if ref.registers is not None else '-'} | "
            f"{ref.shared if ref.shared is not None else '-'} | {spills} | "
            f"{a.load if a else '-'} | {a.store if a else '-'} | {u.load if u else '-'} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="write benchmarks/results/triton-compile-<date>.{md,json}")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--arch", type=int, action="append", help="compute capability (default 80, 90)")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    kernels, results = run(tuple(args.arch or ARCHS), tuple(args.dtype or DTYPES))
    wall = time.perf_counter() - start
    meta = versions()
    md = table(results, meta, wall)
    print(md)
    failed = [r for r in results if r.problems]
    unaligned_scalar = sum(1 for r in results if r.alignment == "unaligned" and r.load_bytes < 8)
    print(f"triton compile track: {len(kernels)} kernels, {len(results)} compiles in {wall:.0f} s; "
          f"{len(failed)} failed checks; {unaligned_scalar} unaligned compiles with scalar loads "
          "(expected: sizes not known divisible by 16)")
    if args.write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.out_dir / f"triton-compile-{meta['date'][:10]}"
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".json").write_text(json.dumps(
            {**meta, "wall_s": round(wall, 1), "results": [asdict(r) for r in results]}, indent=1) + "\n")
        print(f"wrote {stem}.md and .json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
