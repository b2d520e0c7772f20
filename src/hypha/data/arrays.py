"""Array sources: ``.npy``, ``.npz`` and ``.csv`` files read as named arrays, samples first.

Owns checking each array's dtype against what a manifest can describe, making it
contiguous and native-endian, and the CSV convention (numeric feature columns become
``inputs`` float32, a ``label`` column becomes ``labels`` int64). Text sources are
``text.py``'s; writing slices is ``writer.py``'s.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from hypha.data.manifest import DTYPES, is_valid_name
from hypha.errors import DataError

Arrays = dict[str, npt.NDArray[np.generic]]
"""A dataset's tensors by name, each with the samples along its first axis."""

T = TypeVar("T")


def _checked_array(path: Path, key: str, array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    if array.dtype.name not in DTYPES:
        raise DataError(f"{path}: array {key!r} has dtype {array.dtype}; supported: {sorted(DTYPES)}")
    if array.ndim < 1 or array.shape[0] < 1:
        raise DataError(f"{path}: array {key!r} has shape {array.shape}, needs samples first")
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("=")))


def load_npy(path: Path) -> Arrays:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return {"inputs": _checked_array(path, "inputs", array)}


def load_npz(path: Path) -> Arrays:
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


def load_csv(path: Path) -> Arrays:
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
