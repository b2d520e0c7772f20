"""The seam between the bridge server and the worker, plus the work-directory path rules.

``BridgeBackend`` is what a worker implements for one task (and tests fake); the server in
``hypha.bridge.server`` turns HTTP requests into calls on it and maps its exceptions to
status codes. ``resolve_in`` confines executor-supplied paths to the task's work directory;
``shown`` and ``has_control_characters`` treat client input in its messages (and the server's).
``openapi_document`` describes the routes. Nothing here opens sockets or touches the network.
"""

from __future__ import annotations

import unicodedata
from contextlib import AbstractContextManager
from pathlib import Path, PurePosixPath
from typing import Final, Protocol

import msgspec

from hypha.bridge.inbox import Subscription
from hypha.protocol import bridge as b

SSE_KEEPALIVE_SECONDS: Final = 5.0
"""Default interval of the comment line that keeps an idle receive stream open."""

MAX_IDLE_SECONDS: Final = 86400.0
"""Largest ``idle`` a receive stream accepts (a day); leave it out to wait without end."""


class BridgeBackend(Protocol):
    """What the bridge needs from the worker for one task.

    Exceptions: raise ``ValueError`` or ``hypha.errors.DataError`` for caller mistakes
    (answered 400), ``NetworkError``/``TransferError``/``ProtocolError`` for failures of
    other nodes (502), ``LeaseError``/``JobError`` when the task may no longer do this (409),
    and let ``OSError`` out for local I/O failures (500).
    """

    @property
    def task_id(self) -> str:
        """The id of the task this bridge serves."""
        ...

    def job_document(self) -> bytes:
        """Return the task's job JSON document exactly as the worker received it."""
        ...

    async def fetch(self, ref: b.Reference, work_dir: Path) -> list[b.FetchedFile]:
        """Place the files ``ref`` names in ``work_dir`` and describe them.

        Returned paths are relative to ``work_dir``; the server refuses any that escape it.

        Cancellation: the executor hung up; stop the transfer and remove partial files.
        """
        ...

    async def send(self, request: b.SendRequest, path: Path) -> list[str]:
        """Push the file at ``path`` (already confined to the work dir) as ``request`` says.

        Returns:
            The peer ids that acknowledged the file.
        """
        ...

    def subscribe_received(self) -> AbstractContextManager[Subscription]:
        """Open one subscription to files pushed to this task (``Inbox.subscribe``).

        Each subscription gets every file received while it is open; files that arrived
        while nobody was subscribed, or that an ended stream did not deliver, go to the
        next one. The SSE stream ends when the subscription's channel ends.
        """
        ...

    async def progress(self, body: b.ProgressBody) -> b.InstructionBody:
        """Relay a progress report to the scheduler and return its instruction."""
        ...

    async def metrics(self, body: b.MetricsBody) -> None:
        """Record the task's metrics (telemetry, scheduler status)."""
        ...


MAX_PATH_BYTES: Final = 1024
"""Longest executor path (UTF-8 bytes) ``resolve_in`` takes; a task's files are never deeper."""

MAX_PATH_COMPONENTS: Final = 32
"""Most components an executor path may have."""

MAX_COMPONENT_BYTES: Final = 255
"""Longest component (NAME_MAX on Linux): a longer one could only fail in the filesystem."""


def resolve_in(work_dir: Path, rel: str) -> Path:
    """Return the absolute, symlink-free path of ``rel`` inside ``work_dir``.

    The path need not exist. Symlinks that do exist are followed, and the result must
    still lie inside ``work_dir``. Every refusal is a ``ValueError`` whose message shows at
    most the start of ``rel``, so that no input ends up as a filesystem error (a 500).

    Args:
        work_dir: the task's work directory.
        rel: a relative POSIX path supplied by the executor.

    Raises:
        ValueError: ``rel`` is empty, absolute, longer than ``MAX_PATH_BYTES``, has more
            than ``MAX_PATH_COMPONENTS`` components or one longer than
            ``MAX_COMPONENT_BYTES``, has a ``..`` component, a NUL byte or another control
            character, is not valid UTF-8 (a lone surrogate), or cannot be resolved (a
            symlink loop) or resolves (through symlinks) to a place outside ``work_dir``.
    """
    _check_shape(rel)
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        raise ValueError(f"path {shown(rel)} is absolute; give it relative to the work dir")
    if ".." in pure.parts:
        raise ValueError(f"path {shown(rel)} has a '..' component")
    if len(pure.parts) > MAX_PATH_COMPONENTS:
        raise ValueError(
            f"path {shown(rel)} has {len(pure.parts)} components (at most {MAX_PATH_COMPONENTS})"
        )
    if any(len(part.encode()) > MAX_COMPONENT_BYTES for part in pure.parts):
        raise ValueError(f"path {shown(rel)} has a component longer than {MAX_COMPONENT_BYTES} bytes")
    root = work_dir.resolve()
    try:
        resolved = root.joinpath(pure).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise ValueError(f"path {shown(rel)} cannot be resolved: {exc}") from exc
    if not resolved.is_relative_to(root):
        raise ValueError(f"path {shown(rel)} escapes the work dir")
    return resolved


def _check_shape(rel: str) -> None:
    """Refuse what no file name of a task has: emptiness, huge sizes, control characters."""
    if not rel:
        raise ValueError("path must be a non-empty string")
    if "\x00" in rel:
        raise ValueError(f"path {shown(rel)} has a NUL byte")
    try:
        size = len(rel.encode())
    except UnicodeEncodeError:
        raise ValueError(f"path {shown(rel)} is not valid UTF-8 (it holds a lone surrogate)") from None
    if size > MAX_PATH_BYTES:
        raise ValueError(f"path of {size} bytes is too long (at most {MAX_PATH_BYTES})")
    if has_control_characters(rel):
        raise ValueError(f"path {shown(rel)} has control characters")


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a control character (Unicode category Cc: NUL, newline, DEL...)."""
    return any(unicodedata.category(c) == "Cc" for c in text)


def shown(text: str, *, limit: int = 60, quoted: bool = True) -> str:
    """Client input for a message or a log line: its first ``limit`` characters, in ASCII.

    Whatever ``text`` holds, the result is printable (``ascii``); ``quoted=False`` drops
    the quotes ``ascii`` puts around it.
    """
    text = ascii(text if len(text) <= limit else text[:limit] + "...")
    return text if quoted else text[1:-1]


def _json_body(name: str) -> dict[str, object]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _errors(*codes: int) -> dict[str, object]:
    return {str(code): {"description": "error", **_json_body("ErrorBody")} for code in codes}


def openapi_document() -> dict[str, object]:
    """Return the OpenAPI 3.1 description of every bridge route."""
    _, components = msgspec.json.schema_components(b.SCHEMA_TYPES, ref_template="#/components/schemas/{name}")
    progress_ref = {
        "oneOf": [
            {"$ref": "#/components/schemas/ProgressReport"},
            {"$ref": "#/components/schemas/UpdateSentReport"},
            {"$ref": "#/components/schemas/UpdateAppliedReport"},
        ],
        "discriminator": {"propertyName": "event"},
    }

    def op(summary: str, ok: str | None, *codes: int, body: object = None) -> dict[str, object]:
        ok_response: dict[str, object] = {"description": "no content"}
        ok_status = "204"
        if ok is not None:
            ok_status, ok_response = "200", {"description": "ok", **_json_body(ok)}
        operation: dict[str, object] = {
            "summary": summary,
            "responses": {ok_status: ok_response, **_errors(*codes)},
        }
        if body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body}},
            }
        return operation

    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    sse = {"description": "text/event-stream; each event's data is a ReceivedFile"}
    receive = op("Server-sent events, one per file pushed to this task", None, 400, 500)
    receive["responses"] = {"200": sse, **_errors(400, 500)}
    receive["parameters"] = [
        {
            "name": "idle",
            "in": "query",
            "required": False,
            "description": (
                "End the stream once no file has arrived for this many seconds "
                f"(0 < idle <= {MAX_IDLE_SECONDS:g}); without it the stream stays open"
            ),
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_IDLE_SECONDS},
        }
    ]
    paths: dict[str, object] = {
        "/job": {
            "get": {
                "summary": "The task's job document, verbatim",
                "responses": {"200": {"description": "job JSON document"}},
            }
        },
        "/resources/fetch": {
            "post": op(
                "Fetch a referenced resource into the work dir",
                "FetchResponse",
                400,
                409,
                413,
                500,
                502,
                body=ref("FetchRequest"),
            )
        },
        "/resources/send": {
            "post": op(
                "Push a work-dir file to other tasks",
                "SendResponse",
                400,
                409,
                413,
                500,
                502,
                body=ref("SendRequest"),
            )
        },
        "/resources/receive": {"get": receive},
        "/progress": {
            "post": op(
                "Report progress; returns the next instruction",
                "InstructionBody",
                400,
                409,
                413,
                502,
                body=progress_ref,
            )
        },
        "/metrics": {"post": op("Report metrics", None, 400, 413, body=ref("MetricsBody"))},
        "/health": {"get": op("Liveness", "HealthBody")},
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Hypha job bridge", "version": b.BRIDGE_API_VERSION},
        "paths": paths,
        "components": {"schemas": components},
    }
