"""Wire protocol: message types, the codec and protocol ids. Imports nothing from hypha."""

from hypha.protocol import ids, messages
from hypha.protocol.codec import (
    PROTOCOL_VERSION,
    ProtocolError,
    decode_body,
    decode_frame,
    decode_json,
    encode_body,
    encode_frame,
    encode_json,
)

__all__ = [
    "PROTOCOL_VERSION",
    "ProtocolError",
    "decode_body",
    "decode_frame",
    "decode_json",
    "encode_body",
    "encode_frame",
    "encode_json",
    "ids",
    "messages",
]
