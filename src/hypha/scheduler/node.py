"""The scheduler role: one job, its worker pools, and the job's lifecycle.

Owns wiring the allocator and the pools of a job to one node and running the job
(``scheduler/job.py``) until it finishes or fails. With ``--allocate-only`` it only holds
the pools (allocation smoke runs).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import trio

from hypha.config.job import JobSpec, PoolSection
from hypha.config.schema import SchedulerConfig
from hypha.net.host import Node
from hypha.net.runner import run_role, settings_from_config
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.scheduler.allocator import Allocator, Price, WorkerSpec
from hypha.scheduler.documents import check_job
from hypha.scheduler.job import JobContext
from hypha.scheduler.pool import Pool, PoolSpec
from hypha.scheduler.running import run_job
from hypha.scheduler.state import JobState
from hypha.scheduler.store import StateStore

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


class Scheduler:
    """A scheduler's services on its node: the allocator, both pools, and the job."""

    def __init__(
        self, node: Node, config: SchedulerConfig, job: JobSpec, *, allocate_only: bool, resume: bool = False
    ) -> None:
        self.node = node
        self.job = job
        self.allocate_only = allocate_only
        self.resume = resume
        self.store = StateStore(config.state_dir) if config.state_dir is not None else None
        self.allocator = Allocator(
            node,
            lease_seconds=job.lease_seconds or config.lease_seconds,
            offer_deadline_seconds=config.offer_deadline_seconds,
        )
        self.ctx = JobContext(
            node=node,
            trainers=Pool(pool_spec("trainers", job.trainers, "train"), self.allocator),
            parameter_server=Pool(
                pool_spec("parameter_server", job.parameter_server, "aggregate"), self.allocator
            ),
        )
        for pool in (self.ctx.trainers, self.ctx.parameter_server):
            node.on_peer_revoked(pool.peer_revoked)
        self.state: JobState | None = None
        """The job's state once it has ended."""
        self._finished = trio.Event()

    async def start(self, nursery: trio.Nursery) -> Mapping[str, object]:
        nursery.start_soon(self._drive)
        return {"job": self.job.name}

    async def wait_finished(self) -> None:
        await self._finished.wait()

    async def _drive(self) -> None:
        ctx = self.ctx
        async with trio.open_nursery() as pools:
            if self.job.parameter_server.target > 0 and not self.allocate_only:
                # The parameter server first: the job cannot start without it, and it
                # should get the best offer rather than what trainers leave over.
                await pools.start(ctx.parameter_server.run)
                await ctx.parameter_server.wait_size(1)
            await pools.start(ctx.trainers.run)
            if self.allocate_only:
                await trio.sleep_forever()
            self.state = await run_job(ctx, self.job, self.store, resume=self.resume)
            pools.cancel_scope.cancel()
        self._finished.set()


async def run_scheduler(
    config: SchedulerConfig,
    job: JobSpec,
    *,
    ready_file: Path | None = None,
    allocate_only: bool = False,
    model_checked: bool = False,
    resume: bool = False,
    task_status: trio.TaskStatus[Scheduler] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the job until it ends (returns) or fails (raises ``JobError``).

    ``resume``: take up this job's saved state (``config.state_dir``) if it is unfinished.
    ``model_checked``: the caller already ran ``documents.check_job`` on ``job`` (the CLI does,
    before any node starts); otherwise it runs here, before the node starts.

    Raises:
        ConfigError: before the node starts, when the job's model cannot be built.
    """
    if not model_checked:
        # Off the event loop: the check imports torch and builds the model (on meta).
        await trio.to_thread.run_sync(check_job, job, f"job {job.name}")
    settings = settings_from_config("scheduler", config)
    async with trio.open_nursery() as nursery:
        scheduler: Scheduler = await nursery.start(
            functools.partial(
                run_role,
                settings,
                lambda node: Scheduler(node, config, job, allocate_only=allocate_only, resume=resume),
                ready_file=ready_file,
            )
        )
        task_status.started(scheduler)
        await scheduler.wait_finished()
        nursery.cancel_scope.cancel()
