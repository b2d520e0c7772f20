"""Text sources: which files a folder holds, and their bytes as fixed-length token sequences.

Owns walking a source folder (sorted, hidden names and ``__pycache__`` skipped, symlinked
directories not followed), skipping files that are not UTF-8 text (with a warning), the
byte-level tokenizer, and the built-in corpus (the Python standard library's top-level
sources). Writing slices is ``writer.py``'s job; the entry points are in ``prepare.py``.
"""

from __future__ import annotations

import logging
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from hypha.errors import DataError

logger = logging.getLogger(__name__)

TOKENIZERS: Final[dict[str, int]] = {"byte": 256}
"""Known tokenizers and their vocabulary sizes."""

_SKIP_DIRS: Final = frozenset({"__pycache__"})


def builtin_corpus_dir() -> Path:
    """Return the directory of the Python standard library's sources (always present)."""
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_corpus_files() -> list[Path]:
    """The built-in corpus: the stdlib's top-level ``*.py`` files, sorted by name."""
    root = builtin_corpus_dir()
    return sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)


def walk_files(root: Path, exclude: Path) -> list[Path]:
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


def read_text_file(path: Path) -> bytes | None:
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


def load_text(
    files: Iterable[Path], what: str, seq_len: int, max_samples: int | None
) -> tuple[npt.NDArray[np.int64], int]:
    """Byte-tokenize ``files`` into ``[N, seq_len]`` int64 sequences; return them and a count."""
    limit = None if max_samples is None else max_samples * seq_len
    chunks: list[bytes] = []
    num_bytes = num_files = 0
    for path in files:
        data = read_text_file(path)
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
