"""Starting a local run's nodes: one process per role, or every role in this trio run.

Owns the start order (the gateway first, then the data node and workers given its address,
the scheduler last) and the two ways to run: child processes through ``spawn_node``, or the
roles' public ``run_*`` functions in this process (trainers still run as children). Roles
are started through their public entry points, never through their internals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from hypha.config.load import load_config
from hypha.config.schema import DataConfig, GatewayConfig, NetworkSection, SchedulerConfig, WorkerConfig
from hypha.local.children import ChildNode, spawn_node
from hypha.local.plan import LocalPlan, logs_dir

SCHEDULER_STOP_GRACE_SECONDS = 15.0
"""How long the scheduler may take to stop before SIGKILL: longer than the others' 5 s.

Its shutdown releases every lease (each a request bounded by ``rpc_timeout_seconds``, 10 s
by default) and records the job's state, and it is stopped first, while its workers still
answer; killed earlier, it leaves no record of how far the job got.
"""


def _with_gateway(path: Path, gateway: str) -> list[str]:
    return ["--config", str(path), "--gateway", gateway]


@asynccontextmanager
async def start_processes(
    plan: LocalPlan, configs: dict[str, Path], *, started: list[ChildNode] | None = None
) -> AsyncIterator[trio.Process]:
    """One process per role, each logging to ``logs_dir(plan)``; yields the scheduler's process.

    Args:
        plan: The run.
        configs: Node name -> config file, from ``write_configs``.
        started: If given, each node is appended once it is up, in start order (so a caller
            that is cancelled while they start knows which are running).

    Resource handling:
        Leaving the context, also by cancellation, stops every process one at a time (SIGTERM,
        then SIGKILL after the grace period, shielded): the scheduler first, so it can record
        its state while its workers still answer, then the workers, the data node and the
        gateway last.
    """
    logs = logs_dir(plan)
    await trio.to_thread.run_sync(lambda: logs.mkdir(parents=True, exist_ok=True))
    nodes = [] if started is None else started
    async with AsyncExitStack() as stack:

        async def start(role_args: list[str], name: str, grace_seconds: float = 5.0) -> ChildNode:
            node = await stack.enter_async_context(
                spawn_node(role_args, logs, name, stop_grace_seconds=grace_seconds)
            )
            nodes.append(node)
            return node

        gw = await start(["gateway", "--config", str(configs["gateway"])], "gateway")
        await start(["data", *_with_gateway(configs["data"], gw.address)], "data")
        for name in sorted(k for k in configs if k.startswith("worker")):
            await start(["worker", *_with_gateway(configs[name], gw.address)], name)
        scheduler = await start(
            ["scheduler", "--job", str(plan.job_path), *_with_gateway(configs["scheduler"], gw.address)],
            "scheduler",
            SCHEDULER_STOP_GRACE_SECONDS,
        )
        yield scheduler.process


async def run_single_process(plan: LocalPlan, configs: dict[str, Path]) -> None:
    """Every role in this trio run (trainers are still child processes) until the job ends.

    The roles are imported here, not at the top: ``hypha up`` in its default mode (one
    process per role) never needs them in this process.
    """
    from hypha.datanode.node import run_data_node
    from hypha.gateway import run_gateway
    from hypha.scheduler.node import run_scheduler
    from hypha.worker import run_worker

    async with trio.open_nursery() as nursery:
        gw_config = await _load("gateway", configs["gateway"], None)
        assert isinstance(gw_config, GatewayConfig)
        gw = await nursery.start(lambda task_status: run_gateway(gw_config, task_status=task_status))
        address = gw.listen_addrs()[0]
        data_config = await _load("data", configs["data"], address)
        assert isinstance(data_config, DataConfig)
        await nursery.start(lambda task_status: run_data_node(data_config, task_status=task_status))
        for name in sorted(k for k in configs if k.startswith("worker")):
            config = await _load("worker", configs[name], address)
            assert isinstance(config, WorkerConfig)
            await nursery.start(lambda task_status, c=config: run_worker(c, task_status=task_status))
        sched = await _load("scheduler", configs["scheduler"], address)
        assert isinstance(sched, SchedulerConfig)
        await run_scheduler(sched, plan.job)
        nursery.cancel_scope.cancel()


async def _load(role: str, path: Path, gateway: str | None) -> NetworkSection:
    """``load_config`` in a thread (it reads the file), pointed at ``gateway`` if given."""
    overrides = None if gateway is None else {"gateway_addresses": [gateway]}
    return await trio.to_thread.run_sync(lambda: load_config(role, path, overrides=overrides))
