"""The per-task inbox: what reaches the executor's receive streams, and what waits."""

from __future__ import annotations

import contextlib

import pytest
import trio

from hypha.bridge import Inbox
from hypha.protocol import bridge as b


def pushed(n: int) -> b.ReceivedFile:
    return b.ReceivedFile(path=f"incoming/{n}", size=n, sha256="0" * 64, from_peer="p", purpose="weights")


async def test_files_wait_for_the_first_subscriber_in_order() -> None:
    inbox = Inbox()
    inbox.deliver(pushed(0))
    inbox.deliver(pushed(1))
    with inbox.subscribe() as subscription:
        assert [await subscription.receive() for _ in range(2)] == [pushed(0), pushed(1)]
    assert inbox.pending == []


async def test_every_open_subscription_gets_every_file() -> None:
    inbox = Inbox()
    with inbox.subscribe() as first, inbox.subscribe() as second:
        inbox.deliver(pushed(3))
        assert await first.receive() == pushed(3)
        assert await second.receive() == pushed(3)


async def test_undelivered_files_go_back_to_the_front_of_the_queue() -> None:
    inbox = Inbox()
    with inbox.subscribe() as subscription:
        for n in range(3):
            inbox.deliver(pushed(n))
        taken = await subscription.receive()
        subscription.give_back(taken)  # its event could not be written
    inbox.deliver(pushed(3))
    assert inbox.pending == [pushed(n) for n in range(4)]
    with inbox.subscribe() as again:
        assert [await again.receive() for _ in range(4)] == [pushed(n) for n in range(4)]


async def test_a_closing_subscription_keeps_nothing_another_one_has() -> None:
    inbox = Inbox()
    with inbox.subscribe() as stays:
        with inbox.subscribe():
            inbox.deliver(pushed(5))
        assert inbox.pending == []
        assert await stays.receive() == pushed(5)


async def test_a_closing_subscription_hands_on_what_a_newer_one_never_had() -> None:
    inbox = Inbox()
    with contextlib.ExitStack() as stack:
        with inbox.subscribe():
            inbox.deliver(pushed(6))  # only the older stream is open: it alone has the file
            newer = stack.enter_context(inbox.subscribe())
            inbox.deliver(pushed(7))  # both have this one
        # The older stream ended without writing either file.
        assert inbox.pending == []
        assert [await newer.receive() for _ in range(2)] == [pushed(7), pushed(6)]


async def test_close_ends_streams_after_the_queue() -> None:
    inbox = Inbox()
    inbox.deliver(pushed(1))
    inbox.close()
    with inbox.subscribe() as subscription:
        assert await subscription.receive() == pushed(1)
        with pytest.raises(trio.EndOfChannel):
            await subscription.receive()
