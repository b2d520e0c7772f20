"""hypha.local, the shared TOML writer and the CLI's role runner (issue 12's refactor)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
import trio
import typer

from hypha.cli.main import main
from hypha.cli.runner import run_until_signal
from hypha.config import dumps, write_toml
from hypha.config.toml import format_value
from hypha.data.prepare import prepare_dataset
from hypha.errors import NetworkError
from hypha.local import Pki

SRC = Path(__file__).resolve().parents[2] / "src" / "hypha"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_nothing_outside_testing_imports_it_and_local_never_imports_cli() -> None:
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        names = _imports(path)
        if not rel.startswith("testing/"):
            assert not any(n.startswith("hypha.testing") for n in names), f"{rel} imports hypha.testing"
        if rel.startswith(("local/", "testing/")):
            assert not any(n.startswith("hypha.cli") for n in names), f"{rel} imports hypha.cli"


def test_harness_names_stay_importable() -> None:
    from hypha import local
    from hypha.testing import cluster

    for name in ("ChildNode", "Pki", "spawn_node", "write_toml", "open_test_node", "wait_until"):
        assert hasattr(cluster, name), name
    assert cluster.Pki is local.Pki
    assert cluster.spawn_node is local.spawn_node
    for name in local.__all__:
        assert hasattr(local, name), name


def test_toml_round_trips_tricky_values(tmp_path: Path) -> None:
    doc = {
        "text": 'quote " backslash \\ tab \t newline \n bell \x07 del \x7f snowman \u2603',
        "path": Path("/a b/c"),
        "flag": False,
        "num": 3,
        "ratio": 0.25,
        "items": ["a", 1, [True]],
        "inline": {"x": {"y": 1}},
        "table": {"k": "v", "n": 2},
        "rows": [{"class": "train", "args": ["-m", "x"]}, {"class": "aggregate"}],
    }
    parsed = tomllib.loads(write_toml(tmp_path / "x.toml", doc).read_text())
    assert parsed == {**doc, "path": "/a b/c"}
    assert dumps({}) == "\n"
    with pytest.raises(TypeError):
        format_value(None)


def test_run_until_signal_maps_errors(capsys: pytest.CaptureFixture[str]) -> None:
    async def fails_in_nursery() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_raise, NetworkError("peer gone"))

    with pytest.raises(typer.Exit) as exit_info:
        run_until_signal("test", fails_in_nursery)
    assert exit_info.value.exit_code == 1
    assert "peer gone" in capsys.readouterr().err

    async def bug() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(typer.Exit) as exit_info:
        run_until_signal("test", bug)
    assert exit_info.value.exit_code == 1
    captured = capsys.readouterr().err
    assert "internal error" in captured
    assert "RuntimeError: a bug" in captured


async def _raise(exc: BaseException) -> None:
    raise exc


def test_role_commands_validate_and_report(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["worker", "--config", str(missing), "--validate"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["scheduler", "--job", str(missing), "--validate"]) == 2
    assert "does not exist" in capsys.readouterr().err

    keys = pki.config_keys(pki.node("d", "data"))
    empty = write_toml(tmp_path / "empty.toml", {**keys, "dataset_path": []})
    assert main(["data", "--config", str(empty), "--validate"]) == 2
    assert f"{empty}: dataset_path: no dataset to serve" in capsys.readouterr().err
    broken = write_toml(tmp_path / "broken.toml", {**keys, "dataset_path": [str(tmp_path)]})
    assert main(["data", "--config", str(broken), "--validate"]) == 2
    assert f"{broken}: dataset_path: " in capsys.readouterr().err

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello hypha " * 40)
    prepare_dataset(tmp_path / "text", "tiny", tmp_path / "datasets" / "tiny", seq_len=8)
    tiny = tmp_path / "datasets" / "tiny"
    served = write_toml(tmp_path / "data.toml", {**keys, "dataset_path": [str(tiny)]})
    assert main(["data", "--config", str(served), "--validate"]) == 0
    assert f"{served}: data config is valid (tiny)" in capsys.readouterr().err
