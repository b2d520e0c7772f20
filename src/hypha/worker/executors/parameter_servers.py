"""The parameter servers running on a worker: routing their RPCs and updates, and running them.

Owns ``ParameterServers`` (the registry by job, which registers the handlers of
``WeightsRequest``, ``RoundPlan`` and ``JobFinished`` and is the data plane's update-sink
lookup) and ``AggregateRunner``, the job manager's runner of ``runtime = "aggregate"``. The
round state machine itself is ``aggregate.py``'s ``ParameterServer``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from hypha.errors import JobError
from hypha.net.host import Node
from hypha.protocol import codec
from hypha.protocol import messages as m
from hypha.protocol.tasks import AggregateTask
from hypha.worker.authorize import UpdateSink
from hypha.worker.executors.aggregate import ParameterServer
from hypha.worker.task import Exited, Task
from hypha.worker.transfers import Transfers


@dataclass(frozen=True, slots=True)
class ParameterServersStatistics:
    """A snapshot of a ``ParameterServers``' counters (for telemetry)."""

    num_running: int
    num_unrouted: int
    """Requests for a job whose parameter server does not run on this worker."""


class ParameterServers:
    """The parameter servers running on this worker, by job, and the routing to them.

    Registers the handlers of the parameter server's requests (``WeightsRequest``,
    ``RoundPlan``, ``JobFinished``) on the node and is the data plane's update-sink lookup
    (``update_sink``): a job's pushed updates go to its server while it runs.
    """

    def __init__(self, node: Node) -> None:
        self._servers: dict[str, ParameterServer] = {}
        self._num_unrouted = 0
        node.rpc.register(m.WeightsRequest, self._on_weights_request, roles={"worker", "scheduler"})
        node.rpc.register(m.RoundPlan, self._on_round_plan, roles={"scheduler"})
        node.rpc.register(m.JobFinished, self._on_job_finished, roles={"scheduler"})

    def statistics(self) -> ParameterServersStatistics:
        """Return a snapshot of the counters."""
        return ParameterServersStatistics(num_running=len(self._servers), num_unrouted=self._num_unrouted)

    def get(self, job_id: str) -> ParameterServer | None:
        """The running parameter server of ``job_id``, if this worker has one."""
        return self._servers.get(job_id)

    def update_sink(self, job_id: str) -> UpdateSink | None:
        """Where a pushed update of ``job_id`` goes (``authorize.UpdateSinks``)."""
        return self._servers.get(job_id)

    @contextlib.contextmanager
    def registered(self, job_id: str, server: ParameterServer) -> Iterator[None]:
        """Route ``job_id``'s requests and updates to ``server`` while the block runs."""
        self._servers[job_id] = server
        try:
            yield
        finally:
            self._servers.pop(job_id, None)

    def _server(self, job_id: str) -> ParameterServer:
        server = self._servers.get(job_id)
        if server is None:
            self._num_unrouted += 1
            raise JobError(f"no parameter server of job {job_id} on this worker")
        return server

    async def _on_weights_request(self, peer: str, request: m.WeightsRequest) -> m.TensorOffer:
        return await self._server(request.job_id).on_weights_request(peer, request)

    async def _on_round_plan(self, peer: str, plan: m.RoundPlan) -> m.Ack:
        await self._server(plan.job_id).on_plan(peer, plan)
        return m.Ack()

    async def _on_job_finished(self, peer: str, request: m.JobFinished) -> m.Ack:
        await self._server(request.job_id).on_finished(peer)
        return m.Ack()


class AggregateRunner:
    """Runs a task's parameter server (the ``Runner`` of ``runtime = "aggregate"``).

    Args:
        node: the worker's node (the server reports to the scheduler through it).
        servers: the routing its requests and updates arrive through while it runs.
        transfers: the worker's data plane (weights out, the held-out slice in).
    """

    def __init__(self, node: Node, servers: ParameterServers, transfers: Transfers) -> None:
        self._node = node
        self._servers = servers
        self._transfers = transfers

    async def __call__(self, task: Task) -> Exited:
        """Run the parameter server of ``task`` until the scheduler says the job is finished."""
        doc = codec.decode_json(task.config, AggregateTask)
        server = ParameterServer(self._node, task, doc, self._transfers)
        with self._servers.registered(doc.job_id, server):
            await server.run()
        return Exited(0)
