"""Spare files: a bounded pool of used files that transfers overwrite instead of new ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypha.net.spares import SpareFiles, SpareStatistics


def make(path: Path, size: int) -> Path:
    path.write_bytes(b"x" * size)
    return path


def test_keeps_files_within_the_budget_and_deletes_the_rest(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare", max_bytes=300)
    assert spares.give(make(tmp_path / "a", 200))
    assert not spares.give(make(tmp_path / "b", 200))  # would exceed 300
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
    assert spares.statistics() == SpareStatistics(num_files=1, num_bytes=200, max_bytes=300)
    assert not spares.give(tmp_path / "missing")


def test_takes_the_smallest_that_fits_else_the_largest(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare", max_bytes=10_000)
    for name, size in (("small", 100), ("mid", 500), ("big", 900)):
        spares.give(make(tmp_path / name, size))
    assert spares.take(400, tmp_path / "t1")
    assert (tmp_path / "t1").stat().st_size == 500
    assert spares.take(5000, tmp_path / "t2")
    assert (tmp_path / "t2").stat().st_size == 900
    assert spares.take(1, tmp_path / "t3")
    assert not spares.take(1, tmp_path / "t4")
    assert spares.statistics().num_bytes == 0


def test_hard_linked_files_are_never_recycled(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare", max_bytes=10_000)
    cached = make(tmp_path / "cached", 100)
    os.link(cached, tmp_path / "task-copy")
    assert not spares.give(cached)
    assert (tmp_path / "task-copy").read_bytes() == b"x" * 100  # the other name still reads it
    assert spares.statistics().num_bytes == 0


def test_opening_empties_spares_of_an_earlier_run(tmp_path: Path) -> None:
    first = SpareFiles(tmp_path / "spare", max_bytes=1000)
    first.give(make(tmp_path / "a", 100))
    second = SpareFiles(tmp_path / "spare", max_bytes=1000)
    assert list((tmp_path / "spare").iterdir()) == []
    assert not second.take(1, tmp_path / "t")


def test_rejects_a_negative_budget(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        SpareFiles(tmp_path / "spare", max_bytes=-1)
