"""The exception tree every part of Hypha raises.

    HyphaError
    +-- ConfigError          bad or missing configuration (names the key and file)
    +-- ProtocolError        a message that does not decode, is too large, or has the wrong version
    +-- AdmissionError       a peer whose certificate is untrusted, revoked, expired or unbound
    +-- NetworkError         dialing, streams, DHT, gossip, relay: anything the network refused
    |   +-- PeerUnreachableError
    |   +-- RequestTimeoutError  a request got no answer within its deadline
    |   +-- RemoteError      the peer answered with an error response (``code``, ``detail``)
    +-- TransferError        a bulk transfer failed or its checksum did not match
    +-- LeaseError           an operation on a lease the caller does not hold, or that expired
    +-- DataError            datasets: unreadable input, unknown dataset, slice out of range
    +-- JobError             a job spec that cannot run, or an executor that failed
    |   +-- ExecutorStartError  the executor could not be started at all
    +-- NotReadyError        nothing to give yet (no free slice, weights not out): retry
    +-- ForbiddenError       an admitted peer asked for something its role, job or lease does not allow
    +-- CheckpointError      a checkpoint store that cannot be written or read (URL, bucket, credentials)

Library errors (libp2p, OSError, ssl) are translated into these at the ``net/`` boundary
(storage errors at the ``checkpoint/`` one), with ``raise ... from exc`` so the cause is
kept. Each class has a stable ``wire_code`` (``hypha.protocol.codes``) that an RPC handler's
failure carries to the peer; nothing decides on an error's text. Nursery exception groups
are taken apart only by the helpers at the bottom of this module.
"""

from __future__ import annotations

from typing import ClassVar

from hypha.protocol import codes
from hypha.protocol.codec import ProtocolError as _CodecProtocolError


class HyphaError(Exception):
    """Base class of every error Hypha raises on purpose."""

    wire_code: ClassVar[str] = codes.ERROR


class ConfigError(HyphaError):
    """Configuration problems; ``problems`` lists each one with its key."""

    wire_code: ClassVar[str] = codes.CONFIG_ERROR

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = problems if problems is not None else [message]


class ProtocolError(HyphaError, _CodecProtocolError):
    """A message failed to decode, was oversized or spoke another protocol version.

    It is also a ``hypha.protocol.codec.ProtocolError``, so one ``except`` catches both.
    """

    wire_code: ClassVar[str] = codes.PROTOCOL_ERROR


class AdmissionError(HyphaError):
    """A peer's certificate failed verification."""

    wire_code: ClassVar[str] = codes.ADMISSION_ERROR


class NetworkError(HyphaError):
    """The network refused an operation."""

    wire_code: ClassVar[str] = codes.NETWORK_ERROR


class PeerUnreachableError(NetworkError):
    """No address of the peer could be dialed."""

    wire_code: ClassVar[str] = codes.PEER_UNREACHABLE


class RequestTimeoutError(NetworkError):
    """A request got no answer within its deadline (the peer is gone, stuck or overloaded)."""

    wire_code: ClassVar[str] = codes.REQUEST_TIMEOUT


class RemoteError(NetworkError):
    """The remote peer answered a request with an error."""

    wire_code: ClassVar[str] = codes.REMOTE_ERROR

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class TransferError(HyphaError):
    """A bulk transfer failed, timed out, or its sha256 did not match."""

    wire_code: ClassVar[str] = codes.TRANSFER_ERROR


class LeaseError(HyphaError):
    """An operation on a lease the caller does not hold, or that has expired."""

    wire_code: ClassVar[str] = codes.LEASE_ERROR


class DataError(HyphaError):
    """Dataset problems: bad input, unknown dataset, slice index out of range."""

    wire_code: ClassVar[str] = codes.DATA_ERROR


class JobError(HyphaError):
    """A job that cannot run as specified, or whose executor failed."""

    wire_code: ClassVar[str] = codes.JOB_ERROR


class NotReadyError(HyphaError):
    """Nothing to give yet (no slice free right now, weights of a round not out yet): retry."""

    wire_code: ClassVar[str] = codes.NOT_READY


class ForbiddenError(HyphaError):
    """An admitted peer asked for something its role, job membership or lease does not allow."""

    wire_code: ClassVar[str] = codes.FORBIDDEN


class CheckpointError(HyphaError):
    """A checkpoint store cannot be written or read: bad URL, missing bucket, refused credentials.

    A single checkpoint that fails verification is not an error: the store skips it.
    """

    wire_code: ClassVar[str] = codes.CHECKPOINT_ERROR


class ExecutorStartError(JobError):
    """The executor could not be started (missing program, bad command): retrying will not help."""

    wire_code: ClassVar[str] = codes.EXECUTOR_START


def sole_leaf(exc: BaseException) -> BaseException:
    """Unwrap groups of exactly one member (what nested nurseries make of a single error)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def leaves(exc: BaseException) -> list[BaseException]:
    """Every non-group exception inside ``exc``, depth first (``[exc]`` for a plain one)."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    found: list[BaseException] = []
    for inner in exc.exceptions:
        found.extend(leaves(inner))
    return found


def hypha_leaf(exc: BaseException) -> HyphaError | None:
    """The first ``HyphaError`` in ``exc`` if every leaf is a ``HyphaError``, else None.

    A nursery whose children all failed on purpose reports the first of them; anything else
    in the group (a bug, a ``KeyboardInterrupt``) means the group must propagate as it is.
    """
    found = leaves(exc)
    if not found or not all(isinstance(leaf, HyphaError) for leaf in found):
        return None
    first = found[0]
    assert isinstance(first, HyphaError)
    return first


def first_hypha_error(exc: BaseException) -> HyphaError | None:
    """The first ``HyphaError`` anywhere in ``exc`` (other leaves ignored), or None."""
    for leaf in leaves(exc):
        if isinstance(leaf, HyphaError):
            return leaf
    return None


def only_cancelled(exc: BaseException, cancelled: type[BaseException]) -> bool:
    """Whether every leaf of ``exc`` is a ``cancelled`` (trio's type, passed in: no trio here)."""
    return all(isinstance(leaf, cancelled) for leaf in leaves(exc))


def describe(exc: BaseException) -> str:
    """One line for people: the innermost message, with its cause where that adds something."""
    leaf = leaves(exc)[0]
    text = str(leaf) or type(leaf).__name__
    cause = leaf.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


def wire_code(exc: BaseException) -> str:
    """The stable code an RPC handler's failure carries to the peer."""
    code: str = getattr(exc, "wire_code", codes.INTERNAL)
    return code
