"""Request/response over libp2p streams: one framed request, one framed response.

Owns framing on streams (``read_frame``/``write_frame``), the handler registry keyed by
message type with optional role restrictions, and the client side with library errors
translated into ``hypha.errors``. A malformed, oversized or unexpected request is answered
with ``ErrorResponse`` and logged; it never takes the node down. Deadlines: the server
bounds how long it waits for a request; clients wrap calls in ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from hypha.errors import HyphaError, NetworkError, ProtocolError, RemoteError, wire_code
from hypha.protocol import codec, codes
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=m.Msg)
Handler = Callable[[str, Any], Awaitable[m.Msg]]
"""``async def handler(peer_id, request) -> response``."""


class Stream(Protocol):
    """The part of a libp2p ``INetStream`` that framing needs."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


class StreamEnded(ProtocolError):
    """The stream ended before a whole frame; ``received`` bytes of ``size`` had arrived."""

    def __init__(self, received: int, size: int) -> None:
        super().__init__(f"stream ended after {received} of {size} bytes")
        self.received = received


async def read_exactly(stream: Stream, size: int) -> bytes:
    """Read exactly ``size`` bytes or raise ``StreamEnded`` on a short stream."""
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        try:
            chunk = await stream.read(min(remaining, 1 << 20))
        except Exception as exc:  # libp2p raises StreamEOF/StreamReset and friends
            raise StreamEnded(size - remaining, size) from exc
        if not chunk:
            raise StreamEnded(size - remaining, size)
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


async def read_frame(stream: Stream, limit: int = codec.MAX_FRAME_BYTES) -> m.Msg:
    """Read one frame and decode it; every failure is a ``hypha.errors.ProtocolError``."""
    try:
        length = codec.parse_header(await read_exactly(stream, codec.HEADER.size), limit)
        try:
            body = await read_exactly(stream, length)
        except StreamEnded as exc:  # count the header too: something did arrive
            raise StreamEnded(codec.HEADER.size + exc.received, codec.HEADER.size + length) from exc
        return codec.decode_body(body)
    except ProtocolError:
        raise
    except codec.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc


async def write_frame(stream: Stream, msg: m.Msg) -> None:
    try:
        await stream.write(codec.encode_frame(msg))
    except codec.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc
    except Exception as exc:
        raise NetworkError(f"stream write failed: {exc}") from exc


@dataclass(frozen=True)
class Route:
    handler: Handler
    roles: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class RpcStatistics:
    """Counters of an ``RpcServer`` since start."""

    num_routes: int
    """Message types with a registered handler."""
    num_rejected: int
    """Requests answered with a refusal before any handler ran: malformed, too slow,
    unsupported, or from a role the route does not allow."""


class RpcServer:
    """Dispatches framed requests to handlers registered per message type."""

    def __init__(self, role_of: Callable[[str], str | None], request_timeout_seconds: float) -> None:
        self._routes: dict[type[m.Msg], Route] = {}
        self._role_of = role_of
        self._timeout = request_timeout_seconds
        self._num_rejected = 0

    def statistics(self) -> RpcStatistics:
        """Return a snapshot of the routes and the rejected requests."""
        return RpcStatistics(num_routes=len(self._routes), num_rejected=self._num_rejected)

    def register(
        self,
        kind: type[M],
        handler: Callable[[str, M], Awaitable[m.Msg]],
        *,
        roles: set[str] | None = None,
    ) -> None:
        """Serve requests of type ``kind``; ``roles`` restricts who may send them.

        Raises:
            ValueError: ``kind`` already has a handler (two owners would steal each other's
                requests silently).
        """
        if kind in self._routes:
            raise ValueError(f"{kind.__name__} already has a handler on this node")
        self._routes[kind] = Route(handler, frozenset(roles) if roles is not None else None)

    async def _reject(self, stream: Stream, peer: str, code: str, detail: str) -> None:
        self._num_rejected += 1
        logger.warning("rejected request from %s: %s: %s", peer, code, detail)
        with trio.move_on_after(self._timeout):
            with contextlib.suppress(HyphaError):
                await write_frame(stream, m.ErrorResponse(code=code, detail=detail))

    async def handle(self, stream: Stream, peer: str) -> None:
        """Serve one stream; the per-connection error boundary of the RPC server."""
        try:
            with trio.fail_after(self._timeout):
                request = await read_frame(stream)
        except StreamEnded as exc:
            if exc.received:
                await self._reject(stream, peer, codes.BAD_REQUEST, str(exc))
            else:  # the peer gave up (cancelled) before sending anything: nothing malformed
                logger.info("request from %s abandoned before its first byte", peer)
            await _close(stream)
            return
        except ProtocolError as exc:
            await self._reject(stream, peer, codes.BAD_REQUEST, str(exc))
            await _close(stream)
            return
        except trio.TooSlowError:
            await self._reject(stream, peer, codes.TIMEOUT, "no complete request in time")
            await _close(stream)
            return
        route = self._routes.get(type(request))
        if route is None:
            await self._reject(stream, peer, codes.UNSUPPORTED, f"no handler for {type(request).__name__}")
        elif route.roles is not None and self._role_of(peer) not in route.roles:
            await self._reject(
                stream,
                peer,
                codes.FORBIDDEN,
                f"{type(request).__name__} needs role {sorted(route.roles)}",
            )
        else:
            try:
                response = await route.handler(peer, request)
            except HyphaError as exc:
                response = m.ErrorResponse(code=wire_code(exc), detail=str(exc))
            except Exception as exc:
                logger.exception("handler for %s failed", type(request).__name__)
                response = m.ErrorResponse(code=codes.INTERNAL, detail=repr(exc))
            try:
                with trio.fail_after(self._timeout):
                    await write_frame(stream, response)
            except (HyphaError, trio.TooSlowError) as exc:
                logger.info("could not answer %s from %s: %s", type(request).__name__, peer, exc)
        await _close(stream)


async def _close(stream: Stream) -> None:
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        try:
            await stream.close()
        except Exception:  # the peer may be gone already; nothing to do
            pass


async def exchange(stream: Stream, request: m.Msg, expect: type[M]) -> M:
    """Send ``request`` on a fresh stream, read the response, check its type.

    Raises:
        RemoteError: the peer answered with ``ErrorResponse``.
        ProtocolError: the response was malformed or of another type.
        NetworkError: the stream broke.
    """
    try:
        await write_frame(stream, request)
        response = await read_frame(stream)
    finally:
        await _close(stream)
    if isinstance(response, m.ErrorResponse):
        raise RemoteError(response.code, response.detail)
    if not isinstance(response, expect):
        raise ProtocolError(f"expected {expect.__name__}, got {type(response).__name__}")
    return response
