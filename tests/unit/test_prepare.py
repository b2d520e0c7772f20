"""Dataset preparation: text, npy, npz and csv sources, determinism and error messages."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hypha.data.manifest import MANIFEST_NAME, load_manifest, sha256_file, slice_path, verify_slice
from hypha.data.prepare import builtin_corpus_dir, prepare_builtin, prepare_dataset
from hypha.errors import DataError

TEXTS = {
    "b.txt": "second file\n" * 7,
    "a.py": "print('hello')\n" * 9,
    "sub/c.md": "# heading\nsome words without a final newline",
    "sub/d.rst": "Title\n=====\n" * 5,
}


def make_text_tree(root: Path) -> Path:
    for name, text in TEXTS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def expected_stream() -> bytes:
    """The byte stream in walk order: sorted names, directories recursed in place."""
    stream = b""
    for name in ["a.py", "b.txt", "sub/c.md", "sub/d.rst"]:
        data = TEXTS[name].encode()
        stream += data if data.endswith(b"\n") else data + b"\n"
    return stream


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_text_manifest_and_slices(tmp_path: Path) -> None:
    source = make_text_tree(tmp_path / "src")
    out = tmp_path / "out"
    manifest = prepare_dataset(source, "toy", out, slice_samples=4, seq_len=16)
    stream = expected_stream()
    num_samples = len(stream) // 16
    assert manifest.num_samples == num_samples
    assert manifest.num_slices == -(-num_samples // 4)
    assert manifest.samples_per_slice == 4
    assert manifest.vocab_size == 256
    assert [(t.name, t.dtype, t.shape) for t in manifest.tensors] == [("input_ids", "int64", [4, 16])]
    assert "4 files" in manifest.source
    assert load_manifest(out) == manifest
    tokens = []
    for entry in manifest.slices:
        path = slice_path(out, entry.index)
        assert entry.file == path.name
        assert entry.size == path.stat().st_size
        assert entry.sha256 == sha256_file(path)
        assert verify_slice(out, manifest, entry.index)
        input_ids = load_file(path)["input_ids"]
        assert input_ids.dtype == torch.int64
        assert input_ids.shape == (entry.num_samples, 16)
        tokens.extend(input_ids.flatten().tolist())
    assert bytes(tokens) == stream[: num_samples * 16]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME] + [s.file for s in manifest.slices]
    )


def test_slice_metadata_is_canonical(tmp_path: Path) -> None:
    source = make_text_tree(tmp_path / "src")
    manifest = prepare_dataset(source, "toy", tmp_path / "out", slice_samples=2, seq_len=8)
    for entry in manifest.slices:
        path = slice_path(tmp_path / "out", entry.index)
        with safe_open(str(path), "pt") as file:
            assert file.metadata() == {"dataset": "toy", "index": str(entry.index)}
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + length])["__metadata__"]
        assert list(metadata) == sorted(metadata)


def test_deterministic_output(tmp_path: Path) -> None:
    source = make_text_tree(tmp_path / "src")
    first = prepare_dataset(source, "toy", tmp_path / "one", slice_samples=3, seq_len=8)
    second = prepare_dataset(source, "toy", tmp_path / "two", slice_samples=3, seq_len=8)
    assert first == second
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_rerun_into_same_dir_overwrites_and_removes_stale_slices(tmp_path: Path) -> None:
    source = make_text_tree(tmp_path / "src")
    out = tmp_path / "out"
    big = prepare_dataset(source, "toy", out, slice_samples=2, seq_len=8)
    small = prepare_dataset(source, "toy", out, slice_samples=2, seq_len=8, max_samples=3)
    assert big.num_slices > small.num_slices == 2
    assert sorted(p.name for p in out.iterdir()) == [
        MANIFEST_NAME,
        "slice-00000.safetensors",
        "slice-00001.safetensors",
    ]
    assert load_manifest(out) == small


def test_output_inside_source_is_not_read(tmp_path: Path) -> None:
    source = make_text_tree(tmp_path / "src")
    first = prepare_dataset(source, "toy", source / "out", slice_samples=4, seq_len=16)
    second = prepare_dataset(source, "toy", source / "out", slice_samples=4, seq_len=16)
    assert first == second


def test_foreign_output_dir_refused(tmp_path: Path) -> None:
    source = make_text_tree(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=f"output directory {out} is not empty"):
        prepare_dataset(source, "toy", out)
    assert (out / "notes.txt").read_text() == "mine"


def test_binary_files_skipped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(b"\x00\x01\x02" * 50)
    (source / "b.dat").write_bytes(b"\xff\xfe\xfa" * 50)
    (source / "c.txt").write_text("x" * 40)
    with caplog.at_level(logging.WARNING, logger="hypha.data.text"):
        manifest = prepare_dataset(source, "toy", tmp_path / "out", seq_len=8)
    assert manifest.num_samples == 41 // 8
    assert "1 files" in manifest.source
    assert "a.bin" in caplog.text
    assert "b.dat" in caplog.text


def test_single_text_file_and_progress(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("abcdefgh" * 25)
    calls: list[tuple[int, int]] = []
    manifest = prepare_dataset(
        path,
        "notes",
        tmp_path / "out",
        seq_len=8,
        slice_samples=10,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert manifest.num_samples == 201 // 8
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [s.num_samples for s in manifest.slices] == [10, 10, 5]


def test_npy_source(tmp_path: Path) -> None:
    array = np.arange(30 * 3 * 2, dtype=np.float32).reshape(30, 3, 2)
    np.save(tmp_path / "x.npy", array)
    manifest = prepare_dataset(tmp_path / "x.npy", "arr", tmp_path / "out", slice_samples=8)
    assert manifest.num_samples == 30
    assert manifest.vocab_size is None
    assert [(t.name, t.dtype, t.shape) for t in manifest.tensors] == [("inputs", "float32", [8, 3, 2])]
    loaded = [load_file(slice_path(tmp_path / "out", i))["inputs"] for i in range(4)]
    assert np.array_equal(torch.cat(loaded).numpy(), array)


def test_npy_max_samples(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(100, dtype=np.int64))
    manifest = prepare_dataset(tmp_path / "x.npy", "arr", tmp_path / "out", max_samples=10)
    assert manifest.num_samples == 10
    assert load_file(slice_path(tmp_path / "out", 0))["inputs"].tolist() == list(range(10))


def test_npz_source(tmp_path: Path) -> None:
    images = np.zeros((12, 1, 4, 4), dtype=np.uint8)
    labels = np.arange(12, dtype=np.int64)
    np.savez(tmp_path / "d.npz", labels=labels, images=images)
    manifest = prepare_dataset(tmp_path / "d.npz", "imgs", tmp_path / "out", slice_samples=5)
    assert [(t.name, t.dtype, t.shape) for t in manifest.tensors] == [
        ("images", "uint8", [5, 1, 4, 4]),
        ("labels", "int64", [5]),
    ]
    last = load_file(slice_path(tmp_path / "out", 2))
    assert last["labels"].tolist() == [10, 11]
    assert last["images"].shape == (2, 1, 4, 4)


def test_npz_mismatched_first_dims(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.zeros(3), b=np.zeros(4))
    with pytest.raises(DataError, match="disagree on the number of samples"):
        prepare_dataset(tmp_path / "d.npz", "bad", tmp_path / "out")


def test_npy_unsupported_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "c.npy", np.zeros(4, dtype=np.complex64))
    with pytest.raises(DataError, match="dtype complex64"):
        prepare_dataset(tmp_path / "c.npy", "bad", tmp_path / "out")


def test_csv_source(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x, y ,label\n1.5,2,0\n\n3,4.25,1\n5,6,2\n")
    manifest = prepare_dataset(path, "tab", tmp_path / "out", slice_samples=2)
    assert [(t.name, t.dtype, t.shape) for t in manifest.tensors] == [
        ("inputs", "float32", [2, 2]),
        ("labels", "int64", [2]),
    ]
    first = load_file(slice_path(tmp_path / "out", 0))
    assert first["inputs"].tolist() == [[1.5, 2.0], [3.0, 4.25]]
    assert first["labels"].tolist() == [0, 1]
    assert manifest.num_samples == 3


def test_csv_bad_value_names_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x,label\n1,0\nabc,1\n")
    with pytest.raises(DataError, match=r"t\.csv:3: column 'x'"):
        prepare_dataset(path, "tab", tmp_path / "out")


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"source {tmp_path / 'nope'} does not exist"):
        prepare_dataset(tmp_path / "nope", "x", tmp_path / "out")


def test_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="no usable text"):
        prepare_dataset(tmp_path / "src", "x", tmp_path / "out")


def test_binary_only_dir(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blob").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match=f"no usable text in {tmp_path / 'src'}"):
        prepare_dataset(tmp_path / "src", "x", tmp_path / "out")


def test_too_little_text(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("short")
    with pytest.raises(DataError, match="fewer than one sequence of 64"):
        prepare_dataset(tmp_path / "a.txt", "x", tmp_path / "out")


def test_unknown_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x" * 100)
    with pytest.raises(DataError, match="unknown tokenizer 'bpe'"):
        prepare_dataset(tmp_path / "a.txt", "x", tmp_path / "out", tokenizer="bpe")


@pytest.mark.parametrize(
    "kwargs", [{"name": "a/b"}, {"slice_samples": 0}, {"seq_len": 0}, {"max_samples": 0}]
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    (tmp_path / "a.txt").write_text("x" * 100)
    arguments: dict[str, object] = {"name": "ok", **kwargs}
    with pytest.raises(ValueError, match=r"name|must be >= 1"):
        prepare_dataset(tmp_path / "a.txt", out=tmp_path / "out", **arguments)  # type: ignore[arg-type]


def test_builtin_corpus(tmp_path: Path) -> None:
    assert (builtin_corpus_dir() / "os.py").is_file()
    first = prepare_builtin(tmp_path / "one", max_samples=40, seq_len=32, slice_samples=16)
    second = prepare_builtin(tmp_path / "two", max_samples=40, seq_len=32, slice_samples=16)
    assert first == second
    assert first.name == "stdlib-text"
    assert first.num_samples == 40
    assert [s.num_samples for s in first.slices] == [16, 16, 8]
    assert first.vocab_size == 256
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")
    first_file = sorted(p for p in builtin_corpus_dir().glob("*.py"))[0].read_bytes()
    tokens = load_file(slice_path(tmp_path / "one", 0))["input_ids"][0].tolist()
    assert bytes(tokens) == first_file[:32]
