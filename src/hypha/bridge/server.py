"""The job bridge HTTP server: a small ASGI app served by hypercorn on a Unix socket.

Owns routing, body limits, limits on the request head (``MAX_HEAD_BYTES``: hypercorn answers
431 past it) and on the request path (400), server-sent events, and the socket's lifetime
(bound private by ``bridge/unix.py``, removed on exit); the ASGI plumbing and the mapping of
backend exceptions to status codes are ``bridge/asgi.py``. It does not know how files are
fetched or sent: every route calls ``BridgeBackend``. Every rejected request is answered with
a JSON ``ErrorBody`` and logged at WARNING, showing at most the start of what the client
sent; no input can stop the server, and none becomes a 500.
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from hypercorn.utils import wrap_app

from hypha.bridge.api import (
    MAX_IDLE_SECONDS,
    SSE_KEEPALIVE_SECONDS,
    BridgeBackend,
    has_control_characters,
    openapi_document,
    resolve_in,
    shown,
)
from hypha.bridge.asgi import (
    CLOSE,
    SSE_HEADERS,
    Exchange,
    Handler,
    Headers,
    HungUp,
    Reject,
    cancel_on_disconnect,
    classify,
    lifespan,
    unless_hung_up,
)
from hypha.bridge.inbox import Subscription
from hypha.bridge.unix import bind_private_socket, remove_socket
from hypha.protocol import bridge as b
from hypha.protocol.codec import ProtocolError as CodecProtocolError
from hypha.protocol.codec import decode_json, encode_json

if TYPE_CHECKING:
    # The installed trio-stubs (trio-typing, pulled in by libp2p) shadow trio's own
    # annotations and only export TaskStatus from trio_typing.
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1024 * 1024
_MAX_DRAIN_BYTES: Final = 64 * 1024 * 1024
"""An oversized body is read and discarded up to this much so the client sees the 413."""

MAX_HEAD_BYTES: Final = 16 * 1024
"""Largest request line plus headers; hypercorn answers 431 past it, before any route runs."""

MAX_ROUTE_CHARS: Final = 256
"""Longest request path taken for routing: every route is short, a longer path is a 400."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BridgeStatistics:
    """A snapshot of a ``BridgeApp``'s counters (for telemetry)."""

    num_requests: int
    num_refused: int
    """Requests answered with an ``ErrorBody`` (or ended mid-stream by a failure)."""
    num_hung_up: int
    """Requests whose executor disconnected before the answer was ready."""
    num_events: int
    """Received files written to receive streams."""


class BridgeApp:
    """The ASGI application behind one task's bridge socket.

    Args:
        backend: the worker side of this task.
        work_dir: the task's work directory; every executor path is confined to it.
        max_body_bytes: request bodies larger than this are answered 413.
        keepalive_seconds: interval of the comment line on an idle receive stream.
    """

    def __init__(
        self,
        backend: BridgeBackend,
        work_dir: Path,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        keepalive_seconds: float = SSE_KEEPALIVE_SECONDS,
    ) -> None:
        if max_body_bytes <= 0 or keepalive_seconds <= 0:
            raise ValueError("max_body_bytes and keepalive_seconds must be positive")
        self._backend = backend
        self._work_dir = work_dir.resolve()
        self._max_body_bytes = max_body_bytes
        self._keepalive_seconds = keepalive_seconds
        self._openapi = encode_json(openapi_document())
        self._num_requests = self._num_refused = self._num_hung_up = self._num_events = 0
        self._routes: dict[str, dict[str, Handler]] = {
            "/job": {"GET": self._job},
            "/resources/fetch": {"POST": self._fetch},
            "/resources/send": {"POST": self._send},
            "/resources/receive": {"GET": self._receive},
            "/progress": {"POST": self._progress},
            "/metrics": {"POST": self._metrics},
            "/health": {"GET": self._health},
            "/openapi.json": {"GET": self._openapi_json},
        }

    def statistics(self) -> BridgeStatistics:
        """Return a snapshot of the counters."""
        return BridgeStatistics(
            num_requests=self._num_requests,
            num_refused=self._num_refused,
            num_hung_up=self._num_hung_up,
            num_events=self._num_events,
        )

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            await self._handle(Exchange(scope, receive, send))

    async def _handle(self, ex: Exchange) -> None:
        # The per-request boundary: nothing a client sends may escape from here.
        self._num_requests += 1
        try:
            _check_head(ex)
            methods = self._routes.get(ex.path)
            if methods is None:
                raise Reject(404, "not_found", f"no route {_shown(ex.path)}")
            handler = methods.get(ex.method)
            if handler is None:
                allow = [(b"allow", ", ".join(methods).encode())]
                raise Reject(405, "method_not_allowed", f"{_shown(ex.method)} {ex.path}", allow)
            await handler(ex)
        except HungUp:
            self._num_hung_up += 1
            logger.warning(
                "bridge %s %s: the executor hung up before the answer", _shown(ex.method), _shown(ex.path)
            )
        except Reject as exc:
            await self._refuse(ex, exc.status, exc.error, exc.detail, exc.headers)
        except Exception as exc:
            status, code = classify(exc)
            if status == 500:
                logger.error("bridge %s %s failed", _shown(ex.method), _shown(ex.path), exc_info=exc)
            await self._refuse(ex, status, code, str(exc) or type(exc).__name__, [])

    async def _refuse(self, ex: Exchange, status: int, error: str, detail: str, headers: Headers) -> None:
        self._num_refused += 1
        method, path = _shown(ex.method), _shown(ex.path)
        logger.warning("bridge refused %s %s: %d %s: %s", method, path, status, error, detail)
        if ex.started:
            return  # mid-stream (SSE): nothing more can be said; the stream just ends
        body = encode_json(b.ErrorBody(error=error, detail=detail))
        try:
            await ex.reply(status, body, extra=headers)
        except Exception as exc:  # the client is gone; the refusal is already logged
            logger.debug("bridge could not answer %s %s: %r", ex.method, ex.path, exc)

    async def _read_body(self, ex: Exchange) -> bytes:
        """Read the request body, refusing (413) past ``max_body_bytes`` without keeping it."""
        for name, value in ex.headers:
            too_big = value.isdigit() and int(value) > _MAX_DRAIN_BYTES
            if name.lower() == b"content-length" and too_big:
                raise Reject(413, "payload_too_large", "body too large", CLOSE)
        chunks: list[bytes] = []
        num_bytes = 0
        while True:
            message = await ex.receive()
            if message["type"] != "http.request":
                raise HungUp
            num_bytes += len(message["body"])
            if num_bytes <= self._max_body_bytes:
                chunks.append(message["body"])
            else:
                chunks.clear()  # keep counting so the client gets its 413, but keep nothing
            if not message["more_body"] or num_bytes > _MAX_DRAIN_BYTES:
                break
        if num_bytes > self._max_body_bytes:
            detail = f"body exceeds {self._max_body_bytes} bytes"
            raise Reject(413, "payload_too_large", detail, CLOSE)
        return b"".join(chunks)

    async def _decode(self, ex: Exchange, kind: type[T]) -> T:
        data = await self._read_body(ex)
        try:
            return decode_json(data, kind)
        except CodecProtocolError as exc:
            raise Reject(400, "invalid_request", f"malformed {kind.__name__} body: {exc}") from exc

    # --- routes ---------------------------------------------------------------------------

    async def _job(self, ex: Exchange) -> None:
        await ex.reply(200, self._backend.job_document())

    async def _fetch(self, ex: Exchange) -> None:
        request = await self._decode(ex, b.FetchRequest)
        files = await unless_hung_up(ex, partial(self._backend.fetch, request.ref, self._work_dir))
        for fetched in files:
            try:
                resolve_in(self._work_dir, fetched.path)
            except ValueError as exc:  # a backend bug, not the caller's
                raise Reject(500, "internal_error", f"backend returned {exc}") from exc
        await ex.reply(200, encode_json(b.FetchResponse(files=files)))

    async def _send(self, ex: Exchange) -> None:
        request = await self._decode(ex, b.SendRequest)
        path = resolve_in(self._work_dir, request.path)
        try:
            is_file = await trio.Path(path).is_file()
        except OSError as exc:  # e.g. EACCES: the caller's path, not the server's failure
            raise Reject(
                400, "invalid_request", f"{_shown(request.path)} cannot be read: {exc.strerror}"
            ) from exc
        if not is_file:
            raise Reject(400, "invalid_request", f"{_shown(request.path)} is not a file")
        delivered = await unless_hung_up(ex, partial(self._backend.send, request, path))
        await ex.reply(200, encode_json(b.SendResponse(delivered=delivered)))

    async def _receive(self, ex: Exchange) -> None:
        idle = _idle_seconds(ex.query)
        with self._backend.subscribe_received() as subscription:
            await ex.start(200, SSE_HEADERS)
            await ex.body(b": subscribed\n\n", more=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_disconnect, ex, nursery.cancel_scope)
                await self._pump(ex, subscription, idle)
                nursery.cancel_scope.cancel()

    async def _pump(self, ex: Exchange, subscription: Subscription, idle: float) -> None:
        """Write files as SSE events until the channel ends or ``idle`` seconds pass without one.

        A file whose event could not be written (the executor hung up) is given back, so the
        next stream delivers it. The server ends an idle stream itself: a client that gave up
        on its side could leave an event unread in the socket.
        """
        idle_until = trio.current_time() + idle
        while True:
            wait = min(self._keepalive_seconds, idle_until - trio.current_time())
            if wait <= 0:
                await ex.body(b"", more=False)
                return
            received: b.ReceivedFile | None = None
            with trio.move_on_after(wait):
                try:
                    received = await subscription.receive()
                except trio.EndOfChannel:
                    await ex.body(b"", more=False)
                    return
            if received is None:
                if trio.current_time() < idle_until:
                    await ex.body(b": keepalive\n\n", more=True)
                continue
            try:
                await ex.body(b"data: " + encode_json(received) + b"\n\n", more=True)
            except BaseException:
                subscription.give_back(received)
                raise
            self._num_events += 1
            idle_until = trio.current_time() + idle

    async def _progress(self, ex: Exchange) -> None:
        data = await self._read_body(ex)
        try:
            report = b.decode_progress(data)
        except CodecProtocolError as exc:
            raise Reject(400, "invalid_request", str(exc)) from exc
        instruction = await unless_hung_up(ex, partial(self._backend.progress, report))
        await ex.reply(200, encode_json(instruction))

    async def _metrics(self, ex: Exchange) -> None:
        await self._backend.metrics(await self._decode(ex, b.MetricsBody))
        await ex.start(204, [])
        await ex.body(b"", more=False)

    async def _health(self, ex: Exchange) -> None:
        body = b.HealthBody(ok=True, task_id=self._backend.task_id)
        await ex.reply(200, encode_json(body))

    async def _openapi_json(self, ex: Exchange) -> None:
        await ex.reply(200, self._openapi)


def _check_head(ex: Exchange) -> None:
    """Refuse a head past ``MAX_HEAD_BYTES`` (431) or a path no route could have (400).

    hypercorn refuses a head that arrives in pieces past the limit; one that arrives whole
    reaches the app, so the app checks too.
    """
    size = len(ex.path) + sum(len(name) + len(value) + 4 for name, value in ex.headers)
    if size > MAX_HEAD_BYTES:
        detail = f"request head of {size} bytes (at most {MAX_HEAD_BYTES})"
        raise Reject(431, "headers_too_large", detail, CLOSE)
    path = ex.path
    if len(path) > MAX_ROUTE_CHARS:
        raise Reject(
            400, "invalid_request", f"request path of {len(path)} characters (at most {MAX_ROUTE_CHARS})"
        )
    if has_control_characters(path):
        raise Reject(400, "invalid_request", f"request path {_shown(path)} has control characters")


def _shown(text: str) -> str:
    """Client input for the server's messages and log lines: its start, in ASCII, unquoted."""
    return shown(text, limit=80, quoted=False)


def _idle_seconds(query: bytes) -> float:
    """The receive stream's ``idle`` parameter (infinite when absent); 400 when malformed."""
    try:
        values = urllib.parse.parse_qs(query.decode("ascii"), strict_parsing=bool(query))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Reject(400, "invalid_request", f"malformed query string: {exc}") from exc
    unknown = sorted(set(values) - {"idle"})
    if unknown:
        raise Reject(400, "invalid_request", f"unknown query parameters: {', '.join(unknown)}")
    if "idle" not in values:
        return math.inf
    text = values["idle"][-1]
    try:
        idle = float(text)
    except ValueError:
        idle = math.nan
    if not 0 < idle <= MAX_IDLE_SECONDS:
        detail = f"idle must be in (0, {MAX_IDLE_SECONDS:g}] seconds, got {text!r}"
        raise Reject(400, "invalid_request", detail)
    return idle


async def serve_bridge(
    backend: BridgeBackend,
    socket_path: Path,
    work_dir: Path,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    keepalive_seconds: float = SSE_KEEPALIVE_SECONDS,
    owner: tuple[int, int] | None = None,
    task_status: TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one task's bridge on the Unix socket ``socket_path`` until cancelled.

    Args:
        backend: the worker side of the task.
        socket_path: where to create the socket (mode 0600); a stale socket is replaced. Its
            directory must be this process's user's and mode 0700 (``bridge/unix.py``).
        work_dir: the task's work directory.
        max_body_bytes: largest accepted request body.
        keepalive_seconds: SSE keepalive interval.
        owner: ``(uid, gid)`` the socket is given to, for an executor running as that user.
        task_status: reports ``socket_path`` once the socket accepts connections.

    Raises:
        ValueError: ``socket_path`` is too long for AF_UNIX (107 bytes on Linux), or its
            directory is another user's or open to group or others.
        OSError: the socket could not be created.

    Cancellation: open requests and streams are cancelled, then the socket is closed and
    removed. Resource handling: the socket file exists exactly while this runs.
    """
    app = BridgeApp(backend, work_dir, max_body_bytes=max_body_bytes, keepalive_seconds=keepalive_seconds)
    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger(f"{__name__}.hypercorn")
    config.keep_alive_timeout = 60.0
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    sock = await trio.to_thread.run_sync(bind_private_socket, socket_path, config.backlog, owner)
    try:
        serve = partial(worker_serve, wrap_app(app, config.wsgi_max_body_size, "asgi"), config)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, sockets=Sockets([], [sock], [])))
            logger.info("bridge for task %s listening on %s", backend.task_id, socket_path)
            task_status.started(socket_path)
    finally:
        sock.close()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(remove_socket, socket_path)
