"""Gossip publish/subscribe over py-libp2p's gossipsub, with our own flow control.

Owns the gossipsub/pubsub services (started before any dial), message validation at the
boundary (every payload must decode as a wire message of the topic's type; payloads from a
peer whose admitted role is not allowed on the topic are dropped), and publishing through a
token bucket instead of the library's silent 10 msg/s drop. Subscribers get typed messages
on bounded channels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from hypha.errors import NetworkError
from hypha.net.admission import PeerDirectory
from hypha.net.rpc import M
from hypha.protocol import codec

logger = logging.getLogger(__name__)

PUBLISH_RATE_PER_SECOND = 200.0
PUBLISH_BURST = 50


class TokenBucket:
    """Waits instead of dropping when the publish rate is exceeded."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = trio.current_time()

    async def acquire(self) -> None:
        while True:
            now = trio.current_time()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await trio.sleep((1.0 - self._tokens) / self._rate)


class Received(Generic[M]):
    """A validated gossip message with the peer ID of its origin."""

    __slots__ = ("message", "origin")

    def __init__(self, origin: str, message: M) -> None:
        self.origin = origin
        self.message = message


@dataclass(frozen=True, slots=True)
class GossipStatistics:
    """Counters of a ``Gossip`` since start."""

    num_dropped: int
    """Received messages refused by validation: malformed, of another type, or from a role
    that may not publish on the topic."""


class Gossip:
    """Typed publish/subscribe on one host."""

    def __init__(self, pubsub: Pubsub, directory: PeerDirectory) -> None:
        self._pubsub = pubsub
        self._directory = directory
        self._bucket = TokenBucket(PUBLISH_RATE_PER_SECOND, PUBLISH_BURST)
        self._num_dropped = 0

    def statistics(self) -> GossipStatistics:
        """Return a snapshot of the counters."""
        return GossipStatistics(num_dropped=self._num_dropped)

    async def publish(self, topic: str, msg: Any) -> None:
        """Publish ``msg`` on ``topic``; waits (never drops) when over the rate limit."""
        await self._bucket.acquire()
        try:
            await self._pubsub.publish(topic, codec.encode_body(msg))
        except Exception as exc:
            raise NetworkError(f"publish on {topic} failed: {exc}") from exc

    @asynccontextmanager
    async def subscribe(
        self, topic: str, kind: type[M], *, roles: set[str] | None = None, depth: int = 256
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Received[M]]]:
        """Receive validated ``kind`` messages from ``topic`` while the context is open."""

        def validate(forwarder: ID, raw: Any) -> bool:
            try:
                msg = codec.decode_body(raw.data)
            except codec.ProtocolError as exc:
                self._num_dropped += 1
                logger.warning("dropped malformed gossip on %s from %s: %s", topic, forwarder, exc)
                return False
            if not isinstance(msg, kind):
                self._num_dropped += 1
                logger.warning("dropped %s on %s: expected %s", type(msg).__name__, topic, kind.__name__)
                return False
            origin = str(ID(raw.from_id))
            role = self._directory.role(origin)
            if roles is not None and role is not None and role not in roles:
                self._num_dropped += 1
                logger.warning("dropped gossip on %s from %s: role %s may not publish", topic, origin, role)
                return False
            return True

        self._pubsub.set_topic_validator(topic, validate, False)
        subscription = await self._pubsub.subscribe(topic)
        send, receive = trio.open_memory_channel[Received[M]](depth)

        async def pump() -> None:
            async with send:
                while True:
                    raw = await subscription.get()
                    try:
                        msg = codec.decode_body(raw.data)
                    except codec.ProtocolError:
                        continue
                    if isinstance(msg, kind):
                        await send.send(Received(str(ID(raw.from_id)), msg))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            try:
                yield receive
            finally:
                nursery.cancel_scope.cancel()
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    try:
                        await self._pubsub.unsubscribe(topic)
                    except Exception:  # shutting down anyway
                        pass


@asynccontextmanager
async def open_gossip(host: Any, directory: PeerDirectory, *, hub: bool = False) -> AsyncIterator[Gossip]:
    """Start gossipsub and pubsub on ``host`` (before any dial) and yield a ``Gossip``.

    ``hub`` is for gateways: peers connect to them first, so a gateway keeps every
    subscriber it knows in its mesh and an advert reaches all of them in one hop instead of
    waiting for heartbeat gossip (seconds later, after offers have expired). Every other
    node keeps a narrow mesh, as gossipsub intends: with a wide mesh on every node each
    advert is forwarded by everyone to everyone (n squared sends), which saturates a small
    machine exactly when many workers answer at once.
    """
    degree, low, high = (64, 4, 128) if hub else (6, 4, 12)
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11],
        degree=degree,
        degree_low=low,
        degree_high=high,
        heartbeat_interval=1,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
    )
    pubsub = Pubsub(host, router)
    # Message ids are (peer, seqno) and the library starts seqnos at the UNIX time in seconds,
    # one per message: a node restarted with the same identity (a resumed scheduler) would
    # reuse the seqnos it sent in the last seconds of its first life, and every peer would drop
    # its adverts as already seen for two minutes. Nanoseconds never go back that way.
    pubsub.counter = time.time_ns()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(background_trio_service(pubsub))
        await stack.enter_async_context(background_trio_service(router))
        await pubsub.wait_until_ready()
        yield Gossip(pubsub, directory)
