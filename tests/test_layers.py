"""Imports only go downward (DESIGN.md, Architecture): the op layer, the core (plan, cache),
the engines (runtime, integrations, arena), the methods (policies), api, the evaluation, and
the commands; no module imports one of a layer above it, even inside a function, and no
import circle exists. Read from the source (``ast``), so a lazy import counts too."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "omnicache"
LAYERS = [  # (module prefix, layer): the longest prefix wins
    ("omnicache", 0), ("omnicache.plan", 1), ("omnicache.cache", 1),
    ("omnicache.runtime", 2), ("omnicache.integrations", 2), ("omnicache.arena", 2),
    ("omnicache.policies", 3), ("omnicache.api", 4), ("omnicache.evaluate", 5), ("omnicache.tuning", 5),
    ("omnicache.cli", 6), ("omnicache.train_default", 6), ("omnicache.arena.train", 6),
]


def _modules() -> dict:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def _imports(name: str, path, package: bool, modules: dict) -> set:
    """The omnicache modules ``name`` imports (anywhere in its code)."""
    here = name.split(".") if package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = subs if subs and len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for t in targets:
            while t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != name and t != "omnicache":  # the root package is lazy (PEP 562)
                found.add(t)
    return found


def _layer(name: str) -> int:
    return max((len(p), layer) for p, layer in LAYERS if name == p or name.startswith(p + "."))[1]


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, package, modules) for name, (path, package) in modules.items()}


def test_no_upward_import():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph, state, circles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_the_checker_sees_lazy_and_relative_imports():
    graph = _graph()
    assert "omnicache.runtime.default" in graph["omnicache.runtime.engine"]  # inside a function
    assert "omnicache.cache.units" in graph["omnicache.cache.session"]  # relative
