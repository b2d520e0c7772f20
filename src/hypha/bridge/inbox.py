"""Files pushed to one task, held until the executor's receive stream has taken them.

Owns the delivery rule of ``GET /resources/receive``: every open subscription gets every
file delivered while it is open; a file delivered while nobody is subscribed waits for the
next subscriber; and a file a subscription took but could not write to its executor (the
executor hung up or its stream ended) is not lost: it goes to the open subscriptions that
never had it, or back to the front of the queue when none is open. Nothing here does I/O;
the worker delivers, the bridge server subscribes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from hypha.protocol import bridge as b

MAX_QUEUED_PER_SUBSCRIPTION = 256
"""Files buffered for one open stream; past it the executor is not reading and they queue."""

_Item = tuple[int, b.ReceivedFile]
"""A delivered file and its delivery number (which subscriptions had it)."""


class Subscription:
    """One open receive stream's view of an ``Inbox``."""

    def __init__(self, first_seq: int, queued: list[_Item]) -> None:
        self._send, self._receive = trio.open_memory_channel[_Item](
            max(MAX_QUEUED_PER_SUBSCRIPTION, len(queued))
        )
        self._first_seq = first_seq
        self._handed: set[int] = set()
        for item in queued:
            self.offer(item)
        self._taken: _Item | None = None
        self._returned: list[_Item] = []

    def had(self, seq: int) -> bool:
        """Whether delivery ``seq`` was handed to this subscription."""
        return seq >= self._first_seq or seq in self._handed

    def offer(self, item: _Item) -> bool:
        """Queue ``item`` for this stream; False when its buffer is full."""
        try:
            self._send.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        if item[0] < self._first_seq:
            self._handed.add(item[0])
        return True

    def end(self) -> None:
        """No more files: the stream ends once it has written what is buffered."""
        self._send.close()

    async def receive(self) -> b.ReceivedFile:
        """The next file; raises ``trio.EndOfChannel`` once the inbox is closed and drained."""
        self._taken = await self._receive.receive()
        return self._taken[1]

    def give_back(self, item: b.ReceivedFile) -> None:
        """``item``, the file last received, never reached the executor."""
        if self._taken is not None and self._taken[1] is item:
            self._returned.append(self._taken)
            self._taken = None

    def untaken(self) -> list[_Item]:
        """Files given back, then those still buffered: what this stream did not deliver."""
        self._send.close()
        left = list(self._returned)
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
            while True:
                left.append(self._receive.receive_nowait())
        self._receive.close()
        return left


@dataclass(frozen=True, slots=True)
class InboxStatistics:
    """A snapshot of an ``Inbox``'s counters (for telemetry)."""

    num_delivered: int
    num_pending: int
    """Files waiting for a subscriber."""
    num_subscribers: int
    num_handed_on: int
    """Files an ended stream did not deliver, handed to another stream or queued again."""


class Inbox:
    """The queue of files pushed to one task and its open subscriptions."""

    def __init__(self) -> None:
        self._pending: list[_Item] = []
        self._subscribers: list[Subscription] = []
        self._next_seq = 0
        self._closed = False
        self._num_handed_on = 0

    def statistics(self) -> InboxStatistics:
        """Return a snapshot of the counters."""
        return InboxStatistics(
            num_delivered=self._next_seq,
            num_pending=len(self._pending),
            num_subscribers=len(self._subscribers),
            num_handed_on=self._num_handed_on,
        )

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def pending(self) -> list[b.ReceivedFile]:
        """Files waiting for a subscriber, oldest first."""
        return [item for _, item in self._pending]

    def deliver(self, received: b.ReceivedFile) -> None:
        """Hand a file to every open subscription, or queue it when none can take it."""
        item = (self._next_seq, received)
        self._next_seq += 1
        delivered = [sub.offer(item) for sub in self._subscribers]
        if not any(delivered):
            self._pending.append(item)  # also when every open stream is far behind

    def close(self) -> None:
        """End every stream once it has drained; later subscriptions get the queue, then end."""
        self._closed = True
        for sub in self._subscribers:
            sub.end()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """Open a subscription: queued files first, then every file delivered while open.

        On exit, each file the subscription did not deliver goes to the open subscriptions
        that never had it, or back to the front of the queue when none is open.
        """
        subscription = Subscription(self._next_seq, self._pending)
        self._pending = []
        if self._closed:
            subscription.end()
        self._subscribers.append(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.remove(subscription)
            left = subscription.untaken()
            self._num_handed_on += len(left)
            if not self._subscribers:
                self._pending[:0] = left
            else:
                for item in left:
                    lacking = [other for other in self._subscribers if not other.had(item[0])]
                    if lacking and not any([other.offer(item) for other in lacking]):
                        self._pending.append(item)
