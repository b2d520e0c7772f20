"""The dataset manifest: what a prepared dataset holds and how to check its slices.

A prepared dataset is a directory with ``manifest.json`` and ``slice-00000.safetensors``,
``slice-00001.safetensors``, ... This module owns the manifest's types, its canonical JSON
bytes (sorted keys, 2-space indent, trailing newline, so that its sha256 names the dataset
content), its validation, and file checksums. It does not write slices (``prepare.py``), move
them over the network (``datanode``, ``net.bulk``) or cache them on workers (``cache.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

import msgspec

from hypha.errors import DataError
from hypha.protocol.names import is_safe_name, is_sha256

FORMAT_VERSION: Final = 1
"""Version of the manifest format written by this module."""

MANIFEST_NAME: Final = "manifest.json"
SLICE_NAME_FORMAT: Final = "slice-{index:05d}.safetensors"
CHUNK_BYTES: Final = 1024 * 1024

DTYPES: Final = frozenset(
    {
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
    }
)
"""Tensor dtypes a manifest may name (torch names without the ``torch.`` prefix)."""


class TensorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One tensor present in every slice.

    Attributes:
        name: The tensor's key in each SafeTensors file, e.g. ``input_ids``.
        dtype: Its dtype, one of ``DTYPES``.
        shape: Its shape in one slice; the first dimension is the slice's sample count,
            recorded here for a full slice (``samples_per_slice``).
    """

    name: str
    dtype: str
    shape: list[int]


class SliceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One slice file: its position, file name, sample count, byte size and sha256."""

    index: int
    file: str
    num_samples: int
    size: int
    sha256: str


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a scheduler, data node or worker needs to know about a dataset.

    Attributes:
        name: The dataset name (also its DHT key ``/hypha/dataset/<name>``).
        version: The manifest format version, ``FORMAT_VERSION``.
        num_slices: Number of slice files.
        samples_per_slice: Samples in every slice but possibly the last.
        num_samples: Samples over all slices.
        tensors: The tensors each slice holds.
        slices: One entry per slice, in index order.
        source: A short human description of where the data came from.
        vocab_size: Token vocabulary size for tokenized text, ``None`` otherwise.
    """

    name: str
    version: int
    num_slices: int
    samples_per_slice: int
    num_samples: int
    tensors: list[TensorInfo]
    slices: list[SliceInfo]
    source: str
    vocab_size: int | None = None

    def to_json(self) -> bytes:
        """Return the canonical JSON bytes: sorted keys, 2-space indent, trailing newline."""
        return msgspec.json.format(_encoder.encode(self), indent=2) + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Decode and validate manifest bytes.

        Args:
            data: The bytes of a ``manifest.json``.

        Returns:
            The validated manifest.

        Raises:
            DataError: The bytes are not JSON of the right shape, or the contents disagree
                with themselves (counts, indices, names, checksums).
        """
        try:
            manifest = msgspec.json.decode(data, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DataError(f"invalid manifest: {exc}") from exc
        problems = validate(manifest)
        if problems:
            raise DataError("invalid manifest: " + "; ".join(problems))
        return manifest

    def slice_info(self, index: int) -> SliceInfo:
        """Return the entry of slice ``index``; raises ``DataError`` when out of range."""
        if not 0 <= index < self.num_slices:
            raise DataError(f"slice {index} out of range: dataset {self.name!r} has {self.num_slices}")
        return self.slices[index]


_encoder: Final = msgspec.json.Encoder(order="sorted")


def is_valid_name(name: str) -> bool:
    """Return whether ``name`` is usable as a dataset or tensor name (path and key safe).

    The project's one rule for names that become paths (``protocol/names.py``), starting with
    a letter or digit.
    """
    return is_safe_name(name) and name[0].isalnum()


def validate(manifest: Manifest) -> list[str]:
    """Return every inconsistency found in ``manifest`` (empty when it is valid)."""
    problems: list[str] = []
    if manifest.version != FORMAT_VERSION:
        problems.append(f"version {manifest.version}, expected {FORMAT_VERSION}")
    if not is_valid_name(manifest.name):
        problems.append(f"name {manifest.name!r} is not a valid dataset name")
    if manifest.samples_per_slice < 1:
        problems.append(f"samples_per_slice {manifest.samples_per_slice} < 1")
    if manifest.num_slices != len(manifest.slices):
        problems.append(f"num_slices {manifest.num_slices} but {len(manifest.slices)} slice entries")
    if manifest.num_slices < 1:
        problems.append("no slices")
    total = sum(s.num_samples for s in manifest.slices)
    if manifest.num_samples != total:
        problems.append(f"num_samples {manifest.num_samples} but slices hold {total}")
    if not manifest.tensors:
        problems.append("no tensors")
    names = [t.name for t in manifest.tensors]
    if len(set(names)) != len(names):
        problems.append(f"duplicate tensor names in {names}")
    for tensor in manifest.tensors:
        if not is_valid_name(tensor.name):
            problems.append(f"tensor name {tensor.name!r} is not valid")
        if tensor.dtype not in DTYPES:
            problems.append(f"tensor {tensor.name!r} has unknown dtype {tensor.dtype!r}")
        if not tensor.shape or any(d < 0 for d in tensor.shape):
            problems.append(f"tensor {tensor.name!r} has bad shape {tensor.shape}")
    last = manifest.num_slices - 1
    for position, entry in enumerate(manifest.slices):
        where = f"slice entry {position}"
        if entry.index != position:
            problems.append(f"{where} has index {entry.index}")
        if entry.file != SLICE_NAME_FORMAT.format(index=position):
            problems.append(f"{where} has file {entry.file!r}")
        if not is_sha256(entry.sha256):
            problems.append(f"{where} has a malformed sha256")
        if entry.size < 0:
            problems.append(f"{where} has negative size")
        full = entry.num_samples == manifest.samples_per_slice
        if not (full or (position == last and 0 < entry.num_samples < manifest.samples_per_slice)):
            problems.append(f"{where} has {entry.num_samples} samples")
    return problems


def manifest_sha256(data: bytes) -> str:
    """Return the hex sha256 of manifest bytes (the value in ``DatasetRecord``)."""
    return hashlib.sha256(data).hexdigest()


def slice_path(dataset_dir: Path, index: int) -> Path:
    """Return the path of slice ``index`` inside a prepared dataset directory."""
    if index < 0:
        raise ValueError(f"slice index must be >= 0, got {index}")
    return Path(dataset_dir) / SLICE_NAME_FORMAT.format(index=index)


def load_manifest(dataset_dir: Path) -> Manifest:
    """Read and validate ``manifest.json`` of a prepared dataset.

    Args:
        dataset_dir: The dataset directory.

    Returns:
        The validated manifest.

    Raises:
        DataError: The file is missing, unreadable or invalid; the message names the path.
    """
    path = Path(dataset_dir) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
    try:
        return Manifest.from_json(data)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks (blocking; use a thread)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_slice(dataset_dir: Path, manifest: Manifest, index: int) -> bool:
    """Return whether slice ``index`` exists with the size and sha256 the manifest records.

    Raises:
        DataError: ``index`` is out of range for the manifest.
    """
    entry = manifest.slice_info(index)
    path = slice_path(dataset_dir, index)
    try:
        if path.stat().st_size != entry.size:
            return False
        return sha256_file(path) == entry.sha256
    except OSError:
        return False
