"""The job bridge HTTP server: a small ASGI app served by hypercorn on a Unix socket.

Owns routing, body limits, server-sent events, the mapping of backend exceptions to status
codes, and the socket's lifetime (mode 0600, removed on exit). It does not know how files
are fetched or sent: every route calls ``BridgeBackend``. Every rejected request is answered
with a JSON ``ErrorBody`` and logged at WARNING; no input can stop the server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from hypercorn.utils import wrap_app

from hypha import errors
from hypha.bridge.api import (
    MAX_IDLE_SECONDS,
    SSE_KEEPALIVE_SECONDS,
    BridgeBackend,
    openapi_document,
    resolve_in,
)
from hypha.bridge.inbox import Subscription
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

_JSON: Final = b"application/json"
T = TypeVar("T")
Headers = list[tuple[bytes, bytes]]


class _Reject(Exception):
    """Answer the current request with ``status`` and an ``ErrorBody``."""

    def __init__(self, status: int, error: str, detail: str, headers: Headers | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or []


class _HungUp(Exception):
    """The client disconnected before the answer was ready: there is nobody to answer."""


class _Exchange:
    """One request: its scope, the ASGI callables and whether the response has started."""

    def __init__(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable):
        self.method = scope["method"]
        self.path = scope["path"]
        self.query = scope["query_string"]
        self.headers = scope["headers"]
        self.receive = receive
        self._send = send
        self.started = False

    async def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def reply(
        self, status: int, data: bytes, content_type: bytes = _JSON, extra: Headers | None = None
    ) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(data)).encode())]
        await self.start(status, headers + (extra or []))
        await self.body(data, more=False)


Handler = Callable[[_Exchange], Awaitable[None]]


def _classify(exc: BaseException) -> tuple[int, str]:
    """Map a backend exception to an HTTP status and an ``ErrorBody.error`` code."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _classify(exc.exceptions[0])
    if isinstance(exc, errors.NotReadyError):
        return 503, "not_ready"
    if isinstance(exc, errors.DataError):
        return 400, "data_error"
    if isinstance(exc, ValueError):
        return 400, "invalid_request"
    if isinstance(exc, errors.LeaseError | errors.JobError):
        return 409, "conflict"
    if isinstance(exc, errors.TransferError):
        return 502, "transfer_error"
    if isinstance(exc, errors.NetworkError | CodecProtocolError):
        return 502, "network_error"
    if isinstance(exc, OSError):
        return 500, "io_error"
    return 500, "internal_error"


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

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._handle(_Exchange(scope, receive, send))

    async def _handle(self, ex: _Exchange) -> None:
        # The per-request boundary: nothing a client sends may escape from here.
        try:
            methods = self._routes.get(ex.path)
            if methods is None:
                raise _Reject(404, "not_found", f"no route {ex.path}")
            handler = methods.get(ex.method)
            if handler is None:
                allow = [(b"allow", ", ".join(methods).encode())]
                raise _Reject(405, "method_not_allowed", f"{ex.method} {ex.path}", allow)
            await handler(ex)
        except _HungUp:
            logger.warning("bridge %s %s: the executor hung up before the answer", ex.method, ex.path)
        except _Reject as exc:
            await self._refuse(ex, exc.status, exc.error, exc.detail, exc.headers)
        except Exception as exc:
            status, code = _classify(exc)
            if status == 500:
                logger.error("bridge %s %s failed", ex.method, ex.path, exc_info=exc)
            await self._refuse(ex, status, code, str(exc) or type(exc).__name__, [])

    async def _refuse(self, ex: _Exchange, status: int, error: str, detail: str, headers: Headers) -> None:
        logger.warning("bridge refused %s %s: %d %s: %s", ex.method, ex.path, status, error, detail)
        if ex.started:
            return  # mid-stream (SSE): nothing more can be said; the stream just ends
        body = encode_json(b.ErrorBody(error=error, detail=detail))
        try:
            await ex.reply(status, body, extra=headers)
        except Exception as exc:  # the client is gone; the refusal is already logged
            logger.debug("bridge could not answer %s %s: %r", ex.method, ex.path, exc)

    async def _read_body(self, ex: _Exchange) -> bytes:
        """Read the request body, refusing (413) past ``max_body_bytes`` without keeping it."""
        for name, value in ex.headers:
            too_big = value.isdigit() and int(value) > _MAX_DRAIN_BYTES
            if name.lower() == b"content-length" and too_big:
                raise _Reject(413, "payload_too_large", "body too large", _CLOSE)
        chunks: list[bytes] = []
        num_bytes = 0
        while True:
            message = await ex.receive()
            if message["type"] != "http.request":
                raise _HungUp
            num_bytes += len(message["body"])
            if num_bytes <= self._max_body_bytes:
                chunks.append(message["body"])
            else:
                chunks.clear()  # keep counting so the client gets its 413, but keep nothing
            if not message["more_body"] or num_bytes > _MAX_DRAIN_BYTES:
                break
        if num_bytes > self._max_body_bytes:
            detail = f"body exceeds {self._max_body_bytes} bytes"
            raise _Reject(413, "payload_too_large", detail, _CLOSE)
        return b"".join(chunks)

    async def _decode(self, ex: _Exchange, kind: type[T]) -> T:
        data = await self._read_body(ex)
        try:
            return decode_json(data, kind)
        except CodecProtocolError as exc:
            raise _Reject(400, "invalid_request", str(exc)) from exc

    # --- routes ---------------------------------------------------------------------------

    async def _job(self, ex: _Exchange) -> None:
        await ex.reply(200, self._backend.job_document())

    async def _fetch(self, ex: _Exchange) -> None:
        request = await self._decode(ex, b.FetchRequest)
        files = await _unless_hung_up(ex, partial(self._backend.fetch, request.ref, self._work_dir))
        for fetched in files:
            try:
                resolve_in(self._work_dir, fetched.path)
            except ValueError as exc:  # a backend bug, not the caller's
                raise _Reject(500, "internal_error", f"backend returned {exc}") from exc
        await ex.reply(200, encode_json(b.FetchResponse(files=files)))

    async def _send(self, ex: _Exchange) -> None:
        request = await self._decode(ex, b.SendRequest)
        path = resolve_in(self._work_dir, request.path)
        if not await trio.Path(path).is_file():
            raise _Reject(400, "invalid_request", f"{request.path!r} is not a file")
        delivered = await _unless_hung_up(ex, partial(self._backend.send, request, path))
        await ex.reply(200, encode_json(b.SendResponse(delivered=delivered)))

    async def _receive(self, ex: _Exchange) -> None:
        idle = _idle_seconds(ex.query)
        with self._backend.subscribe_received() as subscription:
            await ex.start(200, _SSE_HEADERS)
            await ex.body(b": subscribed\n\n", more=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, ex, nursery.cancel_scope)
                await self._pump(ex, subscription, idle)
                nursery.cancel_scope.cancel()

    async def _pump(self, ex: _Exchange, subscription: Subscription, idle: float) -> None:
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
            idle_until = trio.current_time() + idle

    async def _progress(self, ex: _Exchange) -> None:
        data = await self._read_body(ex)
        try:
            report = b.decode_progress(data)
        except CodecProtocolError as exc:
            raise _Reject(400, "invalid_request", str(exc)) from exc
        instruction = await _unless_hung_up(ex, partial(self._backend.progress, report))
        await ex.reply(200, encode_json(instruction))

    async def _metrics(self, ex: _Exchange) -> None:
        await self._backend.metrics(await self._decode(ex, b.MetricsBody))
        await ex.start(204, [])
        await ex.body(b"", more=False)

    async def _health(self, ex: _Exchange) -> None:
        body = b.HealthBody(ok=True, task_id=self._backend.task_id)
        await ex.reply(200, encode_json(body))

    async def _openapi_json(self, ex: _Exchange) -> None:
        await ex.reply(200, self._openapi)


_MAX_UNIX_PATH_BYTES: Final = 107
_CLOSE: Final[Headers] = [(b"connection", b"close")]
_SSE_HEADERS: Final[Headers] = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]


async def _unless_hung_up(ex: _Exchange, call: Callable[[], Awaitable[T]]) -> T:
    """Await ``call()``, cancelling it if the client disconnects first.

    Raises:
        _HungUp: the client went away and ``call`` was cancelled.
        Exception: whatever ``call`` raised, unwrapped.
    """
    results: list[T] = []
    failures: list[Exception] = []
    async with trio.open_nursery() as nursery:

        async def run_call() -> None:
            try:
                results.append(await call())
            except Exception as exc:  # handed on below, outside the nursery's group
                failures.append(exc)
            finally:
                nursery.cancel_scope.cancel()

        nursery.start_soon(_cancel_on_disconnect, ex, nursery.cancel_scope)
        nursery.start_soon(run_call)
    if failures:
        raise failures[0]
    if not results:
        raise _HungUp
    return results[0]


def _idle_seconds(query: bytes) -> float:
    """The receive stream's ``idle`` parameter (infinite when absent); 400 when malformed."""
    try:
        values = urllib.parse.parse_qs(query.decode("ascii"), strict_parsing=bool(query))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Reject(400, "invalid_request", f"malformed query string: {exc}") from exc
    unknown = sorted(set(values) - {"idle"})
    if unknown:
        raise _Reject(400, "invalid_request", f"unknown query parameters: {', '.join(unknown)}")
    if "idle" not in values:
        return math.inf
    text = values["idle"][-1]
    try:
        idle = float(text)
    except ValueError:
        idle = math.nan
    if not 0 < idle <= MAX_IDLE_SECONDS:
        detail = f"idle must be in (0, {MAX_IDLE_SECONDS:g}] seconds, got {text!r}"
        raise _Reject(400, "invalid_request", detail)
    return idle


async def _cancel_on_disconnect(ex: _Exchange, scope: trio.CancelScope) -> None:
    while (await ex.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _bind_unix(socket_path: Path, backlog: int) -> socket.socket:
    """Bind and listen on ``socket_path`` with mode 0600, replacing a stale socket file."""
    if len(os.fsencode(socket_path)) > _MAX_UNIX_PATH_BYTES:
        raise ValueError(
            f"socket path {socket_path} is longer than the {_MAX_UNIX_PATH_BYTES} bytes "
            "AF_UNIX allows; use a shorter work dir"
        )
    try:
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            socket_path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(socket_path))
        # Nobody can connect before listen(), so there is no window with a wider mode.
        os.chmod(socket_path, 0o600)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_bridge(
    backend: BridgeBackend,
    socket_path: Path,
    work_dir: Path,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    keepalive_seconds: float = SSE_KEEPALIVE_SECONDS,
    task_status: TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one task's bridge on the Unix socket ``socket_path`` until cancelled.

    Args:
        backend: the worker side of the task.
        socket_path: where to create the socket (mode 0600); a stale socket is replaced.
        work_dir: the task's work directory.
        max_body_bytes: largest accepted request body.
        keepalive_seconds: SSE keepalive interval.
        task_status: reports ``socket_path`` once the socket accepts connections.

    Raises:
        ValueError: ``socket_path`` is too long for AF_UNIX (107 bytes on Linux).
        OSError: the socket could not be created.

    Cancellation: open requests and streams are cancelled, then the socket is closed and
    removed. Resource handling: the socket file exists exactly while this runs.
    """
    app = BridgeApp(backend, work_dir, max_body_bytes=max_body_bytes, keepalive_seconds=keepalive_seconds)
    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger(f"{__name__}.hypercorn")
    config.keep_alive_timeout = 60.0
    sock = _bind_unix(socket_path, config.backlog)
    try:
        serve = partial(worker_serve, wrap_app(app, config.wsgi_max_body_size, "asgi"), config)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, sockets=Sockets([], [sock], [])))
            logger.info("bridge for task %s listening on %s", backend.task_id, socket_path)
            task_status.started(socket_path)
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
