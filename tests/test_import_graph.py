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


# The layers of the house, lowest first: a module may import its own layer and the ones below.
LAYERS = {
    "fastft.errors": 0, "fastft.runtime": 0, "fastft._backend": 0, "fastft.config": 0, "fastft.atomic_files": 0,
    "fastft.ops": 1, "fastft.optim": 1,
    "fastft.models": 2, "fastft.data": 2,
    "fastft.train": 3,
    "fastft.search": 4, "fastft.bench": 4,
    "fastft.cli": 5, "fastft.__main__": 5,
    "fastft.resources": 5,  # the script that built the bundled datasets
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    return None


def test_layers_point_down():
    """ops <- models, data <- train <- search, bench <- cli: no import points up a layer (and
    models and data, side by side, do not import each other)."""
    graph = _graph()
    unplaced = sorted(m for m in graph if m != "fastft" and _layer(m) is None)
    assert not unplaced, f"modules outside the layer table: {unplaced}"
    up = [f"{a} -> {b}" for a, bs in graph.items() for b in bs
          if b != "fastft" and a != "fastft" and _layer(b) > _layer(a)]
    side = [f"{a} -> {b}" for a, bs in graph.items() for b in bs
            if {a.split(".")[1], b.split(".")[1]} == {"models", "data"} if b != "fastft" and a != "fastft"]
    assert not up and not side, "\n".join(up + side)


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


def _private_ops_uses(mods: dict[str, Path]) -> list[str]:
    """``module: name`` for every underscore-prefixed name a fastft module takes from another
    module of ``fastft.ops`` (``from fastft.ops.x import _y``, or ``alias._y`` on an imported ops
    module): fused layers and the optimizer must call the ops' public functions."""
    found = []
    for name, f in mods.items():
        tree = ast.parse(f.read_text())
        aliases: dict[str, str] = {}  # local name -> the fastft.ops module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastft.ops") and not node.level:
                if node.module == name:
                    continue
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{name}: from {node.module} import {a.name}")
                    elif f"{node.module}.{a.name}" in mods:  # a submodule (segments, adamw, ...)
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("fastft.ops") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and aliases[node.value.id] != name and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and ast.unparse(node.value).startswith("fastft.ops")):
                found.append(f"{name}: {ast.unparse(node)}")
    return found


def test_no_private_ops_names_outside_their_module():
    mods = _modules()
    assert "fastft.ops.rms_norm" in mods
    found = _private_ops_uses(mods)
    assert not found, "private names of fastft.ops used elsewhere (make them public functions):\n" + "\n".join(found)


def test_the_private_ops_checker_finds_a_use(tmp_path):
    f = tmp_path / "layer.py"
    f.write_text("from fastft.ops.rms_norm import _RMSNormFn, rms_norm\nimport fastft.ops.rope as r\nr._RoPEFn\n")
    g = tmp_path / "rms.py"
    g.write_text("from fastft.ops.rms_norm import _check\n")
    found = _private_ops_uses({"fastft.layer": f, "fastft.ops.rms_norm": g})
    assert found == ["fastft.layer: from fastft.ops.rms_norm import _RMSNormFn", "fastft.layer: fastft.ops.rope._RoPEFn"]
