"""Answering workers' task statuses: running, finished, and failed tasks and what follows.

Owns the ``TaskStatus`` handler of one job: a failed parameter server fails the job; a trainer
executor that cannot start fails it too (retrying would not help); a trainer task that failed
after starting is replaced, unless its error keeps coming back (``failures.py``: then the job
fails with it) or its worker's tasks keep failing (then that worker is never leased again).
Statuses of tasks the job no longer knows are acknowledged and ignored.
"""

from __future__ import annotations

from collections.abc import Callable

from hypha.errors import JobError
from hypha.net.iface import Registrar
from hypha.protocol import codes
from hypha.protocol import messages as m
from hypha.scheduler.failures import TaskFailures, Verdict
from hypha.scheduler.pool import Pool
from hypha.scheduler.results import JobRecorder
from hypha.scheduler.state import JobState


class TaskStatusService:
    """The task-status handler of one job.

    Args:
        state: the job's state.
        trainers: the trainer pool (failed trainers are let go or excluded through it).
        recorder: the job's outputs.
        fail: fails the job (the driver's; the first failure wins).
        finished: called when a trainer reports its task finished.
    """

    def __init__(
        self,
        state: JobState,
        trainers: Pool,
        recorder: JobRecorder,
        fail: Callable[[JobError], None],
        finished: Callable[[], None],
    ) -> None:
        self.state = state
        self.trainers = trainers
        self.recorder = recorder
        self.fail = fail
        self.finished = finished
        self.failures = TaskFailures(state.spec.trainers.max_task_failures)

    def register(self, rpc: Registrar) -> None:
        rpc.register(m.TaskStatus, self._task_status, roles={"worker"})

    async def _task_status(self, peer: str, status: m.TaskStatus) -> m.Ack:
        ps = self.state.parameter_server
        if ps is not None and status.task_id == ps.task_id and peer == ps.worker:
            if status.state == "failed" and not self.state.done:
                self.fail(JobError(f"parameter server failed: {status.detail or status.exit_code}"))
            return m.Ack()
        task = self.state.trainers.get(peer)
        if task is None or task.task_id != status.task_id:
            return m.Ack()
        if status.state == "failed":
            detail = status.detail.strip().splitlines()[-1] if status.detail.strip() else ""
            never_started = status.exit_code is None and not task.reported
            if status.code == codes.EXECUTOR_START or never_started:
                self.fail(JobError(f"trainer executor on {peer} cannot start: {detail}"))
                return m.Ack()
            why = f"task failed with exit code {status.exit_code}: {detail}"
            verdict = self.failures.record(peer, why)
            if verdict is Verdict.FAIL_JOB:
                self.fail(JobError(f"trainer tasks failed {self.failures.count(why)} times: {why}"))
            elif verdict is Verdict.EXCLUDE:
                self.trainers.exclude(peer, f"its tasks keep failing ({why})")
            else:
                self.trainers.lose(peer, why)
        elif status.state == "running":
            self.state.task_reported(task)
        elif status.state == "finished":
            await self.recorder.event(peer, "finished", self.state.round)
            self.finished()
        return m.Ack()
