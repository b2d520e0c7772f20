"""Encoding of tensor dicts (weights, pseudo-gradients, checkpoints) to safetensors bytes.

Owns the three update encodings a job may choose: ``fp32`` (lossless), ``fp16`` (half the
bytes, about 3 significant digits) and ``int8`` (a quarter of the bytes, per-tensor
symmetric quantisation), plus atomic file save/load. The encoding travels in the safetensors
metadata, so a decoder needs nothing else. It does not move bytes between peers
(``net/`` does) and does not decide which encoding a job uses (the job spec does).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

logger = logging.getLogger(__name__)

Encoding = Literal["fp32", "fp16", "int8"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)
ENCODING_METADATA_KEY = "encoding"
"""Metadata key under which ``encode_tensors`` records the encoding."""
SCALE_SUFFIX = ".__scale__"
"""``<name>.__scale__`` holds the float32 scale of int8 tensor ``<name>``."""
INT8_MAX = 127


def _quantize_int8(name: str, tensor: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-tensor quantisation: q = round(x / s), s = max|x| / 127."""
    x = tensor.to(torch.float32)  # [*shape]
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"tensor {name!r} has non-finite values; int8 cannot encode it")
    amax = x.abs().max() if x.numel() else torch.zeros(())  # []
    scale = (amax / INT8_MAX).to(torch.float32)  # []
    safe_scale = scale if bool(scale > 0) else torch.ones((), dtype=torch.float32)  # []
    q = torch.round(x / safe_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)  # [*shape]
    return q, scale


def encode_tensors(
    tensors: Mapping[str, Tensor],
    encoding: Encoding,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise ``tensors`` with ``encoding`` into safetensors bytes.

    Floating tensors are cast to float32 (``fp32``), float16 (``fp16``), or quantised to
    int8 with a float32 scale stored under ``<name>.__scale__`` (``int8``; the error per
    element is at most scale / 2). Non-float tensors are stored unchanged. ``fp16`` turns
    values beyond +-65504 into inf; pseudo-gradients and weights are far smaller.

    Args:
        tensors: Tensors by name, on any device.
        encoding: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        metadata: Extra string metadata to store; may not use the key ``"encoding"``.

    Returns:
        The safetensors bytes.

    Raises:
        ValueError: For an unknown encoding, a reserved metadata key or tensor name, or
            (int8) a tensor with non-finite values.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    meta = dict(metadata or {})
    if ENCODING_METADATA_KEY in meta:
        raise ValueError(f"metadata key {ENCODING_METADATA_KEY!r} is reserved")
    meta[ENCODING_METADATA_KEY] = encoding
    out: dict[str, Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"tensor name {name!r} uses the reserved suffix {SCALE_SUFFIX!r}")
        t = tensor.detach().cpu()
        if t.is_floating_point():
            if encoding == "int8":
                t, out[name + SCALE_SUFFIX] = _quantize_int8(name, t)
            else:
                t = t.to(torch.float16 if encoding == "fp16" else torch.float32)
        t = t.contiguous()
        # safetensors refuses tensors that share storage (tied weights); copy repeats.
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storage:
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        out[name] = t
    return bytes(st_save(out, metadata=meta))


def decode_tensors(data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Inverse of ``encode_tensors``.

    Floating and int8-quantised tensors come back as float32 on the CPU; other tensors come
    back unchanged. Bytes without an ``encoding`` entry (plain safetensors from elsewhere)
    decode like ``fp32``.

    Args:
        data: Bytes from ``encode_tensors`` or any safetensors file.

    Returns:
        ``(tensors, metadata)``; ``metadata["encoding"]`` names the encoding used.

    Raises:
        ValueError: If ``data`` is not valid safetensors or is inconsistent (an unknown
            encoding, a scale without its tensor, a scale that is not a float32 scalar).
    """
    try:
        raw = st_load(bytes(data))
        meta = _read_metadata(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a valid safetensors payload: {exc}") from exc
    encoding = meta.setdefault(ENCODING_METADATA_KEY, "fp32")
    if encoding not in ENCODINGS:
        raise ValueError(f"payload has unknown encoding {encoding!r}")
    tensors: dict[str, Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith(SCALE_SUFFIX):
            base = name.removesuffix(SCALE_SUFFIX)
            if encoding != "int8" or base not in raw or raw[base].dtype != torch.int8:
                raise ValueError(f"scale {name!r} has no int8 tensor {base!r} to go with it")
            if tensor.dtype != torch.float32 or tensor.dim() != 0:
                raise ValueError(f"scale {name!r} must be a float32 scalar")
            continue
        scale = raw.get(name + SCALE_SUFFIX)
        if scale is not None:
            tensors[name] = tensor.to(torch.float32) * scale  # [*shape]
        elif tensor.is_floating_point():
            tensors[name] = tensor.to(torch.float32)  # [*shape]
        else:
            tensors[name] = tensor
    return tensors, meta


def _read_metadata(data: bytes) -> dict[str, str]:
    """Read the ``__metadata__`` of a safetensors header (safetensors.torch.load drops it)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise ValueError("safetensors metadata must map strings to strings")
    return dict(meta)


def save_tensors_file(
    path: Path,
    tensors: Mapping[str, Tensor],
    encoding: Encoding = "fp32",
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Encode ``tensors`` and write them to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are fsynced, and replace
    ``path`` with ``os.replace``, so readers see the old file or the new one, never half.

    Args:
        path: Destination file; its directory must exist.
        tensors: Tensors by name.
        encoding: As for ``encode_tensors``.
        metadata: As for ``encode_tensors``.

    Returns:
        The number of bytes written.

    Raises:
        ValueError: As for ``encode_tensors``.
        OSError: If the file cannot be written.
    """
    data = encode_tensors(tensors, encoding, metadata)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.debug("wrote %d tensors (%s, %d bytes) to %s", len(tensors), encoding, len(data), path)
    return len(data)


def load_tensors_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a file written by ``save_tensors_file`` (or any safetensors file).

    Returns:
        ``(tensors, metadata)`` as for ``decode_tensors``.

    Raises:
        ValueError: If the file is not valid safetensors.
        OSError: If the file cannot be read.
    """
    return decode_tensors(path.read_bytes())
