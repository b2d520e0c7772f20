"""Request and response bodies of the job bridge (worker <-> executor, HTTP on a Unix socket).

Owns the JSON shapes only: every body is a frozen, kw_only msgspec Struct, encoded and
decoded with ``hypha.protocol.codec``. Tagged unions carry ``type`` (references) or
``event`` (progress reports). ``GET /job`` has no Struct: it serves the task's job document
bytes verbatim. The server, routes and path rules live in ``hypha.bridge``; the executor
side client lives in ``hypha.training.session``. Imports nothing from hypha but ``protocol``.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from hypha.protocol.codec import ProtocolError
from hypha.protocol.messages import Encoding, Purpose

BRIDGE_API_VERSION: Final = "1"
"""Version of the bridge API; shown in ``/openapi.json``."""

SendTarget = Literal["peers", "parameter_server", "trainers"]
SendPurpose = Literal["update", "weights", "file"]
Action = Literal["continue", "sync", "done"]


class Body(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every bridge body."""


# --- references -------------------------------------------------------------------------


class _Ref(Body, frozen=True, kw_only=True, tag_field="type"):
    """Base of the ``Reference`` variants (tag field ``type``)."""


class SliceRef(_Ref, frozen=True, kw_only=True, tag="slice"):
    """The next dataset slice the scheduler assigns to this task.

    ``dataset`` defaults to the job's dataset when ``None``.
    """

    dataset: str | None = None


class PeerFileRef(_Ref, frozen=True, kw_only=True, tag="peer_file"):
    """A named file offered by the peer ``peer``."""

    peer: str
    name: str


class UriRef(_Ref, frozen=True, kw_only=True, tag="uri"):
    """A file at an ``http(s)://`` URI (the worker decides which URIs it allows)."""

    uri: str


class WeightsRef(_Ref, frozen=True, kw_only=True, tag="weights"):
    """The current global weights, or those of ``round`` when given."""

    round: int | None = None


Reference = SliceRef | PeerFileRef | UriRef | WeightsRef
"""Something the executor asks the worker to fetch into the work directory."""


# --- resources ----------------------------------------------------------------------------


class FetchRequest(Body, frozen=True, kw_only=True):
    """``POST /resources/fetch``."""

    ref: Reference


class FetchedFile(Body, frozen=True, kw_only=True):
    """One file the worker placed in the work directory.

    ``path`` is relative to the work directory. ``index``, ``dataset`` and ``epoch`` are set
    for dataset slices only.
    """

    path: str
    size: int
    sha256: str
    index: int | None = None
    dataset: str | None = None
    epoch: int | None = None


class FetchResponse(Body, frozen=True, kw_only=True):
    files: list[FetchedFile] = msgspec.field(default_factory=list)


class SendRequest(Body, frozen=True, kw_only=True):
    """``POST /resources/send``: push a file of the work directory to other tasks.

    ``target="peers"`` sends to the listed peer ids (at least one); the role targets
    (``parameter_server``, ``trainers``) let the worker resolve the peers and require
    ``peers`` to be empty.
    """

    path: str
    peers: list[str] = msgspec.field(default_factory=list)
    target: SendTarget = "peers"
    purpose: SendPurpose = "file"
    round: int = 0
    samples: int = 0
    encoding: Encoding = "fp32"

    def __post_init__(self) -> None:
        if self.target == "peers" and not self.peers:
            raise ValueError("target 'peers' needs at least one peer id")
        if self.target != "peers" and self.peers:
            raise ValueError(f"target {self.target!r} takes no explicit peers")
        if self.round < 0 or self.samples < 0:
            raise ValueError("round and samples must be >= 0")


class SendResponse(Body, frozen=True, kw_only=True):
    delivered: list[str] = msgspec.field(default_factory=list)


class ReceivedFile(Body, frozen=True, kw_only=True):
    """One file another task pushed to this task: the data of one SSE event.

    ``path`` is relative to the work directory.
    """

    path: str
    size: int
    sha256: str
    from_peer: str
    purpose: Purpose
    round: int = 0
    samples: int = 0


# --- progress -----------------------------------------------------------------------------


class _Report(Body, frozen=True, kw_only=True, tag_field="event"):
    """Base of the ``ProgressBody`` variants (tag field ``event``)."""


class ProgressReport(_Report, frozen=True, kw_only=True, tag="batches"):
    """Inner batches finished since the last report."""

    batches: int
    samples: int
    seconds: float
    loss: float | None = None
    round: int = 0
    slices_done: list[int] = msgspec.field(default_factory=list)


class UpdateSentReport(_Report, frozen=True, kw_only=True, tag="update_sent"):
    """The executor sent its pseudo-gradient of ``round``."""

    round: int
    samples: int


class UpdateAppliedReport(_Report, frozen=True, kw_only=True, tag="update_applied"):
    """The executor applied the global update of ``round``."""

    round: int


ProgressBody = ProgressReport | UpdateSentReport | UpdateAppliedReport
"""``POST /progress`` request body."""


class InstructionBody(Body, frozen=True, kw_only=True):
    """``POST /progress`` response: what the executor does next.

    ``continue``: keep training. ``sync``: run ``batches`` more batches, then send the
    update of ``round``. ``done``: the job is over; exit.
    """

    action: Action
    batches: int = 0
    round: int = 0


class MetricsBody(Body, frozen=True, kw_only=True):
    """``POST /metrics``: named scalar metrics of ``round``."""

    round: int
    values: dict[str, float]


class HealthBody(Body, frozen=True, kw_only=True):
    ok: bool
    task_id: str


class ErrorBody(Body, frozen=True, kw_only=True):
    """Every non-2xx response: ``error`` is machine readable, ``detail`` is for people."""

    error: str
    detail: str


_progress_decoder: msgspec.json.Decoder[ProgressBody] = msgspec.json.Decoder(
    ProgressBody  # type: ignore[arg-type]
)


def decode_progress(data: bytes) -> ProgressBody:
    """Decode a ``POST /progress`` body.

    Raises:
        ProtocolError: the body is not valid JSON or matches no report variant.
    """
    try:
        return _progress_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid progress report: {exc}") from exc


SCHEMA_TYPES: Final = (
    FetchRequest,
    FetchResponse,
    SendRequest,
    SendResponse,
    ReceivedFile,
    ProgressReport,
    UpdateSentReport,
    UpdateAppliedReport,
    InstructionBody,
    MetricsBody,
    HealthBody,
    ErrorBody,
)
"""The bodies that ``/openapi.json`` documents as components."""
