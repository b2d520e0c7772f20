"""The scheduler role: one job, its worker pools, and the job's lifecycle.

Owns wiring the allocator and the pools of a job to one node, receiving ``TaskStatus``
from workers, and running the job's driver (``scheduler/job.py``) until it finishes or
fails. With ``--allocate-only`` the driver only holds the pools (allocation smoke runs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from hypha.config.job import JobSpec, PoolSection
from hypha.config.schema import SchedulerConfig
from hypha.net.host import Node
from hypha.net.runner import run_node, settings_from_config
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.scheduler.allocator import Allocator, Price, WorkerSpec
from hypha.scheduler.pool import Pool, PoolEvent, PoolSpec

logger = logging.getLogger(__name__)


def pool_spec(name: str, section: PoolSection, executor_class: m.ExecutorClass) -> PoolSpec:
    """Build a pool's spec from its job section."""
    r = section.resources
    return PoolSpec(
        name=name,
        worker=WorkerSpec(
            resources=Resources(gpu=r.gpu, cpu=r.cpu, memory=r.memory, storage=r.storage),
            executors=(m.ExecutorDescriptor(executor_class=executor_class, name=section.executor),),
        ),
        price=Price(bid=section.bid, max_price=section.max_price),
        min=section.min,
        target=section.target,
        grace_seconds=section.grace_seconds,
    )


@dataclass
class SchedulerParts:
    """What a running scheduler exposes to its job driver and to tests."""

    node: Node
    allocator: Allocator
    trainers: Pool
    parameter_server: Pool
    events: trio.MemoryReceiveChannel[PoolEvent]
    statuses: trio.MemoryReceiveChannel[m.TaskStatus]


async def run_scheduler(
    config: SchedulerConfig,
    job: JobSpec,
    *,
    ready_file: Path | None = None,
    allocate_only: bool = False,
    task_status: trio.TaskStatus[SchedulerParts] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the job until it ends (returns) or fails (raises ``JobError``)."""
    finished = trio.Event()

    async def body(node: Node, nursery: trio.Nursery) -> Mapping[str, object]:
        lease_seconds = job.lease_seconds or config.lease_seconds
        allocator = Allocator(
            node, lease_seconds=lease_seconds, offer_deadline_seconds=config.offer_deadline_seconds
        )
        events_send, events = trio.open_memory_channel[PoolEvent](1000)
        status_send, statuses = trio.open_memory_channel[m.TaskStatus](1000)

        async def on_status(peer: str, status: m.TaskStatus) -> m.Ack:
            try:
                status_send.send_nowait(status)
            except trio.WouldBlock:
                logger.warning("task status dropped: %s", status)
            return m.Ack()

        node.rpc.register(m.TaskStatus, on_status, roles={"worker"})
        trainers = Pool(pool_spec("trainers", job.trainers, "train"), allocator, events_send)
        ps = Pool(pool_spec("parameter_server", job.parameter_server, "aggregate"), allocator, events_send)
        parts = SchedulerParts(node, allocator, trainers, ps, events, statuses)

        async def drive() -> None:
            async with trio.open_nursery() as pools:
                if job.parameter_server.target > 0 and not allocate_only:
                    # The parameter server first: the job cannot start without it, and it
                    # should get the best offer rather than what trainers leave over.
                    await pools.start(ps.run)
                    await ps.wait_size(1)
                await pools.start(trainers.run)
                if allocate_only:
                    await trio.sleep_forever()
                from hypha.scheduler.job import run_job

                await run_job(parts, job)
                pools.cancel_scope.cancel()
            finished.set()

        nursery.start_soon(drive)
        holder["parts"] = parts
        return {"job": job.name}

    holder: dict[str, SchedulerParts] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_node(
                settings_from_config("scheduler", config),
                body,
                ready_file=ready_file,
                task_status=task_status,
            )
        )
        task_status.started(holder["parts"])
        await finished.wait()
        nursery.cancel_scope.cancel()
