"""The worker side of one task's job bridge: what an executor may fetch, send and report.

Owns translating bridge requests into network work for one task: progress and metrics go to
the scheduler (the lease holder) as ``ProgressRequest``s and its instruction comes back;
fetches and sends are delegated to the worker's ``TaskServices`` (data plane and bulk
transfers); files pushed to the task are queued in its ``Inbox`` until the executor reads
them. Each task has its own backend, so tasks never see each other's files.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from hypha.bridge.inbox import Subscription
from hypha.net.host import Node
from hypha.protocol import bridge as b
from hypha.protocol import ids
from hypha.protocol import messages as m
from hypha.worker.task import Task

logger = logging.getLogger(__name__)


class TaskServices(Protocol):
    """Worker-wide services a task's bridge uses (``worker/transfers.py`` implements them)."""

    async def fetch(self, task: Task, ref: b.Reference, work_dir: Path) -> list[b.FetchedFile]: ...

    async def send(self, task: Task, request: b.SendRequest, path: Path) -> list[str]: ...


def to_event(body: b.ProgressBody) -> m.ProgressEvent:
    if isinstance(body, b.ProgressReport):
        return m.BatchesDone(
            round=body.round,
            batches=body.batches,
            samples=body.samples,
            seconds=body.seconds,
            loss=body.loss,
            slices_done=list(body.slices_done),
        )
    if isinstance(body, b.UpdateSentReport):
        return m.UpdateSent(round=body.round, samples=body.samples)
    return m.UpdateApplied(round=body.round)


def to_instruction(reply: m.Msg) -> b.InstructionBody:
    if isinstance(reply, m.SyncAfter):
        return b.InstructionBody(action="sync", batches=reply.batches, round=reply.round)
    if isinstance(reply, m.Done):
        return b.InstructionBody(action="done")
    return b.InstructionBody(action="continue")


class TaskBackend:
    """Implements ``hypha.bridge.api.BridgeBackend`` for one task."""

    def __init__(self, node: Node, task: Task, services: TaskServices) -> None:
        self._node = node
        self._task = task
        self._services = services

    @property
    def task_id(self) -> str:
        return self._task.task_id

    def job_document(self) -> bytes:
        return self._task.config

    async def fetch(self, ref: b.Reference, work_dir: Path) -> list[b.FetchedFile]:
        return await self._services.fetch(self._task, ref, work_dir)

    async def send(self, request: b.SendRequest, path: Path) -> list[str]:
        return await self._services.send(self._task, request, path)

    def subscribe_received(self) -> AbstractContextManager[Subscription]:
        return self._task.inbox.subscribe()

    async def _report(self, event: m.ProgressEvent) -> m.Msg:
        request = m.ProgressRequest(job_id=self._task.job_id, task_id=self._task.task_id, event=event)
        return await self._node.request(self._task.scheduler, request, m.Msg, protocol=ids.PROGRESS_PROTOCOL)

    async def progress(self, body: b.ProgressBody) -> b.InstructionBody:
        return to_instruction(await self._report(to_event(body)))

    async def metrics(self, body: b.MetricsBody) -> None:
        await self._report(m.Metrics(round=body.round, values=dict(body.values)))
