"""The import graph of the ``fastft`` package has no cycles: module-level imports, imports inside
functions (lazy imports for start-up time are fine, but one that closes a cycle only hides it) and
the implicit import of a module's parent packages all count. Read from the source (AST), so the
test needs no imports of its own. Also: ``fastft.ops`` exports the op functions, not modules."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fastft"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        if "kernels" in f.relative_to(PKG).parts:  # Triton launchers: leaves importing only fastft.ops
            continue
        parts = ("fastft",) + f.relative_to(PKG).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in mods:
                return ".".join(parts[:i])
        return None

    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        edges: set[str] = set()
        pkg_parts = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        # A module's own parent packages are already being initialised when it runs (a package's
        # __init__ may re-export its children), so they are not edges; another package's parents
        # are: importing x.y.z runs x/y/__init__ first, which may import anything.
        own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg_parts[:len(pkg_parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("fastft"):
                    r = resolve(t)
                    if r and r not in own:
                        edges.add(r)
                        parts = r.split(".")  # and the target's parent packages
                        edges.update(".".join(parts[:i]) for i in range(1, len(parts))
                                     if ".".join(parts[:i]) not in own)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 30 and "fastft.models.loss" in graph and "fastft.train.recipe" in graph
    cycles = _cycles(graph)
    detail = [f"{c}: " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) for c in cycles]
    assert not cycles, "\n".join(detail)


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_ops_exports_functions():
    from fastft.ops import (causal_attention, fused_linear_cross_entropy, lora_linear, rms_norm, rope,
                            swiglu)

    import fastft.ops.rms_norm  # noqa: F401  (importing the submodule again must not rebind the name)
    import fastft.ops as ops

    for f in (fused_linear_cross_entropy, lora_linear, causal_attention, rms_norm, swiglu, rope):
        assert inspect.isfunction(f), f
    assert inspect.isfunction(ops.rms_norm) and inspect.isfunction(ops.fused_linear_cross_entropy)
