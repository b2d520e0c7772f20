"""Request/response over libp2p streams: one framed request, one framed response.

Owns framing on streams (``read_frame``/``write_frame``), the handler registry keyed by
message type with optional role restrictions, the per-peer budget of request bytes being
read at once, and the client side with library errors translated into ``hypha.errors``. A
malformed, oversized, over-budget, unexpected or revoked peer's request is answered with
``ErrorResponse`` and logged; it never takes the node down. Deadlines: the server bounds how
long it waits for a request; clients wrap calls in ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import trio

from hypha.errors import HyphaError, NetworkError, ProtocolError, RemoteError, wire_code
from hypha.net.limits import KeyedCounter, LogThrottle
from hypha.protocol import codec, codes
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=m.Msg)
Handler = Callable[[str, Any], Awaitable[m.Msg]]
"""``async def handler(peer_id, request) -> response``."""

PEER_BUDGET_BYTES: Final = 16 * 1024 * 1024
"""Bytes of request bodies one peer may have being read at once (four largest frames); a
request whose announced body would pass it is refused and its stream reset, so one peer's
many slow bodies cannot fill the node's memory."""
LOG_INTERVAL_SECONDS: Final = 10.0
"""At most one log line per interval about over-budget requests (a flood must not flood logs)."""
REFUSAL_GRACE_SECONDS: Final = 2.0
"""How long a refused over-budget request's peer has to read the refusal and close the stream
(its body is discarded as it arrives, never kept) before the stream is reset."""


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
    return await read_body(stream, await read_header(stream, limit))


async def read_header(stream: Stream, limit: int = codec.MAX_FRAME_BYTES) -> int:
    """Read a frame's header; return the length of its body (at most ``limit``).

    Raises:
        ProtocolError: the header is malformed or announces more than ``limit`` bytes.
        StreamEnded: the stream ended first.
    """
    header = await read_exactly(stream, codec.HEADER.size)
    try:
        return codec.parse_header(header, limit)
    except codec.ProtocolError as exc:
        raise ProtocolError(str(exc)) from exc


async def read_body(stream: Stream, length: int) -> m.Msg:
    """Read and decode the ``length`` body bytes that follow a header (see ``read_header``)."""
    try:
        body = await read_exactly(stream, length)
    except StreamEnded as exc:  # count the header too: something did arrive
        raise StreamEnded(codec.HEADER.size + exc.received, codec.HEADER.size + length) from exc
    try:
        return codec.decode_body(body)
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
    unsupported, over budget, from a revoked peer or from a role the route does not allow."""
    num_over_budget: int
    """Requests refused (``codes.TOO_MANY_BYTES``) because their body would have taken the
    peer past its budget of bytes being read at once."""
    num_revoked: int
    """Requests refused because the peer's certificate was revoked since it connected."""
    num_bytes_reading: int
    """Bytes of request bodies being read now, all peers together."""


class RpcServer:
    """Dispatches framed requests to handlers registered per message type.

    Args:
        role_of: the role of an admitted peer (None: unknown or revoked).
        request_timeout_seconds: how long a request may take to arrive, and its answer to go.
        is_revoked: whether a peer's certificate was revoked since it was admitted.

    Each peer may have ``PEER_BUDGET_BYTES`` of request bodies being read at once.
    """

    def __init__(
        self,
        role_of: Callable[[str], str | None],
        request_timeout_seconds: float,
        *,
        is_revoked: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        self._routes: dict[type[m.Msg], Route] = {}
        self._role_of = role_of
        self._is_revoked = is_revoked
        self._timeout = request_timeout_seconds
        self._reading = KeyedCounter()
        """Bytes of bodies being read, by peer."""
        self._num_rejected = 0
        self._num_over_budget = 0
        self._num_revoked = 0
        self._budget_log = LogThrottle(LOG_INTERVAL_SECONDS)

    def statistics(self) -> RpcStatistics:
        """Return a snapshot of the routes, the refused requests and the bytes being read."""
        return RpcStatistics(
            num_routes=len(self._routes),
            num_rejected=self._num_rejected,
            num_over_budget=self._num_over_budget,
            num_revoked=self._num_revoked,
            num_bytes_reading=self._reading.total(),
        )

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
        await self._answer_refusal(stream, code, detail)

    async def _answer_refusal(self, stream: Stream, code: str, detail: str) -> None:
        with trio.move_on_after(self._timeout):
            with contextlib.suppress(HyphaError):
                await write_frame(stream, m.ErrorResponse(code=code, detail=detail))

    async def _read_request(self, stream: Stream, peer: str) -> m.Msg | int:
        """Read one request within ``peer``'s budget; an ``int`` is the refused body's length."""
        length = await read_header(stream)
        if self._reading.get(peer) + length > PEER_BUDGET_BYTES:
            return length
        self._reading.add(peer, length)
        try:
            return await read_body(stream, length)
        finally:
            self._reading.remove(peer, length)

    async def _refuse_over_budget(self, stream: Stream, peer: str, length: int) -> None:
        """Refuse a body that would pass ``peer``'s budget: answer, then reset the stream.

        Logged at most once per ``LOG_INTERVAL_SECONDS`` (a flood must not flood the logs).
        """
        self._num_rejected += 1
        self._num_over_budget += 1
        if self._budget_log.ready():
            logger.warning(
                "refused a %d-byte request from %s: its requests being read would pass %d bytes "
                "(%d such refusals since start; next line in %g s at the earliest)",
                *(length, peer, PEER_BUDGET_BYTES, self._num_over_budget, LOG_INTERVAL_SECONDS),
            )
        detail = f"over this peer's budget of {PEER_BUDGET_BYTES} request bytes being read at once"
        await self._answer_refusal(stream, codes.TOO_MANY_BYTES, detail)
        # An honest client sends its whole body before it reads the refusal and closes: take
        # and drop the body meanwhile. Then reset, so a peer that keeps the stream open gets
        # nothing more buffered for it (a reset sent at once could overtake the refusal).
        with trio.move_on_after(REFUSAL_GRACE_SECONDS):
            await _discard(stream, length)
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            with contextlib.suppress(Exception):  # the peer may be gone already
                await stream.reset()

    async def handle(self, stream: Stream, peer: str) -> None:
        """Serve one stream; the per-connection error boundary of the RPC server."""
        if self._is_revoked(peer):
            await self._refuse_revoked(stream, peer)
            return
        try:
            with trio.fail_after(self._timeout):
                request = await self._read_request(stream, peer)
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
        if isinstance(request, int):
            await self._refuse_over_budget(stream, peer, request)
            return
        if self._is_revoked(peer):  # revoked while its request was arriving
            await self._refuse_revoked(stream, peer)
            return
        await self._dispatch(stream, peer, request)
        await _close(stream)

    async def _refuse_revoked(self, stream: Stream, peer: str) -> None:
        self._num_revoked += 1
        await self._reject(stream, peer, codes.FORBIDDEN, "the peer's certificate is revoked")
        await _close(stream)

    async def _dispatch(self, stream: Stream, peer: str, request: m.Msg) -> None:
        route = self._routes.get(type(request))
        if route is None:
            await self._reject(stream, peer, codes.UNSUPPORTED, f"no handler for {type(request).__name__}")
            return
        if route.roles is not None and self._role_of(peer) not in route.roles:
            detail = f"{type(request).__name__} needs role {sorted(route.roles)}"
            await self._reject(stream, peer, codes.FORBIDDEN, detail)
            return
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


async def _discard(stream: Stream, size: int) -> None:
    """Read and drop up to ``size`` bytes, or until the stream ends; nothing is kept."""
    left = size
    while left > 0:
        try:
            chunk = await stream.read(min(left, 1 << 16))
        except Exception:  # libp2p raises StreamEOF/StreamReset and friends: the end
            return
        if not chunk:
            return
        left -= len(chunk)


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
