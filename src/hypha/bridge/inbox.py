"""Files pushed to one task, held until the executor's receive stream has taken them.

Owns the delivery rule of ``GET /resources/receive``: every open subscription gets every
file delivered while it is open; a file delivered while nobody is subscribed waits for the
next subscriber; and a file a subscription took but could not write to its executor (the
executor hung up or its stream ended) goes back to the front of the queue instead of being
lost. Nothing here does I/O; the worker delivers, the bridge server subscribes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from hypha.protocol import bridge as b

MAX_QUEUED_PER_SUBSCRIPTION = 256
"""Files buffered for one open stream; past it the executor is not reading and they queue."""


class Subscription:
    """One open receive stream's view of an ``Inbox``."""

    def __init__(self, receive: trio.MemoryReceiveChannel[b.ReceivedFile]) -> None:
        self._receive = receive
        self.returned: list[b.ReceivedFile] = []

    async def receive(self) -> b.ReceivedFile:
        """The next file; raises ``trio.EndOfChannel`` once the inbox is closed and drained."""
        return await self._receive.receive()

    def give_back(self, item: b.ReceivedFile) -> None:
        """``item`` was taken but never reached the executor: queue it for the next stream."""
        self.returned.append(item)

    def untaken(self) -> list[b.ReceivedFile]:
        """Files given back, then those still buffered: what this stream did not deliver."""
        left = list(self.returned)
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            while True:
                left.append(self._receive.receive_nowait())
        return left


class Inbox:
    """The queue of files pushed to one task and its open subscriptions."""

    def __init__(self) -> None:
        self._pending: list[b.ReceivedFile] = []
        self._subscribers: list[trio.MemorySendChannel[b.ReceivedFile]] = []
        self._closed = False

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def pending(self) -> list[b.ReceivedFile]:
        """Files waiting for a subscriber, oldest first."""
        return list(self._pending)

    def deliver(self, item: b.ReceivedFile) -> None:
        """Hand ``item`` to every open subscription, or queue it when there is none."""
        delivered = False
        for channel in self._subscribers:
            try:
                channel.send_nowait(item)
                delivered = True
            except trio.WouldBlock:
                continue  # that executor is far behind; the others still get it
        if not delivered:
            self._pending.append(item)

    def close(self) -> None:
        """End every stream once it has drained; later subscriptions get the queue, then end."""
        self._closed = True
        for channel in self._subscribers:
            channel.close()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """Open a subscription: queued files first, then every file delivered while open.

        On exit, files the subscription did not deliver go back to the front of the queue,
        unless another subscription is open (it got its own copy of each).
        """
        send, receive = trio.open_memory_channel[b.ReceivedFile](
            max(MAX_QUEUED_PER_SUBSCRIPTION, len(self._pending))
        )
        for item in self._pending:
            send.send_nowait(item)
        self._pending.clear()
        if self._closed:
            send.close()
        self._subscribers.append(send)
        subscription = Subscription(receive)
        try:
            yield subscription
        finally:
            self._subscribers.remove(send)
            send.close()
            left = subscription.untaken()
            receive.close()
            if not self._subscribers:
                self._pending[:0] = left
