"""Allocation with real nodes in one trio run: offers, ranking, explicit answers, leases."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from hypha.errors import RemoteError
from hypha.net.host import Node
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.scheduler.allocator import Allocator, Price, WorkerSpec
from hypha.testing.cluster import Pki, open_test_node, wait_until, worker_config
from hypha.worker import Worker, run_worker

TRAIN = (m.ExecutorDescriptor(executor_class="train", name="diloco"),)
SPEC = WorkerSpec(resources=Resources(cpu=1, memory=2), executors=TRAIN)


async def start_workers(stack: AsyncExitStack, nursery: trio.Nursery, configs: list) -> list[Worker]:
    workers = []
    for config in configs:
        workers.append(
            await nursery.start(lambda task_status, c=config: run_worker(c, task_status=task_status))
        )
    return workers


def renewable(worker: Worker) -> int:
    return worker.leases.ledger.statistics().num_renewable


def is_free(worker: Worker) -> bool:
    return worker.leases.ledger.free() == worker.leases.ledger.capacity


async def test_cheapest_three_of_five_get_leases_others_rejected(pki: Pki, tmp_path: Path) -> None:
    prices = [5.0, 1.0, 3.0, 2.0, 4.0]
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        gw_addr = gw.listen_addrs()[0]
        configs = [worker_config(pki, f"w{i}", gw_addr, tmp_path, price=p) for i, p in enumerate(prices)]
        workers = await start_workers(AsyncExitStack(), nursery, configs)
        async with open_test_node(pki, "s1", "scheduler", gateways=[gw_addr]) as s1:
            allocator = Allocator(s1, lease_seconds=30, offer_deadline_seconds=5)
            with trio.fail_after(30):
                grants = await allocator.allocate(SPEC, Price(bid=1.0, max_price=10), 3)
            chosen = {g.worker for g in grants}
            by_price = sorted(workers, key=lambda w: w.config.offer.price)
            assert chosen == {w.node.peer_id for w in by_price[:3]}
            assert [g.price for g in grants] == [1.0, 2.0, 3.0]
            with trio.fail_after(10):
                await wait_until(lambda: all(renewable(w) == 1 for w in by_price[:3]))
                # The two expensive workers were told "rejected" and freed their reservation.
                await wait_until(lambda: all(is_free(w) for w in by_price[3:]))
            assert all(w.arbiter.stats.num_rejected == 1 for w in by_price[3:])
            # ...and can offer to someone else immediately.
            async with open_test_node(pki, "s2", "scheduler", gateways=[gw_addr]) as s2:
                other = Allocator(s2, lease_seconds=30, offer_deadline_seconds=5)
                with trio.fail_after(30):
                    more = await other.allocate(SPEC, Price(bid=1.0, max_price=10), 2)
                assert {g.worker for g in more} == {w.node.peer_id for w in by_price[3:]}
        nursery.cancel_scope.cancel()


async def test_unsuitable_workers_do_not_offer(pki: Pki, tmp_path: Path) -> None:
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        a = gw.listen_addrs()[0]
        configs = [
            worker_config(pki, "good", a, tmp_path),
            worker_config(
                pki, "noexec", a, tmp_path, executors=[{"class": "train", "name": "other", "cmd": "x"}]
            ),
            worker_config(pki, "small", a, tmp_path, memory=1.0),
            worker_config(pki, "nogpu", a, tmp_path, gpu=0.0),
            worker_config(pki, "greedy", a, tmp_path, floor=50.0),
        ]
        good, noexec, small, nogpu, greedy = await start_workers(AsyncExitStack(), nursery, configs)
        async with open_test_node(pki, "s", "scheduler", gateways=[a]) as s:
            allocator = Allocator(s, lease_seconds=30, offer_deadline_seconds=3)
            with trio.fail_after(30):
                grants = await allocator.allocate(SPEC, Price(bid=1.0, max_price=10), 5)
            assert {g.worker for g in grants} == {good.node.peer_id, nogpu.node.peer_id}
            gpu_spec = WorkerSpec(resources=Resources(cpu=1, memory=2, gpu=8), executors=TRAIN)
            with trio.fail_after(30):
                assert await allocator.allocate(gpu_spec, Price(bid=1.0, max_price=10), 1) == []
        for w in (noexec, small, greedy):
            assert w.arbiter.stats.num_offers == 0
            assert w.arbiter.stats.num_dropped > 0
        assert nogpu.arbiter.stats.num_offers == 1  # offered for the CPU request only
        nursery.cancel_scope.cancel()


async def test_two_schedulers_never_double_book_higher_bid_first(pki: Pki, tmp_path: Path) -> None:
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        a = gw.listen_addrs()[0]
        configs = [worker_config(pki, f"w{i}", a, tmp_path, price=1.0) for i in range(5)]
        workers = await start_workers(AsyncExitStack(), nursery, configs)
        async with (
            open_test_node(pki, "rich", "scheduler", gateways=[a]) as rich,
            open_test_node(pki, "poor", "scheduler", gateways=[a]) as poor,
        ):
            results: dict[str, list] = {}

            async def ask(node: Node, bid: float, key: str) -> None:
                alloc = Allocator(node, lease_seconds=30, offer_deadline_seconds=4)
                results[key] = await alloc.allocate(SPEC, Price(bid=bid, max_price=10), 4)

            with trio.fail_after(40):
                async with trio.open_nursery() as both:
                    both.start_soon(ask, rich, 5.0, "rich")
                    both.start_soon(ask, poor, 2.0, "poor")
            rich_set = {g.worker for g in results["rich"]}
            poor_set = {g.worker for g in results["poor"]}
            assert not rich_set & poor_set
            assert len(rich_set) == 4
            assert len(poor_set) == 1
            with trio.fail_after(10):
                await wait_until(lambda: sum(renewable(w) for w in workers) == 5)
            assert all(renewable(w) == 1 for w in workers)
        nursery.cancel_scope.cancel()


async def test_forged_renew_and_dispatch_are_refused(pki: Pki, tmp_path: Path) -> None:
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        a = gw.listen_addrs()[0]
        [worker] = await start_workers(AsyncExitStack(), nursery, [worker_config(pki, "w", a, tmp_path)])
        async with (
            open_test_node(pki, "holder", "scheduler", gateways=[a]) as holder,
            open_test_node(pki, "forger", "scheduler", gateways=[a]) as forger,
        ):
            allocator = Allocator(holder, lease_seconds=30, offer_deadline_seconds=3)
            with trio.fail_after(30):
                [grant] = await allocator.allocate(SPEC, Price(bid=1.0, max_price=10), 1)
                await wait_until(lambda: renewable(worker) == 1)
            with pytest.raises(RemoteError, match="not held by"):
                await forger.request(worker.node.peer_id, m.RenewLeaseRequest(lease_id=grant.lease_id), m.Msg)
            dispatch = m.DispatchTask(
                lease_id=grant.lease_id, task_id="t", job_id="j", executor=TRAIN[0], config=b"{}"
            )
            with pytest.raises(RemoteError, match="not held by"):
                await forger.request(worker.node.peer_id, dispatch, m.Msg)
            with pytest.raises(RemoteError, match="not held by"):
                await forger.request(
                    worker.node.peer_id, m.ReleaseLeaseRequest(lease_id=grant.lease_id), m.Ack
                )
            # The holder still holds it.
            reply = await holder.request(
                worker.node.peer_id, m.RenewLeaseRequest(lease_id=grant.lease_id), m.Msg
            )
            assert isinstance(reply, m.LeaseRenewed)
        nursery.cancel_scope.cancel()
