"""The job manager: runs the tasks dispatched under this worker's leases.

Owns ``DispatchTask`` from the lease holder (anyone else is refused), a private work
directory (0700) per task, handing each task to the runner of its executor's runtime
(``executors/process.py`` for user programs, ``executors/parameter_servers.py`` for the
parameter server; the mapping is built in ``worker/node.py``), reporting ``TaskStatus`` to the
scheduler (retried while the lease lasts, so no state change is lost to one failed send),
and stopping tasks when their lease ends: the scheduler stops a task by releasing its
lease, there is no separate cancel message. What a task may fetch and send is
``worker/backend.py``'s job.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from hypha import errors
from hypha.config.schema import ExecutorSection, WorkerConfig
from hypha.errors import HyphaError, NetworkError, RemoteError
from hypha.net.host import Node
from hypha.protocol import codes
from hypha.protocol import messages as m
from hypha.worker.leases import WorkerLeases
from hypha.worker.task import Runner, Task, choose_socket_path, find_task

logger = logging.getLogger(__name__)

MAX_STATUS_ATTEMPTS = 5
"""Sends of one ``TaskStatus`` before giving up (fewer once the task's lease is gone)."""

STATUS_RETRY_SECONDS = 0.5
"""Wait before the second send of a ``TaskStatus``; doubled before each further one."""

MAX_DETAIL_CHARS = 8000
"""The tail of a failure's detail that a ``TaskStatus`` carries."""


@dataclass(frozen=True, slots=True)
class JobStatistics:
    """A snapshot of a ``JobManager``'s counters (for telemetry)."""

    num_running: int
    num_started: int
    num_finished: int
    num_failed: int
    num_cancelled: int
    num_statuses_lost: int
    """``TaskStatus`` messages the scheduler never acknowledged despite the retries."""


class JobManager:
    """Starts, watches and stops executors.

    Args:
        node: the worker's node (RPC handlers are registered on it).
        leases: the lease ledger; a task runs only under a lease its dispatcher holds.
        config: the worker's section.
        runners: the runner of each executor runtime (``"process"``, ``"aggregate"``).
        tasks: the table of running tasks, shared with the data plane (which only reads it).
    """

    def __init__(
        self,
        node: Node,
        leases: WorkerLeases,
        config: WorkerConfig,
        runners: Mapping[str, Runner],
        tasks: dict[str, Task] | None = None,
    ) -> None:
        self._node = node
        self._leases = leases
        self._config = config
        self._runners = dict(runners)
        self.tasks: dict[str, Task] = tasks if tasks is not None else {}
        self._nursery: trio.Nursery | None = None
        self._num_started = self._num_finished = self._num_failed = self._num_cancelled = 0
        self._num_statuses_lost = 0
        node.rpc.register(m.DispatchTask, self._dispatch, roles={"scheduler"})
        leases.on_lease_end(self._lease_ended)

    def statistics(self) -> JobStatistics:
        """Return a snapshot of the counters."""
        return JobStatistics(
            num_running=len(self.tasks),
            num_started=self._num_started,
            num_finished=self._num_finished,
            num_failed=self._num_failed,
            num_cancelled=self._num_cancelled,
            num_statuses_lost=self._num_statuses_lost,
        )

    def _executor(self, wanted: m.ExecutorDescriptor) -> ExecutorSection | None:
        for executor in self._config.executors:
            if executor.executor_class == wanted.executor_class and executor.name == wanted.name:
                return executor
        return None

    async def _dispatch(self, peer: str, request: m.DispatchTask) -> m.Msg:
        self._leases.held_by(request.lease_id, peer)
        if request.task_id in self.tasks:
            return m.Refused(reason=f"task {request.task_id} already exists")
        executor = self._executor(request.executor)
        if executor is None or executor.runtime not in self._runners:
            return m.Refused(
                reason=f"executor {request.executor.executor_class}/{request.executor.name} not configured"
            )
        if self._nursery is None:
            return m.Refused(reason="worker is shutting down")
        work_dir = self._config.work_dir / f"task-{request.task_id[:16]}"
        try:
            socket_path = await trio.to_thread.run_sync(
                _make_work_dir, work_dir, request.config, request.task_id
            )
        except OSError as exc:
            return m.Refused(reason=f"cannot create work directory {work_dir}: {exc}")
        if self._nursery is None:  # the worker began stopping while the folder was made
            await trio.to_thread.run_sync(_remove_task_files, work_dir, socket_path)
            return m.Refused(reason="worker is shutting down")
        task = Task(
            task_id=request.task_id,
            job_id=request.job_id,
            lease_id=request.lease_id,
            scheduler=peer,
            executor=executor,
            work_dir=work_dir,
            config=request.config,
            socket_path=socket_path,
        )
        self.tasks[task.task_id] = task
        self._num_started += 1
        self._nursery.start_soon(self._run_task, task)
        return m.Dispatched(task_id=task.task_id)

    async def _lease_ended(self, lease_id: str, reason: str) -> None:
        for task in list(self.tasks.values()):
            if task.lease_id == lease_id:
                logger.warning("stopping task %s: %s", task.task_id, reason)
                task.state = "cancelled"
                task.scope.cancel()

    def task_for_job(self, job_id: str, executor_class: str) -> Task | None:
        """The running task of ``job_id`` with that executor class, if this worker has one."""
        return find_task(self.tasks.values(), job_id, executor_class)

    async def _run_task(self, task: Task) -> None:
        exit_code: int | None = None
        detail = ""
        code = ""
        try:
            with task.scope:
                await self._report(
                    task, m.TaskStatus(task_id=task.task_id, job_id=task.job_id, state="running")
                )
                result = await self._runners[task.executor.runtime](task)
                exit_code, detail = result.exit_code, result.detail
                task.state = "finished" if exit_code == 0 else "failed"
        except Exception as exc:  # the per-task error boundary: a task never takes the worker down
            task.state = "failed"
            # A runner's own nursery wraps its HyphaError in a group: that is still a failure
            # on purpose (ExecutorStartError, a JobError), not a crash.
            failure = errors.hypha_leaf(exc)
            if failure is not None:
                detail = str(failure)
                code = errors.wire_code(failure)
                logger.warning("task %s failed: %s", task.task_id, failure)
            else:
                leaf = errors.sole_leaf(exc)
                detail = f"{type(leaf).__name__}: {leaf}"
                code = errors.wire_code(leaf)
                logger.error("task %s crashed", task.task_id, exc_info=True)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_task_files, task.work_dir, task.socket_path)
                self.tasks.pop(task.task_id, None)
                task.done.set()
                self._count(task.state)
                status = m.TaskStatus(
                    task_id=task.task_id,
                    job_id=task.job_id,
                    state=task.state,
                    exit_code=exit_code,
                    detail=detail[-MAX_DETAIL_CHARS:],
                    code=code,
                )
                await self._report(task, status)

    def _count(self, state: m.TaskState) -> None:
        if state == "finished":
            self._num_finished += 1
        elif state == "failed":
            self._num_failed += 1
        else:
            self._num_cancelled += 1

    async def _report(self, task: Task, status: m.TaskStatus) -> None:
        """Send ``status`` to the scheduler, retrying with backoff while the lease lasts.

        A state change must not be lost to one failed send: the scheduler tells an executor
        that could not start from one that failed by whether it saw "running". A send is
        retried when it may succeed later (no answer, peer unreachable, or the scheduler
        answered ``not_ready``), not when the scheduler refused it. Retries stop early when
        the task's lease is gone (its holder is not listening) or the worker is stopping (so
        shutdown is not held up); giving up is logged.
        """
        delay = STATUS_RETRY_SECONDS
        for attempt in range(1, MAX_STATUS_ATTEMPTS + 1):
            try:
                await self._node.request(task.scheduler, status, m.Ack)
                return
            except HyphaError as exc:  # timeouts included (RequestTimeoutError)
                failure = exc
            live = self._nursery is not None and self._leases.ledger.get(task.lease_id) is not None
            if not (live and _may_succeed_later(failure)) or attempt == MAX_STATUS_ATTEMPTS:
                break
            logger.info(
                "could not report %s of task %s (will retry): %s", status.state, task.task_id, failure
            )
            await trio.sleep(delay)
            delay *= 2
        self._num_statuses_lost += 1
        logger.warning(
            "gave up reporting %s of task %s after %d attempts: %s",
            status.state,
            task.task_id,
            attempt,
            failure,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every task's lifetime until cancelled (then stop them all)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for task in self.tasks.values():
                    task.state = "cancelled"
                    task.scope.cancel()


def _may_succeed_later(exc: HyphaError) -> bool:
    """Whether sending again could help: the request got no answer, or "not ready" as one."""
    if isinstance(exc, RemoteError):
        return exc.code == codes.NOT_READY
    return isinstance(exc, NetworkError)


def _make_work_dir(work_dir: Path, config: bytes, task_id: str) -> Path:
    """Create the task's private folder with its job document; return its socket path."""
    work_dir.mkdir(parents=True, mode=0o700)
    os.chmod(work_dir, 0o700)
    (work_dir / "job.json").write_bytes(config)
    return choose_socket_path(work_dir, task_id)


def _remove_task_files(work_dir: Path, socket_path: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
    if socket_path.parent != work_dir:
        socket_path.unlink(missing_ok=True)
