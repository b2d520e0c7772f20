"""Checkpoints in a local directory: layout, retention, zstd, and every way one can be broken.

Real files on ``tmp_path`` through the real store; a broken checkpoint is made by doing to the
files what a crash or a bad disk would (flip bytes, truncate, lose the manifest, lie in it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from hypha.checkpoint import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointError,
    CheckpointInfo,
    StoreOptions,
    open_store,
)
from hypha.errors import HyphaError
from hypha.protocol import codes

NAME = re.compile(r"ckpt-\d{8}-[0-9a-f]{8}")
Damage = Callable[[Path], None]
"""Something done to a checkpoint's data object (or, through its directory, its manifest)."""


def params(round_: int, num_floats: int = 4096) -> bytes:
    """A real SafeTensors payload whose contents depend on the round."""
    weights = np.arange(num_floats, dtype=np.float32) * (round_ + 1)
    return save_safetensors({"w": weights, "b": np.full(8, round_, dtype=np.int64)})


def checkpoint_dir(root: Path, info: CheckpointInfo) -> Path:
    return root / info.name


def test_write_latest_and_list_round_trip(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "ckpts"), StoreOptions(keep_last_n=3))
    assert store.latest() is None
    assert store.list() == []
    first = store.write(round_=4, data=params(4), metadata={"job_id": "job-1"})
    second = store.write(round_=5, data=params(5), metadata={"job_id": "job-1", "model": "mlp"})

    got = store.latest()
    assert got is not None
    info, data, metadata = got
    assert info == second
    assert data == params(5)
    assert load_safetensors(data)["b"].tolist() == [5] * 8
    assert metadata == {"job_id": "job-1", "model": "mlp"}
    assert store.list() == [first, second]

    # The layout the brief fixes: <prefix>/ckpt-<round:08d>-<8 hex>/{data.safetensors,manifest.json}.
    assert NAME.fullmatch(second.name)
    assert second.name.startswith("ckpt-00000005-")
    directory = checkpoint_dir(tmp_path / "ckpts", second)
    assert sorted(p.name for p in directory.iterdir()) == ["data.safetensors", MANIFEST_NAME]
    manifest = json.loads((directory / MANIFEST_NAME).read_bytes())
    assert manifest == {
        "version": FORMAT_VERSION,
        "round": 5,
        "sha256": hashlib.sha256(params(5)).hexdigest(),
        "size": len(params(5)),
        "compressed_size": len(params(5)),
        "compression": "none",
        "created": second.created,
        "metadata": {"job_id": "job-1", "model": "mlp"},
    }
    assert (second.sha256, second.size, second.compressed_size) == (
        manifest["sha256"],
        manifest["size"],
        manifest["size"],
    )


def test_file_url_and_plain_path_are_the_same_store(tmp_path: Path) -> None:
    written = open_store(f"file://{tmp_path}").write(round_=1, data=b"x" * 10)
    assert open_store(str(tmp_path)).list() == [written]


def test_only_the_last_n_committed_checkpoints_are_kept(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), StoreOptions(keep_last_n=2))
    for round_ in range(1, 6):
        store.write(round_=round_, data=params(round_))
    assert [info.round for info in store.list()] == [4, 5]
    assert sorted(p.name[:13] for p in tmp_path.iterdir()) == ["ckpt-00000004", "ckpt-00000005"]
    assert store.statistics().num_pruned == 3


def test_zstd_round_trip(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), StoreOptions(compress="zstd"))
    data = params(3, num_floats=100_000)
    info = store.write(round_=3, data=data)
    stored = (tmp_path / info.name / "data.safetensors.zst").read_bytes()
    assert stored[:4] == b"\x28\xb5\x2f\xfd"  # the zstd frame magic
    assert info.compressed_size == len(stored) < info.size == len(data)
    assert zstandard.ZstdDecompressor().decompress(stored) == data
    got = store.latest()
    assert got == (info, data, {})
    manifest = json.loads((tmp_path / info.name / MANIFEST_NAME).read_bytes())
    assert manifest["compression"] == "zstd"


def _two_checkpoints(root: Path, compress: str = "none") -> tuple[CheckpointInfo, CheckpointInfo]:
    store = open_store(str(root), StoreOptions(compress=compress))  # type: ignore[arg-type]
    return store.write(round_=1, data=params(1)), store.write(round_=2, data=params(2))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_manifest(path: Path) -> None:
    (path.parent / MANIFEST_NAME).unlink()


def _edit_manifest(**changes: object) -> Damage:
    def edit(path: Path) -> None:
        manifest_path = path.parent / MANIFEST_NAME
        manifest = json.loads(manifest_path.read_bytes())
        manifest.update(changes)
        manifest_path.write_bytes(json.dumps(manifest).encode())

    return edit


@pytest.mark.parametrize(
    ("compress", "damage", "reason"),
    [
        ("none", _flip_a_byte, "sha256"),
        ("none", _truncate, "bytes"),
        ("none", _drop_manifest, "not committed"),
        ("none", _edit_manifest(size=len(params(2)) + 1, compressed_size=len(params(2)) + 1), "bytes"),
        ("none", _edit_manifest(sha256="0" * 64), "sha256"),
        ("none", _edit_manifest(round=7), "round"),
        ("none", _edit_manifest(version=99), "version"),
        ("zstd", _flip_a_byte, "sha256|corrupt zstd"),
        ("zstd", _truncate, "bytes"),
        ("zstd", _edit_manifest(size=len(params(2)) - 1), "bytes"),
    ],
    ids=[
        "flipped",
        "truncated",
        "no-manifest",
        "manifest-lies-size",
        "manifest-lies-sha",
        "manifest-other-round",
        "manifest-other-version",
        "zstd-flipped",
        "zstd-truncated",
        "zstd-manifest-lies-size",
    ],
)
def test_a_broken_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, compress: str, damage: Damage, reason: str
) -> None:
    first, second = _two_checkpoints(tmp_path, compress)
    data_name = "data.safetensors.zst" if compress == "zstd" else "data.safetensors"
    damage(tmp_path / second.name / data_name)

    store = open_store(str(tmp_path), StoreOptions(compress=compress))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="hypha.checkpoint"):
        got = store.latest()
    assert got is not None
    assert got[0] == first
    assert got[1] == params(1)
    skipped = [r for r in caplog.records if second.name in r.getMessage()]
    assert [r.levelno for r in skipped] == [logging.WARNING]
    assert re.search(reason, skipped[0].getMessage())
    assert store.statistics().num_skipped == 1


def test_a_crash_before_the_manifest_leaves_a_stray_the_next_write_deletes(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    first, second = _two_checkpoints(tmp_path)
    _drop_manifest(tmp_path / second.name / "data.safetensors")  # data written, manifest never
    assert store.list() == [first]

    third = store.write(round_=2, data=params(2))  # the server retries the round
    assert store.list() == [first, third]
    assert not (tmp_path / second.name).exists()
    got = store.latest()
    assert got is not None
    assert got[0] == third


def test_an_oversized_manifest_is_refused_on_write_and_skipped_on_read(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    with pytest.raises(ValueError, match="manifest"):
        store.write(round_=1, data=b"x", metadata={"blob": "y" * (1024 * 1024)})
    assert store.list() == []

    first, second = _two_checkpoints(tmp_path)
    manifest_path = tmp_path / second.name / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_bytes())
    manifest["metadata"] = {"blob": "y" * (1024 * 1024)}
    manifest_path.write_bytes(json.dumps(manifest).encode())
    got = store.latest()
    assert got is not None
    assert got[0] == first


def test_directories_that_are_not_checkpoints_are_left_alone(tmp_path: Path) -> None:
    for name in ("ckpt-1-abcdef01", "ckpt-00000001-ABCDEF01", "ckpt-00000001-abcdef0", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "README").write_text("mine")
    store = open_store(str(tmp_path), StoreOptions(keep_last_n=1))
    store.write(round_=1, data=b"a")
    store.write(round_=2, data=b"b")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 6
    assert {"README", "notes"} <= set(names)
    assert [info.round for info in store.list()] == [2]


def test_a_store_that_cannot_be_written_is_a_checkpoint_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(
        CheckpointError, match=r"a-file/ckpts: cannot create it and write in it: Not a directory"
    ) as raised:
        open_store(str(blocker / "ckpts"))
    assert isinstance(raised.value, HyphaError)
    assert raised.value.wire_code == codes.CHECKPOINT_ERROR == "checkpoint_error"
    assert isinstance(raised.value.__cause__, OSError)

    # A directory that goes away after opening: the write fails, clearly, and commits nothing.
    root = tmp_path / "ckpts"
    store = open_store(str(root))
    root.rmdir()
    root.write_text("replaced by a file")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint ckpt-00000001-"):
        store.write(round_=1, data=b"x")
    with pytest.raises(CheckpointError, match="cannot read checkpoints"):
        store.latest()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("gs://bucket/prefix", "unsupported scheme 'gs'"),
        ("relative/dir", "must be absolute"),
        ("file://host/abs", "names no host"),
        ("s3:///prefix", "no bucket"),
        ("/abs?x=1", "query"),
    ],
)
def test_urls_the_store_does_not_take(url: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(message)):
        open_store(url)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"keep_last_n": 0}, "keep_last_n"),
        ({"compress": "gzip"}, "compress"),
        ({"part_size_bytes": 1024}, "part_size_bytes"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        StoreOptions(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("round_", "metadata"), [(-1, {}), (10**8, {}), (1, {"n": 1}), (1, {2: "x"})])
def test_bad_rounds_and_metadata_are_value_errors(
    tmp_path: Path, round_: int, metadata: dict[object, object]
) -> None:
    with pytest.raises(ValueError, match=r"round|metadata"):
        open_store(str(tmp_path)).write(round_=round_, data=b"x", metadata=metadata)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(metadata=st.dictionaries(st.text(max_size=40), st.text(max_size=200), max_size=8))
def test_any_metadata_of_strings_round_trips(metadata: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as root:
        store = open_store(root, StoreOptions(keep_last_n=1))
        store.write(round_=1, data=b"params", metadata=metadata)
        got = store.latest()
        assert got is not None
        assert got[2] == metadata


def test_the_package_exports_what_it_declares() -> None:
    import hypha.checkpoint

    assert sorted(hypha.checkpoint.__all__) == sorted(
        [
            "FORMAT_VERSION",
            "MANIFEST_NAME",
            "CheckpointError",
            "CheckpointInfo",
            "CheckpointStore",
            "StoreOptions",
            "StoreStatistics",
            "open_store",
        ]
    )
    for name in hypha.checkpoint.__all__:
        assert getattr(hypha.checkpoint, name) is not None
