"""The worker role: offers resources, holds leases, runs the tasks dispatched under them.

Owns wiring the worker's parts to one node: the lease ledger and its protocol
(``leases.py``), the arbiter that answers advertisements (``arbiter.py``), the data plane
(``transfers.py``), the parameter servers' routing (``executors/parameter_servers.py``) and the job
manager with the runner of each executor runtime (``jobs.py``). Every part gets what it
needs at construction; none is wired after. It holds no scheduling policy of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import trio

from hypha.config.schema import WorkerConfig
from hypha.net.bulk import BulkService
from hypha.net.host import Node
from hypha.net.runner import run_role, settings_from_config
from hypha.net.spares import SpareFiles
from hypha.resources import Resources
from hypha.worker.arbiter import Arbiter
from hypha.worker.executors.parameter_servers import AggregateRunner, ParameterServers
from hypha.worker.executors.process import ProcessRunner
from hypha.worker.jobs import JobManager
from hypha.worker.leases import WorkerLeases
from hypha.worker.task import Runner, Task
from hypha.worker.transfers import Transfers

logger = logging.getLogger(__name__)


class Worker:
    """A running worker's services (for tests and the local runner to inspect)."""

    def __init__(self, node: Node, config: WorkerConfig) -> None:
        capacity = Resources(
            gpu=config.resources.gpu,
            cpu=config.resources.cpu,
            memory=config.resources.memory,
            storage=config.resources.storage,
        )
        self.node = node
        self.config = config
        self.leases = WorkerLeases(node, capacity)
        self.arbiter = Arbiter(
            node,
            self.leases,
            config.offer,
            config.executors,
            offer_window_seconds=config.offer_window_seconds,
            batch_window_seconds=config.batch_window_seconds,
        )
        spares = SpareFiles(config.work_dir / "spare", config.spare_bytes) if config.spare_bytes else None
        self.bulk = BulkService(node, spares=spares)
        tasks: dict[str, Task] = {}
        self.parameter_servers = ParameterServers(node)
        self.transfers = Transfers(
            node, self.bulk, config, update_sinks=self.parameter_servers.update_sink, tasks=tasks
        )
        runners: dict[str, Runner] = {
            "process": ProcessRunner(node, self.transfers, config),
            "aggregate": AggregateRunner(node, self.parameter_servers, self.transfers),
        }
        self.jobs = JobManager(node, self.leases, config, runners, tasks)

    async def start(self, nursery: trio.Nursery) -> Mapping[str, object]:
        await nursery.start(self.bulk.run)
        await nursery.start(self.transfers.run)
        await nursery.start(self.leases.run)
        await nursery.start(self.jobs.run)
        await nursery.start(self.arbiter.run)
        return {"work_dir": str(self.config.work_dir)}


async def run_worker(
    config: WorkerConfig,
    *,
    ready_file: Path | None = None,
    task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a worker until cancelled."""
    settings = settings_from_config("worker", config)
    await run_role(
        settings, lambda node: Worker(node, config), ready_file=ready_file, task_status=task_status
    )
