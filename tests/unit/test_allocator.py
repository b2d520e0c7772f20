"""The allocator over a fake network in virtual time: offers become leases, renewals, losses.

``FakeHub`` nodes answer requests with their registered handlers, so the allocator runs
its real code; trio's ``MockClock`` makes every renewal time exact.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from hypha.protocol import ids
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.scheduler.allocator import Allocator, Grant, Price, WorkerSpec
from hypha.testing.fakes import FakeHub, FakeNode

SPEC = WorkerSpec(resources=Resources(cpu=1, memory=1), executors=())
LEASE_SECONDS = 8.0


class FakeWorker:
    """Answers adverts with an offer and renewals with ``LeaseRenewed``, recording when."""

    def __init__(self, node: FakeNode, price: float) -> None:
        self.node = node
        self.price = price
        self.renewed_at: list[float] = []
        self.decisions: list[m.OfferDecision] = []
        node.rpc.register(m.RenewLeaseRequest, self._renew, roles={"scheduler"})
        node.rpc.register(m.ReleaseLeaseRequest, self._release, roles={"scheduler"})
        self.released: list[str] = []

    async def _renew(self, peer: str, request: m.RenewLeaseRequest) -> m.Msg:
        self.renewed_at.append(trio.current_time())
        return m.LeaseRenewed(lease_id=request.lease_id, lease_seconds=LEASE_SECONDS)

    async def _release(self, peer: str, request: m.ReleaseLeaseRequest) -> m.Ack:
        self.released.append(request.lease_id)
        return m.Ack()

    async def answer_adverts(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        adverts = self.node.subscribe(ids.WORKER_TOPIC)
        task_status.started()
        async for _origin, advert in adverts:
            offer = m.OfferRequest(
                lease_id=f"{self.node.peer_id}-lease",
                request_id=advert.id,
                worker=self.node.peer_id,
                price=self.price,
                resources=advert.resources,
                expires_at=math.inf,
            )
            self.decisions.append(await self.node.request(advert.scheduler, offer, m.OfferDecision))


async def test_cheapest_offers_become_leases_that_renew_at_75_percent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = FakeHub()
    sched = hub.node("sched", "scheduler")
    workers = [FakeWorker(hub.node(f"w{i}", "worker"), price) for i, price in enumerate([3.0, 1.0, 2.0])]
    allocator = Allocator(sched, lease_seconds=LEASE_SECONDS, offer_deadline_seconds=3.0)
    async with trio.open_nursery() as nursery:
        for worker in workers:
            await nursery.start(worker.answer_adverts)
        grants = await allocator.allocate(SPEC, Price(bid=1.0, max_price=10.0), 2)
        assert [g.worker for g in grants] == ["w1", "w2"]  # cheapest first
        await trio.testing.wait_all_tasks_blocked()  # the answers reach the workers
        accepted = {w.node.peer_id: [d.accepted for d in w.decisions] for w in workers}
        assert accepted == {"w0": [False], "w1": [True], "w2": [True]}
        granted_at = trio.current_time()
        renewed: list[Grant] = []
        with trio.move_on_after(3 * LEASE_SECONDS):
            await allocator.keep(grants[0], renewed.append)
        # Renewed at 75% of each lifetime: 6 s, 12 s, 18 s after the grant.
        times = [t - granted_at for t in workers[1].renewed_at]
        assert times == pytest.approx([6.0, 12.0, 18.0])
        assert len(renewed) == 3
        assert allocator.statistics().num_renewals == 3
        nursery.cancel_scope.cancel()


async def test_a_silent_worker_is_lost_when_its_lease_lapses(autojump_clock: trio.testing.MockClock) -> None:
    hub = FakeHub()
    sched = hub.node("sched", "scheduler")
    worker = FakeWorker(hub.node("w0", "worker"), 1.0)
    allocator = Allocator(sched, lease_seconds=LEASE_SECONDS, offer_deadline_seconds=3.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.answer_adverts)
        (grant,) = await allocator.allocate(SPEC, Price(bid=1.0, max_price=10.0), 1)
        worker.node.online = False  # stops answering anything
        reason = await allocator.keep(grant)
        assert reason == "renewal not answered before the lease lapsed"
        assert trio.current_time() == pytest.approx(grant.expires_at)
        assert allocator.statistics().num_lost == 1
        nursery.cancel_scope.cancel()


async def test_lease_gone_ends_keeping_at_once(autojump_clock: trio.testing.MockClock) -> None:
    hub = FakeHub()
    sched = hub.node("sched", "scheduler")
    node = hub.node("w0", "worker")

    async def gone(peer: str, request: m.RenewLeaseRequest) -> m.Msg:
        return m.LeaseGone(lease_id=request.lease_id, reason="expired on the worker")

    node.rpc.register(m.RenewLeaseRequest, gone, roles={"scheduler"})
    allocator = Allocator(sched, lease_seconds=LEASE_SECONDS, offer_deadline_seconds=3.0)
    grant = Grant("l1", "w0", 1.0, Resources(), LEASE_SECONDS, trio.current_time() + LEASE_SECONDS)
    assert await allocator.keep(grant) == "lease gone: expired on the worker"
    assert trio.current_time() == pytest.approx(0.75 * LEASE_SECONDS)
