"""The exception tree every part of Hypha raises.

    HyphaError
    +-- ConfigError          bad or missing configuration (names the key and file)
    +-- ProtocolError        a message that does not decode, is too large, or has the wrong version
    +-- AdmissionError       a peer whose certificate is untrusted, revoked, expired or unbound
    +-- NetworkError         dialing, streams, DHT, gossip, relay: anything the network refused
    |   +-- PeerUnreachableError
    |   +-- RemoteError      the peer answered with an error response
    +-- TransferError        a bulk transfer failed or its checksum did not match
    +-- LeaseError           an operation on a lease the caller does not hold, or that expired
    +-- DataError            datasets: unreadable input, unknown dataset, slice out of range
    +-- JobError             a job spec that cannot run, or an executor that failed

Library errors (libp2p, OSError, ssl) are translated into these at the ``net/`` boundary,
with ``raise ... from exc`` so the cause is kept.
"""

from __future__ import annotations

from hypha.protocol.codec import ProtocolError as _CodecProtocolError


class HyphaError(Exception):
    """Base class of every error Hypha raises on purpose."""


class ConfigError(HyphaError):
    """Configuration problems; ``problems`` lists each one with its key."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = problems if problems is not None else [message]


class ProtocolError(HyphaError, _CodecProtocolError):
    """A message failed to decode, was oversized or spoke another protocol version.

    It is also a ``hypha.protocol.codec.ProtocolError``, so one ``except`` catches both.
    """


class AdmissionError(HyphaError):
    """A peer's certificate failed verification."""


class NetworkError(HyphaError):
    """The network refused an operation."""


class PeerUnreachableError(NetworkError):
    """No address of the peer could be dialed."""


class RequestTimeoutError(NetworkError):
    """A request got no answer within its deadline (the peer is gone, stuck or overloaded)."""


class RemoteError(NetworkError):
    """The remote peer answered a request with an error."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class TransferError(HyphaError):
    """A bulk transfer failed, timed out, or its sha256 did not match."""


class LeaseError(HyphaError):
    """An operation on a lease the caller does not hold, or that has expired."""


class DataError(HyphaError):
    """Dataset problems: bad input, unknown dataset, slice index out of range."""


class JobError(HyphaError):
    """A job that cannot run as specified, or whose executor failed."""


class NotReadyError(HyphaError):
    """Nothing to give yet (no slice free right now, weights of a round not out yet): retry."""
