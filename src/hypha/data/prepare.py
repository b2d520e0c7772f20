"""Turn raw data into a prepared dataset: SafeTensors slices plus ``manifest.json``.

Sources: a folder or file of UTF-8 text (byte-level tokens, fixed-length sequences), a
``.npy`` or ``.npz`` file, or a ``.csv`` file with a header. Output is deterministic: the
same input gives byte-identical files (sorted walks, no timestamps, canonical SafeTensors
headers), each written to a temporary name and moved into place, the manifest last. This
module does not serve datasets (``datanode``) nor read them during training (``cache.py``).
All work here is blocking; async callers run it in a thread.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import struct
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import save as safetensors_save

from hypha.data.manifest import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    SliceInfo,
    TensorInfo,
    is_valid_name,
    slice_path,
)
from hypha.errors import DataError

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(num_done, num_total)``, called as slices are written."""

TOKENIZERS: Final[dict[str, int]] = {"byte": 256}
"""Known tokenizers and their vocabulary sizes."""

_OWN_FILE_RE: Final = re.compile(r"^(manifest\.json|slice-\d{5}\.safetensors|\..+\.tmp)$")
_SKIP_DIRS: Final = frozenset({"__pycache__"})

Arrays = dict[str, npt.NDArray[np.generic]]
T = TypeVar("T")


def prepare_dataset(
    source: Path,
    name: str,
    out: Path,
    *,
    slice_samples: int = 256,
    seq_len: int = 64,
    tokenizer: str = "byte",
    max_samples: int | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Prepare ``source`` as dataset ``name`` in directory ``out``.

    Args:
        source: A folder or file of text, or a ``.npy``, ``.npz`` or ``.csv`` file.
        name: The dataset name (letters, digits, ``.``, ``_``, ``-``).
        out: The output directory; it may be absent, empty, or a dataset prepared before
            (which is overwritten).
        slice_samples: Samples per slice; the last slice may hold fewer.
        seq_len: Tokens per sample for text sources.
        tokenizer: Tokenizer for text sources; only ``"byte"`` (vocabulary 256) exists.
        max_samples: Keep at most this many samples (the first ones).
        progress: Called with ``(slices_written, num_slices)``.

    Returns:
        The manifest that was written.

    Raises:
        ValueError: A bad argument (name, sizes).
        DataError: Missing or unusable source, too little data, unknown tokenizer, or an
            output directory that holds something else; the message names the path.
    """
    _check_args(name, slice_samples, seq_len, max_samples)
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; known: {sorted(TOKENIZERS)}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError(f"source {source} does not exist")
    _check_out_dir(out)
    suffix = source.suffix.lower()
    vocab_size: int | None = None
    if source.is_file() and suffix == ".npy":
        arrays, description = _load_npy(source), f"npy:{source.name}"
    elif source.is_file() and suffix == ".npz":
        arrays, description = _load_npz(source), f"npz:{source.name}"
    elif source.is_file() and suffix == ".csv":
        arrays, description = _load_csv(source), f"csv:{source.name}"
    else:
        files = [source] if source.is_file() else _walk(source, exclude=out)
        input_ids, num_files = _load_text(files, str(source), seq_len, max_samples)
        arrays, vocab_size = {"input_ids": input_ids}, TOKENIZERS[tokenizer]
        description = f"text:{source.name} ({num_files} files, {tokenizer} tokens)"
    return _write_dataset(arrays, name, out, slice_samples, max_samples, description, vocab_size, progress)


def builtin_corpus_dir() -> Path:
    """Return the directory of the Python standard library's sources (always present)."""
    return Path(sysconfig.get_paths()["stdlib"])


def prepare_builtin(
    out: Path,
    name: str = "stdlib-text",
    *,
    max_samples: int = 4096,
    seq_len: int = 64,
    slice_samples: int = 256,
    progress: Progress | None = None,
) -> Manifest:
    """Prepare the built-in text corpus: the stdlib's top-level ``*.py`` files, sorted.

    Args:
        out: The output directory (as for ``prepare_dataset``).
        name: The dataset name.
        max_samples: Keep at most this many sequences.
        seq_len: Tokens (bytes) per sequence.
        slice_samples: Sequences per slice.
        progress: Called with ``(slices_written, num_slices)``.

    Returns:
        The manifest that was written.

    Raises:
        ValueError: A bad argument.
        DataError: The stdlib directory holds too little text, or ``out`` holds other files.
    """
    _check_args(name, slice_samples, seq_len, max_samples)
    out = Path(out)
    _check_out_dir(out)
    root = builtin_corpus_dir()
    files = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)
    input_ids, num_files = _load_text(files, str(root), seq_len, max_samples)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    description = f"python {version} stdlib top-level *.py ({num_files} files, byte tokens)"
    return _write_dataset(
        {"input_ids": input_ids},
        name,
        out,
        slice_samples,
        max_samples,
        description,
        TOKENIZERS["byte"],
        progress,
    )


def _check_args(name: str, slice_samples: int, seq_len: int, max_samples: int | None) -> None:
    if not is_valid_name(name):
        raise ValueError(f"dataset name {name!r}: use letters, digits, '.', '_', '-'")
    if slice_samples < 1:
        raise ValueError(f"slice_samples must be >= 1, got {slice_samples}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")


def _check_out_dir(out: Path) -> None:
    """Refuse an output path that is a file or a directory holding anything but a dataset."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _OWN_FILE_RE.match(p.name))
    if foreign:
        raise DataError(
            f"output directory {out} is not empty and is not a prepared dataset "
            f"(found {foreign[:3]}); choose an empty directory"
        )


# --- text -------------------------------------------------------------------------------


def _walk(root: Path, exclude: Path) -> list[Path]:
    """Return the files under ``root`` in sorted order, skipping hidden names and ``out``."""
    excluded = exclude.resolve()
    return list(_walk_dir(root, excluded))


def _walk_dir(directory: Path, excluded: Path) -> Iterator[Path]:
    try:
        children = sorted(directory.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        logger.warning("skipping unreadable directory %s: %s", directory, exc)
        return
    for child in children:
        if child.name.startswith(".") or child.name in _SKIP_DIRS:
            continue
        if child.is_dir():
            # Symlinked directories are not followed: they can loop or leave the source.
            if not child.is_symlink() and child.resolve() != excluded:
                yield from _walk_dir(child, excluded)
        elif child.is_file():
            yield child


def _read_text(path: Path) -> bytes | None:
    """Return the bytes of a UTF-8 text file, or ``None`` (with a warning) if it is not one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        logger.warning("skipping unreadable file %s: %s", path, exc)
        return None
    if b"\0" in data:
        logger.warning("skipping binary file %s", path)
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("skipping file %s: not UTF-8 text", path)
        return None
    return data


def _load_text(
    files: Iterable[Path], what: str, seq_len: int, max_samples: int | None
) -> tuple[npt.NDArray[np.int64], int]:
    """Byte-tokenize ``files`` into ``[N, seq_len]`` int64 sequences; return them and a count."""
    limit = None if max_samples is None else max_samples * seq_len
    chunks: list[bytes] = []
    num_bytes = num_files = 0
    for path in files:
        data = _read_text(path)
        if not data:
            continue
        if not data.endswith(b"\n"):
            data += b"\n"  # so that files do not run into each other mid-line
        chunks.append(data)
        num_bytes += len(data)
        num_files += 1
        if limit is not None and num_bytes >= limit:
            break
    if num_files == 0:
        raise DataError(f"no usable text in {what}")
    if num_bytes < seq_len:
        raise DataError(f"{what} holds {num_bytes} bytes of text, fewer than one sequence of {seq_len}")
    num_samples = num_bytes // seq_len
    if max_samples is not None:
        num_samples = min(num_samples, max_samples)
    stream = np.frombuffer(b"".join(chunks), dtype=np.uint8)[: num_samples * seq_len]
    input_ids: npt.NDArray[np.int64] = stream.astype(np.int64).reshape(num_samples, seq_len)
    return input_ids, num_files


# --- arrays -----------------------------------------------------------------------------


def _checked_array(path: Path, key: str, array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    if array.dtype.name not in DTYPES:
        raise DataError(f"{path}: array {key!r} has dtype {array.dtype}; supported: {sorted(DTYPES)}")
    if array.ndim < 1 or array.shape[0] < 1:
        raise DataError(f"{path}: array {key!r} has shape {array.shape}, needs samples first")
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("=")))


def _load_npy(path: Path) -> Arrays:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return {"inputs": _checked_array(path, "inputs", array)}


def _load_npz(path: Path) -> Arrays:
    arrays: Arrays = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in sorted(archive.files):
                if not is_valid_name(key):
                    raise DataError(f"{path}: array name {key!r} is not a valid tensor name")
                arrays[key] = _checked_array(path, key, archive[key])
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not arrays:
        raise DataError(f"{path} holds no arrays")
    lengths = {key: a.shape[0] for key, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{path}: arrays disagree on the number of samples: {lengths}")
    return arrays


def _load_csv(path: Path) -> Arrays:
    """Read numeric feature columns as ``inputs`` float32 and ``label`` as ``labels`` int64."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            rows = [row for row in csv.reader(file) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(rows) < 2:
        raise DataError(f"{path} needs a header row and at least one data row")
    header = [column.strip() for column in rows[0]]
    if len(set(header)) != len(header):
        raise DataError(f"{path}: duplicate column names in header {header}")
    label_at = header.index("label") if "label" in header else None
    feature_at = [i for i in range(len(header)) if i != label_at]
    if not feature_at:
        raise DataError(f"{path} has no feature columns besides 'label'")
    features: list[list[float]] = []
    labels: list[int] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
        features.append([_parse(path, line, header[i], row[i], float) for i in feature_at])
        if label_at is not None:
            labels.append(_parse(path, line, "label", row[label_at], int))
    arrays: Arrays = {"inputs": np.asarray(features, dtype=np.float32)}
    if label_at is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    return arrays


def _parse(path: Path, line: int, column: str, value: str, kind: Callable[[str], T]) -> T:
    try:
        return kind(value)
    except ValueError as exc:
        raise DataError(f"{path}:{line}: column {column!r}: {exc}") from exc


# --- writing ----------------------------------------------------------------------------


def _write_dataset(
    arrays: Arrays,
    name: str,
    out: Path,
    slice_samples: int,
    max_samples: int | None,
    description: str,
    vocab_size: int | None,
    progress: Progress | None,
) -> Manifest:
    """Write slices then the manifest; remove files of an older dataset in ``out``."""
    if max_samples is not None:
        arrays = {key: a[:max_samples] for key, a in arrays.items()}
    num_samples = next(iter(arrays.values())).shape[0]
    num_slices = -(-num_samples // slice_samples)
    out.mkdir(parents=True, exist_ok=True)
    # The manifest marks a complete dataset: drop the old one before touching slices.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    entries: list[SliceInfo] = []
    for index in range(num_slices):
        start, stop = index * slice_samples, min((index + 1) * slice_samples, num_samples)
        tensors = {key: torch.from_numpy(np.ascontiguousarray(a[start:stop])) for key, a in arrays.items()}
        blob = _canonical_safetensors(
            safetensors_save(tensors, metadata={"dataset": name, "index": str(index)})
        )
        path = slice_path(out, index)
        _write_atomic(path, blob)
        entries.append(
            SliceInfo(
                index=index,
                file=path.name,
                num_samples=stop - start,
                size=len(blob),
                sha256=hashlib.sha256(blob).hexdigest(),
            )
        )
        if progress is not None:
            progress(index + 1, num_slices)
    tensor_infos = [
        TensorInfo(name=key, dtype=a.dtype.name, shape=[slice_samples, *a.shape[1:]])
        for key, a in arrays.items()
    ]
    manifest = Manifest(
        name=name,
        version=FORMAT_VERSION,
        num_slices=num_slices,
        samples_per_slice=slice_samples,
        num_samples=num_samples,
        tensors=tensor_infos,
        slices=entries,
        source=description,
        vocab_size=vocab_size,
    )
    _write_atomic(out / MANIFEST_NAME, manifest.to_json())
    _remove_stale(out, num_slices)
    logger.info("prepared dataset %s: %d samples in %d slices", name, num_samples, num_slices)
    return manifest


def _canonical_safetensors(blob: bytes) -> bytes:
    """Rewrite a SafeTensors header with sorted metadata keys.

    safetensors serializes ``__metadata__`` from a Rust HashMap, whose order changes from
    process to process; the tensor entries and data are already deterministic.
    """
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned
    return struct.pack("<Q", len(text)) + text + blob[8 + length :]


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _remove_stale(out: Path, num_slices: int) -> None:
    """Remove slices beyond ``num_slices`` and leftover temporary files of earlier runs."""
    for path in out.iterdir():
        match = re.fullmatch(r"slice-(\d{5})\.safetensors", path.name)
        stale_slice = match is not None and int(match.group(1)) >= num_slices
        if stale_slice or (path.name.startswith(".") and path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)
