"""Turn raw data into a prepared dataset: SafeTensors slices plus ``manifest.json``.

Owns the entry points and their argument checks. Sources: a folder or file of UTF-8 text
(byte-level tokens, fixed-length sequences; ``text.py``), a ``.npy`` or ``.npz`` file, or a
``.csv`` file with a header (``arrays.py``). Output is deterministic: the same input gives
byte-identical files (``writer.py``). This module does not serve datasets (``datanode``)
nor read them during training (``cache.py``). All work here is blocking; async callers run
it in a thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hypha.data.arrays import Arrays, load_csv, load_npy, load_npz
from hypha.data.manifest import Manifest, is_valid_name
from hypha.data.text import TOKENIZERS, builtin_corpus_dir, builtin_corpus_files, load_text, walk_files
from hypha.data.writer import Progress, check_out_dir, write_dataset
from hypha.errors import DataError

__all__ = [
    "TOKENIZERS",
    "Arrays",
    "Progress",
    "builtin_corpus_dir",
    "prepare_builtin",
    "prepare_dataset",
]


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
    check_out_dir(out)
    suffix = source.suffix.lower()
    vocab_size: int | None = None
    if source.is_file() and suffix == ".npy":
        arrays, description = load_npy(source), f"npy:{source.name}"
    elif source.is_file() and suffix == ".npz":
        arrays, description = load_npz(source), f"npz:{source.name}"
    elif source.is_file() and suffix == ".csv":
        arrays, description = load_csv(source), f"csv:{source.name}"
    else:
        files = [source] if source.is_file() else walk_files(source, exclude=out)
        input_ids, num_files = load_text(files, str(source), seq_len, max_samples)
        arrays, vocab_size = {"input_ids": input_ids}, TOKENIZERS[tokenizer]
        description = f"text:{source.name} ({num_files} files, {tokenizer} tokens)"
    return write_dataset(arrays, name, out, slice_samples, max_samples, description, vocab_size, progress)


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
    check_out_dir(out)
    files = builtin_corpus_files()
    input_ids, num_files = load_text(files, str(builtin_corpus_dir()), seq_len, max_samples)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    description = f"python {version} stdlib top-level *.py ({num_files} files, byte tokens)"
    return write_dataset(
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
