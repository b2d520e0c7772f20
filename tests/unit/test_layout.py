"""Dependency rules of ARCHITECTURE.md section 2, enforced on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "hypha"
ROLES = {"gateway", "scheduler", "worker", "datanode"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of ``src/hypha`` -> the hypha modules it imports, anywhere in its body.

    Imports inside functions and under ``TYPE_CHECKING`` count: a circle hidden behind
    either is still a circle in the design. ``from package import name`` points at the
    submodule when ``name`` is one, else at the package.
    """
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_production_never_imports_testing() -> None:
    for name, targets in import_graph().items():
        if name.startswith("hypha.testing"):
            continue
        bad = sorted(t for t in targets if t == "hypha.testing" or t.startswith("hypha.testing."))
        assert not bad, f"{name} imports {bad}"


SIZE_REASON = "Over 400 lines:"
"""A module longer than ``MAX_LINES`` says why in its docstring, after this phrase."""
MAX_LINES = 420


def test_modules_are_a_few_hundred_lines_or_say_why() -> None:
    for path in SRC.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert SIZE_REASON in doc, f"{path.relative_to(SRC)} has {lines} lines and no '{SIZE_REASON}' reason"


def test_protocol_imports_nothing_from_hypha() -> None:
    for path in _modules("protocol"):
        bad = {n for n in _imports(path) if n.startswith("hypha") and not n.startswith("hypha.protocol")}
        assert not bad, f"{path}: {bad}"


def test_training_never_imports_trio_net_or_roles() -> None:
    for path in _modules("training"):
        for name in _imports(path):
            top = name.split(".")
            assert top[0] != "trio", f"{path} imports trio"
            assert not (top[0] == "hypha" and len(top) > 1 and (top[1] == "net" or top[1] in ROLES)), path


def test_roles_never_import_each_other() -> None:
    for role in ROLES:
        if not (SRC / role).exists():
            continue
        for path in _modules(role):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] == "hypha" and len(parts) > 1 and parts[1] in ROLES:
                    assert parts[1] == role, f"{path} imports {name}"


def test_only_cli_and_local_call_trio_run() -> None:
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(("cli/", "local/", "testing/")) or rel == "local.py":
            continue
        assert "trio.run(" not in path.read_text(), f"{rel} calls trio.run"
