"""Allocation under crashes: kill -9 a leased worker, kill -9 the scheduler."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.scheduler.allocator import Allocator, Price, WorkerSpec
from hypha.scheduler.pool import Pool, PoolSpec
from hypha.testing.cluster import Pki, open_test_node, spawn_node, wait_until, worker_config, write_toml
from hypha.worker import run_worker

pytestmark = pytest.mark.cluster

LEASE_SECONDS = 2.0
TRAIN = (m.ExecutorDescriptor(executor_class="train", name="diloco"),)
SPEC = WorkerSpec(resources=Resources(cpu=1, memory=2), executors=TRAIN)


def _worker_toml(pki: Pki, tmp: Path, name: str, gateway: str, price: float) -> Path:
    keys = pki.config_keys(pki.node(name, "worker"))
    return write_toml(
        tmp / f"{name}.toml",
        {
            **keys,
            "gateway_addresses": [gateway],
            "relay_circuit": False,
            "work_dir": str(tmp / name),
            "offer": {"price": price, "floor": 0.1},
            "executors": [{"class": "train", "name": "diloco", "cmd": "true"}],
        },
    )


async def test_killed_worker_is_detected_and_replaced(pki: Pki, tmp_path: Path) -> None:
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, AsyncExitStack() as stack:
        addr = gw.listen_addrs()[0]
        children = {}
        for i, price in enumerate([1.0, 2.0, 3.0]):
            cfg = _worker_toml(pki, tmp_path, f"w{i}", addr, price)
            child = await stack.enter_async_context(
                spawn_node(["worker", "--config", str(cfg)], tmp_path, f"w{i}")
            )
            children[child.peer_id] = child
        async with (
            open_test_node(pki, "s", "scheduler", gateways=[addr]) as s,
            trio.open_nursery() as nursery,
        ):
            allocator = Allocator(s, lease_seconds=LEASE_SECONDS, offer_deadline_seconds=3)
            pool = Pool(
                PoolSpec("trainers", SPEC, Price(1.0, 10.0), min=1, target=2, grace_seconds=60),
                allocator,
            )
            await nursery.start(pool.run)
            with trio.fail_after(30):
                await pool.wait_size(2)
            first = set(pool.workers())
            cheapest = sorted(first, key=lambda p: children[p].ready["peer_id"])[0]
            victim = children[cheapest]
            victim_lease = pool.members[victim.peer_id].lease_id
            victim.kill()
            with trio.fail_after(LEASE_SECONDS * 3 + 10):
                while victim.peer_id in pool.members:
                    await pool.wait_changed(pool.version)
            assert pool.statistics().num_lost == 1
            assert pool.loss_reason(victim_lease).startswith(("renewal", "lease gone"))
            with trio.fail_after(30):
                await wait_until(lambda: len(pool.members) == 2 and victim.peer_id not in pool.members)
            spare = (set(children) - first).pop()
            assert spare in pool.members
            nursery.cancel_scope.cancel()


async def test_killed_scheduler_frees_workers_for_others(pki: Pki, tmp_path: Path) -> None:
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw, trio.open_nursery() as nursery:
        addr = gw.listen_addrs()[0]
        workers = []
        for i in range(2):
            config = worker_config(pki, f"w{i}", addr, tmp_path)
            workers.append(
                await nursery.start(lambda task_status, c=config: run_worker(c, task_status=task_status))
            )
        sched_cfg = write_toml(
            tmp_path / "s.toml",
            {
                **pki.config_keys(pki.node("s", "scheduler")),
                "gateway_addresses": [addr],
                "relay_circuit": False,
                "lease_seconds": LEASE_SECONDS,
            },
        )
        job = write_toml(
            tmp_path / "job.toml",
            {
                "name": "alloc",
                "trainers": {
                    "min": 1,
                    "target": 2,
                    "bid": 1.0,
                    "max_price": 5.0,
                    "resources": {"cpu": 1, "memory": 2},
                },
            },
        )
        async with spawn_node(
            ["scheduler", "--config", str(sched_cfg), "--job", str(job), "--allocate-only"], tmp_path, "s"
        ) as sched:
            with trio.fail_after(30):
                await wait_until(
                    lambda: all(w.leases.ledger.statistics().num_renewable == 1 for w in workers)
                )
            assert all(w.leases.ledger.by_holder(sched.peer_id) for w in workers)
            sched.kill()
            # Freed by expiry, not by a release. A worker may have expired twice: a lease that
            # lapsed before the kill (a renewal late against 2 s leases) is replaced by the
            # pool with a fresh one, which the kill then lets expire too. The ledger counts an
            # expired lease's resources free before the watcher has ended it: wait for both.
            with trio.fail_after(LEASE_SECONDS * 3 + 10):
                await wait_until(
                    lambda: all(
                        w.leases.ledger.free() == w.leases.ledger.capacity and w.leases.num_expired >= 1
                        for w in workers
                    )
                )
            assert all(w.leases.statistics().num_released == 0 for w in workers)
        async with open_test_node(pki, "s2", "scheduler", gateways=[addr]) as s2:
            other = Allocator(s2, lease_seconds=30, offer_deadline_seconds=3)
            with trio.fail_after(30):
                grants = await other.allocate(SPEC, Price(bid=1.0, max_price=10), 2)
            assert {g.worker for g in grants} == {w.node.peer_id for w in workers}
        nursery.cancel_scope.cancel()
