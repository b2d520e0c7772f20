"""Writing a prepared dataset: SafeTensors slices, then ``manifest.json``, byte for byte stable.

Owns the output directory (refusing one that holds anything but a dataset, removing slices
and temporary files an older run left), each file written to a temporary name and moved
into place with the manifest last (it marks a complete dataset), and the canonical
SafeTensors header that makes the same input give byte-identical files. Reading sources is
``text.py``'s and ``arrays.py``'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
import torch
from safetensors.torch import save as safetensors_save

from hypha.data.arrays import Arrays
from hypha.data.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, SliceInfo, TensorInfo, slice_path
from hypha.errors import DataError

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(num_done, num_total)``, called as slices are written."""

_OWN_FILE_RE: Final = re.compile(r"^(manifest\.json|slice-\d{5}\.safetensors|\..+\.tmp)$")


def check_out_dir(out: Path) -> None:
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


def write_dataset(
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
