"""A checkpoint's manifest and its name: what commits a checkpoint and how it is checked.

A checkpoint is a directory ``ckpt-<round:08d>-<8 hex>`` holding the data object
(``data.safetensors``, or ``data.safetensors.zst`` when compressed) and ``manifest.json``,
written last: its presence commits the checkpoint. This module owns the manifest's type, its
JSON bytes and validation (bounded to ``MAX_MANIFEST_BYTES``), the strict parsing of
directory names, the data codecs (zstd, with the output bounded by the recorded size) and
``CheckpointInfo``. It does no I/O: storage is ``objects.py``, the protocol ``store.py``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Final, Literal

import msgspec
import zstandard

from hypha.protocol.names import is_sha256

FORMAT_VERSION: Final = 1
"""Version of the manifest format written by this module."""

MANIFEST_NAME: Final = "manifest.json"
MAX_MANIFEST_BYTES: Final = 1024 * 1024
"""A manifest larger than this is refused, on write and on read."""

MAX_ROUND: Final = 99_999_999
"""The largest round a name can hold (eight digits)."""

Compression = Literal["none", "zstd"]
COMPRESSIONS: Final = ("none", "zstd")
DATA_NAMES: Final[dict[str, str]] = {"none": "data.safetensors", "zstd": "data.safetensors.zst"}
"""The data object's name inside a checkpoint directory, by compression."""

ZSTD_LEVEL: Final = 3
_READ_CHUNK: Final = 1024 * 1024

_NAME = re.compile(r"ckpt-(\d{8})-([0-9a-f]{8})")


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointInfo:
    """One committed checkpoint, as its manifest describes it.

    Attributes:
        round: The outer round whose parameters it holds.
        name: Its directory name, ``ckpt-<round:08d>-<8 hex>``.
        sha256: Hex sha256 of the uncompressed data.
        size: Bytes of the uncompressed data.
        compressed_size: Bytes of the stored data object (equal to ``size`` when uncompressed).
        created: UNIX time (float seconds) at which it was written.
    """

    round: int
    name: str
    sha256: str
    size: int
    compressed_size: int
    created: float


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """The contents of ``manifest.json``.

    Attributes:
        version: The manifest format version, ``FORMAT_VERSION``.
        round: The outer round; must match the round in the directory name.
        sha256: Hex sha256 of the uncompressed data.
        size: Bytes of the uncompressed data.
        compressed_size: Bytes of the stored data object.
        compression: ``"none"`` or ``"zstd"``; names the data object (``DATA_NAMES``).
        created: UNIX time (float seconds) of the write.
        metadata: The caller's string pairs (job id, model, ...), stored as given.
    """

    version: int
    round: int
    sha256: str
    size: int
    compressed_size: int
    compression: str
    created: float
    metadata: dict[str, str]

    def to_json(self) -> bytes:
        """Return the JSON bytes: sorted keys, 2-space indent, trailing newline."""
        return msgspec.json.format(_encoder.encode(self), indent=2) + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Decode and validate manifest bytes.

        Raises:
            ValueError: Too large, not JSON of the right shape, or inconsistent; the message
                says which.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"manifest is over {MAX_MANIFEST_BYTES} bytes")
        try:
            manifest = msgspec.json.decode(data, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"invalid manifest: {exc}") from exc
        problems = validate(manifest)
        if problems:
            raise ValueError("invalid manifest: " + "; ".join(problems))
        return manifest

    @property
    def data_name(self) -> str:
        """The data object's name inside the checkpoint directory."""
        return DATA_NAMES[self.compression]

    def info(self, name: str) -> CheckpointInfo:
        """The ``CheckpointInfo`` of this manifest in directory ``name``."""
        return CheckpointInfo(
            round=self.round,
            name=name,
            sha256=self.sha256,
            size=self.size,
            compressed_size=self.compressed_size,
            created=self.created,
        )


_encoder: Final = msgspec.json.Encoder(order="sorted")


def validate(manifest: Manifest) -> list[str]:
    """Return every inconsistency found in ``manifest`` (empty when it is valid)."""
    problems: list[str] = []
    if manifest.version != FORMAT_VERSION:
        problems.append(f"version {manifest.version}, expected {FORMAT_VERSION}")
    if not 0 <= manifest.round <= MAX_ROUND:
        problems.append(f"round {manifest.round} out of range")
    if not is_sha256(manifest.sha256):
        problems.append("malformed sha256")
    if manifest.size < 0 or manifest.compressed_size < 0:
        problems.append("negative size")
    if manifest.compression not in COMPRESSIONS:
        problems.append(f"unknown compression {manifest.compression!r}")
    elif manifest.compression == "none" and manifest.compressed_size != manifest.size:
        problems.append("uncompressed data whose compressed_size differs from its size")
    return problems


def new_name(round_: int) -> str:
    """A fresh directory name for a checkpoint of ``round_`` (random suffix: retries never clash)."""
    check_round(round_)
    return f"ckpt-{round_:08d}-{secrets.token_hex(4)}"


def parse_name(name: str) -> int | None:
    """The round in a checkpoint directory name, or None when ``name`` is not one."""
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def check_round(round_: int) -> int:
    """Return ``round_`` when a name can hold it; raises ``ValueError`` otherwise."""
    if isinstance(round_, bool) or not isinstance(round_, int) or not 0 <= round_ <= MAX_ROUND:
        raise ValueError(f"round must be an int in [0, {MAX_ROUND}], got {round_!r}")
    return round_


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Return a copy of ``metadata`` when every key and value is a ``str``; else ``ValueError``."""
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict of str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map str to str, got {key!r}: {value!r}")
    return dict(metadata)


def encode_data(data: bytes, compression: Compression) -> bytes:
    """The stored form of ``data``."""
    if compression == "none":
        return data
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)


def decode_data(stored: bytes, compression: str, size: int) -> bytes:
    """The uncompressed form of ``stored``, never more than ``size + 1`` bytes.

    Reading one byte past ``size`` is how a stored object that expands to more than its
    manifest says is noticed without expanding it all (a zstd frame can claim any size).

    Raises:
        ValueError: The zstd stream is corrupt.
    """
    if compression == "none":
        return stored
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(stored) as reader:
            while len(out) <= size:
                chunk = reader.read(min(_READ_CHUNK, size + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise ValueError(f"corrupt zstd data: {exc}") from exc
    return bytes(out)
