"""The worker's lease expiry, renewal and release, in virtual time.

Runs on trio's ``MockClock`` (``autojump_clock``), so each expiry is checked at its exact
instant. The node is a fake that keeps the RPC handlers ``WorkerLeases`` registers; the
ledger and the expiry watcher are the real ones. Expiry with real nodes and a real executor
is in ``tests/integration/test_execution.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from hypha.errors import LeaseError
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.testing.fakes import FakeRpcNode
from hypha.worker.leases import WorkerLeases, WorkerLeaseStatistics

CAPACITY = Resources(cpu=2, memory=2)
ONE = Resources(cpu=1, memory=1)


@asynccontextmanager
async def open_leases() -> AsyncIterator[tuple[FakeRpcNode, WorkerLeases, list[tuple[str, str, float]]]]:
    """Run ``WorkerLeases`` on a fake node; yield it with the ends it reported (id, reason, time).

    Cancellation: leaving the block cancels the leases' watcher.
    """
    node = FakeRpcNode()
    leases = WorkerLeases(node, CAPACITY)  # type: ignore[arg-type]
    ended: list[tuple[str, str, float]] = []

    async def on_end(lease_id: str, reason: str) -> None:
        ended.append((lease_id, reason, trio.current_time()))

    leases.on_lease_end(on_end)
    async with trio.open_nursery() as nursery:
        await nursery.start(leases.run)
        yield node, leases, ended
        nursery.cancel_scope.cancel()


def grant(
    leases: WorkerLeases, lease_id: str, seconds: float, holder: str = "sched", resources: Resources = ONE
) -> None:
    """What the arbiter does when ``holder`` accepts an offer."""
    leases.ledger.reserve(lease_id, holder, resources, 5.0)
    leases.ledger.promote(lease_id, holder, seconds)
    leases.remember_duration(lease_id, seconds)
    leases.changed()


async def test_lease_expires_at_its_deadline_and_stops_its_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_leases() as (_node, leases, ended):
        start = trio.current_time()
        grant(leases, "l1", 30.0)
        await trio.sleep(29.0)
        assert ended == []
        assert leases.ledger.free() == Resources(cpu=1, memory=1)
        await trio.sleep(2.0)
        assert ended == [("l1", "lease expired", start + 30.0)]
        assert leases.ledger.free() == CAPACITY
        assert leases.statistics() == WorkerLeaseStatistics(
            num_renewed=0, num_released=0, num_expired=1, num_revoked=0
        )
        # The old attribute, kept for its readers (see its docstring): it must keep agreeing.
        assert leases.num_expired == 1


async def test_renewal_moves_the_expiry_by_the_granted_duration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_leases() as (node, leases, ended):
        grant(leases, "l1", 30.0)
        await trio.sleep(20.0)
        renewed_at = trio.current_time()
        reply = await node.call("sched", m.RenewLeaseRequest(lease_id="l1"))
        assert reply == m.LeaseRenewed(lease_id="l1", lease_seconds=30.0)
        await trio.sleep(29.0)
        assert ended == []  # past the first deadline, before the renewed one
        await trio.sleep(2.0)
        assert ended == [("l1", "lease expired", renewed_at + 30.0)]
        # Renewing a lapsed lease tells the holder it is gone instead of reviving it.
        gone = await node.call("sched", m.RenewLeaseRequest(lease_id="l1"))
        assert isinstance(gone, m.LeaseGone)
        assert leases.statistics().num_renewed == 1


async def test_release_ends_the_lease_at_once_and_only_for_its_holder(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_leases() as (node, leases, ended):
        grant(leases, "l1", 30.0)
        with pytest.raises(LeaseError, match="not held by forger"):
            await node.call("forger", m.ReleaseLeaseRequest(lease_id="l1"))
        await trio.sleep(10.0)
        await node.call("sched", m.ReleaseLeaseRequest(lease_id="l1"))
        assert ended == [("l1", "released by its holder", trio.current_time())]
        await trio.sleep(60.0)
        assert len(ended) == 1  # the watcher does not end it a second time
        assert leases.statistics() == WorkerLeaseStatistics(
            num_renewed=0, num_released=1, num_expired=0, num_revoked=0
        )


async def test_an_unanswered_offer_frees_its_resources_without_ending_tasks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_leases() as (_node, leases, ended):
        leases.ledger.reserve("offer", "sched", ONE, 5.0)  # temporary, never promoted
        leases.changed()
        await trio.sleep(6.0)
        assert leases.ledger.free() == CAPACITY
        assert ended == []
        assert leases.statistics().num_expired == 0


async def test_revoked_holder_loses_every_lease_at_once_and_others_keep_theirs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_leases() as (node, leases, ended):
        grant(leases, "l1", 30.0)
        half = Resources(cpu=0.5, memory=0.5)
        grant(leases, "l2", 30.0, holder="other", resources=half)
        await trio.sleep(10.0)
        leases.ledger.reserve("offer", "sched", half, 5.0)  # an offer the revoked peer holds too
        leases.changed()
        await node.revoke("sched")
        assert ended == [("l1", "the holder's certificate was revoked", trio.current_time())]
        assert leases.ledger.get("offer") is None
        assert [lease.lease_id for lease in leases.ledger] == ["l2"]
        assert leases.statistics().num_revoked == 2
        assert leases.ledger.free() == Resources(cpu=1.5, memory=1.5)
        # The revoked holder's renewal finds nothing; the watcher never ends l1 a second time.
        assert isinstance(await node.call("sched", m.RenewLeaseRequest(lease_id="l1")), m.LeaseGone)
        await trio.sleep(25.0)
        assert [e[0] for e in ended] == ["l1", "l2"]  # l2 only at its own expiry
        assert leases.statistics().num_expired == 1
