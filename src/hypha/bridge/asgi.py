"""The ASGI plumbing under the bridge server: one exchange, refusals, hang-ups, lifespan.

Owns what every route shares: the ``Exchange`` of one request (its scope and the ASGI
callables), the ``Reject`` a route raises to answer with an error, the ``HungUp`` of a client
that went away, running a backend call that is cancelled when the client disconnects, and the
one mapping of backend exceptions to HTTP statuses and ``ErrorBody`` codes (``classify``).
It knows no routes and no backend: that is ``bridge/server.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Final, TypeVar

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope

from hypha import errors
from hypha.protocol.codec import ProtocolError as CodecProtocolError

JSON: Final = b"application/json"
T = TypeVar("T")
Headers = list[tuple[bytes, bytes]]


class Reject(Exception):
    """Answer the current request with ``status`` and an ``ErrorBody``."""

    def __init__(self, status: int, error: str, detail: str, headers: Headers | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or []


class HungUp(Exception):
    """The client disconnected before the answer was ready: there is nobody to answer."""


class Exchange:
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
        self, status: int, data: bytes, content_type: bytes = JSON, extra: Headers | None = None
    ) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(data)).encode())]
        await self.start(status, headers + (extra or []))
        await self.body(data, more=False)


Handler = Callable[[Exchange], Awaitable[None]]


def classify(exc: BaseException) -> tuple[int, str]:
    """Map a backend exception to an HTTP status and an ``ErrorBody.error`` code."""
    exc = errors.sole_leaf(exc)
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


CLOSE: Final[Headers] = [(b"connection", b"close")]
SSE_HEADERS: Final[Headers] = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]


async def unless_hung_up(ex: Exchange, call: Callable[[], Awaitable[T]]) -> T:
    """Await ``call()``, cancelling it if the client disconnects first.

    Raises:
        HungUp: the client went away and ``call`` was cancelled.
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

        nursery.start_soon(cancel_on_disconnect, ex, nursery.cancel_scope)
        nursery.start_soon(run_call)
    if failures:
        raise failures[0]
    if not results:
        raise HungUp
    return results[0]


async def cancel_on_disconnect(ex: Exchange, scope: trio.CancelScope) -> None:
    while (await ex.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
