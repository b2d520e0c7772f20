"""The one codec for wire messages: msgpack bodies in versioned, length-prefixed frames.

A frame is ``version (1 byte) | length (4 bytes, big endian) | msgpack body``. Decoding checks
the version, the frame limit and then the per-kind size limit, and turns every failure into
one ``ProtocolError``. JSON helpers for typed documents (job configs, manifests) live here
too so that no other module hand-builds wire JSON.
"""

from __future__ import annotations

import struct
from typing import Final, TypeVar

import msgspec

from hypha.protocol import messages as m

PROTOCOL_VERSION: Final = 1
HEADER: Final = struct.Struct(">BI")
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
DEFAULT_MAX_BYTES: Final = 64 * 1024

MAX_BYTES: dict[type[m.Msg], int] = {
    m.WorkerRequest: 16 * 1024,
    m.OfferRequest: 8 * 1024,
    m.DispatchTask: 1024 * 1024,
    m.ManifestResponse: MAX_FRAME_BYTES,
    m.TaskStatus: 32 * 1024,
}
"""Per-kind size limits; everything else gets ``DEFAULT_MAX_BYTES``."""


class ProtocolError(Exception):
    """A frame that does not decode; ``hypha.errors.ProtocolError`` wraps it at the net edge.

    Kept local so that ``protocol`` imports nothing from the rest of hypha.
    """


T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[m.Message] = msgspec.msgpack.Decoder(m.Message)  # type: ignore[arg-type]
_json_encoder = msgspec.json.Encoder()


def max_bytes(kind: type[m.Msg]) -> int:
    """Return the largest encoded body allowed for messages of type ``kind``."""
    return MAX_BYTES.get(kind, DEFAULT_MAX_BYTES)


def encode_body(msg: m.Msg) -> bytes:
    """Encode ``msg`` without a frame header (gossip payloads, DHT values)."""
    body = _encoder.encode(msg)
    limit = max_bytes(type(msg))
    if len(body) > limit:
        raise ProtocolError(f"{type(msg).__name__} is {len(body)} bytes, limit {limit}")
    return body


def decode_body(body: bytes) -> m.Msg:
    """Decode an unframed body, enforcing its kind's size limit."""
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        msg: m.Msg = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from exc
    limit = max_bytes(type(msg))
    if len(body) > limit:
        raise ProtocolError(f"{type(msg).__name__} is {len(body)} bytes, limit {limit}")
    return msg


def encode_frame(msg: m.Msg) -> bytes:
    """Encode ``msg`` as one frame."""
    body = encode_body(msg)
    return HEADER.pack(PROTOCOL_VERSION, len(body)) + body


def parse_header(header: bytes, limit: int = MAX_FRAME_BYTES) -> int:
    """Check a frame header and return the body length that follows it."""
    if len(header) != HEADER.size:
        raise ProtocolError("truncated frame header")
    version, length = HEADER.unpack(header)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds limit {limit}")
    return int(length)


def decode_frame(frame: bytes) -> m.Msg:
    """Decode one complete frame (header and body)."""
    length = parse_header(frame[: HEADER.size])
    body = frame[HEADER.size :]
    if len(body) != length:
        raise ProtocolError(f"frame says {length} bytes, got {len(body)}")
    return decode_body(body)


def expect(msg: m.Msg, kind: type[T]) -> T:
    """Return ``msg`` if it is a ``kind``, else raise ``ProtocolError``."""
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg


def encode_json(obj: object) -> bytes:
    """Encode a typed document (a Struct or dataclass) as JSON."""
    return _json_encoder.encode(obj)


def decode_json(data: bytes | str, kind: type[T]) -> T:
    """Decode and validate a JSON document as ``kind``."""
    try:
        return msgspec.json.decode(data, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"invalid {kind.__name__}: {exc}") from exc
