"""Pushes arriving at the worker: authorized, pulled, and put where their job's task reads them.

Owns the ``TensorPushRequest`` handler: updates go to the sink the update lookup names for
their job (its parameter server, which authorizes them against its round plan); weights and
files go to the job's trainer task, into its folder and inbox only. Every push is checked by
``authorize.py`` before a byte is pulled; a refusal is answered ``TransferDone(ok=False)``
with the reason, counted and logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hypha.errors import ForbiddenError, JobError
from hypha.net.bulk import BulkService
from hypha.net.host import Node
from hypha.protocol import bridge as b
from hypha.protocol import messages as m
from hypha.worker.authorize import Membership, UpdateSinks, check_offer_names, check_weights_push
from hypha.worker.task import TaskTable, find_task, train_doc

logger = logging.getLogger(__name__)


class InboundPushes:
    """Serves ``TensorPushRequest`` for the worker's tasks and parameter servers.

    Args:
        node: the worker's node (the handler is registered on it; it asks schedulers about
            job membership through it).
        bulk: the worker's bulk channel (pulls come through it).
        update_sinks: where a pushed update of a job goes.
        tasks: the worker's running tasks (read only).
    """

    def __init__(self, node: Node, bulk: BulkService, *, update_sinks: UpdateSinks, tasks: TaskTable) -> None:
        self._node = node
        self._bulk = bulk
        self._update_sinks = update_sinks
        self._tasks = tasks
        self._membership = Membership(self._ask_member)
        self.num_received = 0
        self.num_refused = 0
        node.rpc.register(m.TensorPushRequest, self._on_push, roles={"worker", "scheduler"})

    async def _on_push(self, peer: str, request: m.TensorPushRequest) -> m.TransferDone:
        offer = request.offer
        try:
            detail = await self._receive(peer, offer)
        except ForbiddenError as exc:
            self.num_refused += 1
            logger.warning("refused %s push %s from %s: %s", offer.purpose, offer.transfer_id[:40], peer, exc)
            return m.TransferDone(transfer_id=offer.transfer_id[:100], ok=False, detail=str(exc))
        self.num_received += 1
        return m.TransferDone(transfer_id=offer.transfer_id, ok=True, detail=detail)

    async def _receive(self, peer: str, offer: m.TensorOffer) -> str:
        """Authorize ``offer`` (``authorize.py``), pull it where it goes; a note for the sender."""
        check_offer_names(offer)
        if offer.purpose == "update":
            sink = self._update_sinks(offer.job_id)
            if sink is None:
                raise ForbiddenError("no aggregator for this job")
            return await sink.receive_update(offer, peer, lambda dest: self._bulk.pull(offer, peer, dest))
        if offer.purpose not in ("weights", "file"):
            raise ForbiddenError(f"{offer.purpose} pushes are not taken by a worker")
        task = find_task(self._tasks.values(), offer.job_id, "train")
        if task is None:
            raise ForbiddenError("no task of this job here")
        try:
            parameter_server = train_doc(task).parameter_server
        except JobError:  # a task of a program that is not our trainer: only its scheduler is known
            parameter_server = ""
        if offer.purpose == "weights":
            check_weights_push(peer, parameter_server)
        else:
            await self._membership.check_file_push(
                peer, scheduler=task.scheduler, parameter_server=parameter_server, job_id=task.job_id
            )
        name = offer.name or "file.bin"
        rel = Path("incoming") / f"{offer.purpose}-{offer.round:05d}-{offer.transfer_id[:8]}-{name}"
        await self._bulk.pull(offer, peer, task.work_dir / rel)
        task.inbox.deliver(
            b.ReceivedFile(
                path=str(rel),
                size=offer.size,
                sha256=offer.sha256,
                from_peer=peer,
                purpose=offer.purpose,
                round=offer.round,
                samples=offer.samples,
            )
        )
        return ""

    async def _ask_member(self, scheduler: str, job_id: str, peer: str) -> bool:
        reply = await self._node.request(
            scheduler, m.JobMemberRequest(job_id=job_id, peer=peer), m.JobMemberResponse
        )
        return reply.member
