"""The package's import graph: no cycles among its modules, and no module imports another's private names.

Every import counts, at module level or inside a function (a lazy import that loads a heavy
dependency late is still a dependency), except those under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import minidisagg

PACKAGE_ROOT = Path(minidisagg.__file__).parent


def module_name(path: Path) -> str:
    """``minidisagg.engine.scheduler`` for ``.../minidisagg/engine/scheduler.py`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in the module, outside ``if TYPE_CHECKING`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:  # noqa: N802 - ast's naming
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
            found.append(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
            found.append(node)

    Visitor().visit(tree)
    return found


def package_modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed."""
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, known: set[str]) -> set[str]:
    """The package modules an import statement loads (``from pkg import mod`` loads ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = node.module or ""
    if node.level:
        anchor = importer.split(".")[: -node.level] if not (PACKAGE_ROOT / "/".join(importer.split(".")[1:])).is_dir() \
            else importer.split(".")[: len(importer.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    targets = {base} if base in known else set()
    targets |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return targets


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = package_modules()
    known = set(modules)
    return {name: {t for node in module_imports(tree) for t in imported_modules(node, name, known) if t != name}
            for name, tree in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_finds_a_planted_cycle():
    graph = import_graph()
    assert "minidisagg.engine.scheduler" in graph and "minidisagg.engine.batch" in graph["minidisagg.engine.scheduler"]
    planted = {**graph, "minidisagg.engine.batch": graph["minidisagg.engine.batch"] | {"minidisagg.engine.scheduler"}}
    assert any("minidisagg.engine.scheduler" in c and "minidisagg.engine.batch" in c for c in cycles(planted))


def test_no_import_cycles_among_the_package_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (move the shared names to a module both can import): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for name, tree in package_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minidisagg"):
                offenders += [f"{name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, "private names imported across modules (make them public in one place): " + "; ".join(offenders)
