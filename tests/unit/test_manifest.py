"""Manifest: canonical bytes, validation, loading and slice checksums."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypha.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    SliceInfo,
    TensorInfo,
    load_manifest,
    manifest_sha256,
    sha256_file,
    slice_path,
    verify_slice,
)
from hypha.errors import DataError


def make_manifest(num_samples: int, samples_per_slice: int, name: str = "toy") -> Manifest:
    num_slices = -(-num_samples // samples_per_slice)
    slices = [
        SliceInfo(
            index=i,
            file=f"slice-{i:05d}.safetensors",
            num_samples=min(samples_per_slice, num_samples - i * samples_per_slice),
            size=100 + i,
            sha256=hashlib.sha256(str(i).encode()).hexdigest(),
        )
        for i in range(num_slices)
    ]
    return Manifest(
        name=name,
        version=FORMAT_VERSION,
        num_slices=num_slices,
        samples_per_slice=samples_per_slice,
        num_samples=num_samples,
        tensors=[TensorInfo(name="input_ids", dtype="int64", shape=[samples_per_slice, 8])],
        slices=slices,
        source="test",
        vocab_size=256,
    )


def write_dataset(directory: Path, contents: list[bytes]) -> Manifest:
    """Write slices with the given bytes and a manifest that describes them."""
    directory.mkdir(parents=True, exist_ok=True)
    slices = []
    for i, data in enumerate(contents):
        slice_path(directory, i).write_bytes(data)
        slices.append(
            SliceInfo(
                index=i,
                file=slice_path(directory, i).name,
                num_samples=1,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    manifest = msgspec.structs.replace(
        make_manifest(len(contents), 1), slices=slices, num_slices=len(contents)
    )
    (directory / MANIFEST_NAME).write_bytes(manifest.to_json())
    return manifest


def test_to_json_is_canonical() -> None:
    manifest = make_manifest(10, 4)
    data = manifest.to_json()
    assert data.endswith(b"}\n")
    assert data == make_manifest(10, 4).to_json()
    lines = data.decode().splitlines()
    assert lines[1].startswith('  "')  # two-space indent
    top_keys = list(json.loads(data))
    assert top_keys == sorted(top_keys)
    assert data.isascii()


def test_round_trip() -> None:
    manifest = make_manifest(10, 4)
    assert Manifest.from_json(manifest.to_json()) == manifest


@given(st.integers(1, 1000), st.integers(1, 300))
def test_round_trip_property(num_samples: int, samples_per_slice: int) -> None:
    manifest = make_manifest(num_samples, samples_per_slice)
    data = manifest.to_json()
    again = Manifest.from_json(data)
    assert again == manifest
    assert again.to_json() == data
    assert sum(s.num_samples for s in again.slices) == num_samples


def test_manifest_sha256() -> None:
    data = make_manifest(3, 2).to_json()
    assert manifest_sha256(data) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "version 2"),
        ({"num_slices": 7}, "num_slices 7"),
        ({"num_samples": 11}, "num_samples 11"),
        ({"name": "../evil"}, "not a valid dataset name"),
        ({"tensors": []}, "no tensors"),
        ({"samples_per_slice": 0}, "samples_per_slice 0"),
    ],
)
def test_from_json_rejects_inconsistent(change: dict[str, object], message: str) -> None:
    data = json.loads(make_manifest(10, 4).to_json())
    data.update(change)
    with pytest.raises(DataError, match=message):
        Manifest.from_json(json.dumps(data).encode())


def test_from_json_rejects_bad_slices() -> None:
    data = json.loads(make_manifest(10, 4).to_json())
    data["slices"][1]["file"] = "other.bin"
    data["slices"][2]["sha256"] = "xyz"
    data["tensors"][0]["dtype"] = "complex64"
    with pytest.raises(DataError) as info:
        Manifest.from_json(json.dumps(data).encode())
    text = str(info.value)
    assert "'other.bin'" in text
    assert "malformed sha256" in text
    assert "complex64" in text


def test_from_json_rejects_short_middle_slice() -> None:
    data = json.loads(make_manifest(12, 4).to_json())
    data["slices"][0]["num_samples"] = 3
    data["slices"][2]["num_samples"] = 5
    with pytest.raises(DataError, match="slice entry 0 has 3 samples"):
        Manifest.from_json(json.dumps(data).encode())


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b'{"name": "x"}'])
def test_from_json_rejects_garbage(data: bytes) -> None:
    with pytest.raises(DataError, match="invalid manifest"):
        Manifest.from_json(data)


def test_load_manifest(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path / "ds", [b"a", b"bc"])
    assert load_manifest(tmp_path / "ds") == manifest


def test_load_manifest_missing_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nowhere" / MANIFEST_NAME)):
        load_manifest(tmp_path / "nowhere")


def test_load_manifest_invalid_names_path(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(b"{")
    with pytest.raises(DataError, match=f"{tmp_path / MANIFEST_NAME}: invalid manifest"):
        load_manifest(tmp_path)


def test_slice_path(tmp_path: Path) -> None:
    assert slice_path(tmp_path, 7) == tmp_path / "slice-00007.safetensors"
    with pytest.raises(ValueError, match="index"):
        slice_path(tmp_path, -1)


def test_verify_slice(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path, [b"first", b"second"])
    assert verify_slice(tmp_path, manifest, 0)
    assert verify_slice(tmp_path, manifest, 1)
    slice_path(tmp_path, 1).write_bytes(b"secone")  # same size, other bytes
    assert not verify_slice(tmp_path, manifest, 1)
    slice_path(tmp_path, 0).unlink()
    assert not verify_slice(tmp_path, manifest, 0)
    with pytest.raises(DataError, match="out of range"):
        verify_slice(tmp_path, manifest, 2)


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = bytes(range(256)) * (5 * 4096 + 3)  # a little over 5 MiB: several chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
