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
        if rel.startswith("cli/") or rel in ("local.py",) or rel.startswith("testing/"):
            continue
        assert "trio.run(" not in path.read_text(), f"{rel} calls trio.run"
