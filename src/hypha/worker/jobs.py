"""The job manager: runs the tasks dispatched under this worker's leases.

Owns ``DispatchTask`` and ``CancelTask`` from the lease holder (anyone else is refused), a
private work directory (0700) and bridge socket (0600) per task, starting the configured
executor (``executors/process.py`` for user programs, ``executors/aggregate.py`` for the
parameter server), reporting ``TaskStatus`` to the scheduler, and stopping tasks when their
lease ends. What a task may fetch and send is ``worker/backend.py``'s job.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from hypha.bridge.inbox import Inbox
from hypha.config.schema import ExecutorSection, WorkerConfig
from hypha.errors import HyphaError
from hypha.net.host import Node
from hypha.protocol import messages as m
from hypha.worker.executors.process import run_executor_process
from hypha.worker.leases import WorkerLeases

if TYPE_CHECKING:
    from hypha.worker.backend import TaskServices

logger = logging.getLogger(__name__)
MAX_SOCKET_PATH = 100


@dataclass
class Task:
    """One running task."""

    task_id: str
    job_id: str
    lease_id: str
    scheduler: str
    executor: ExecutorSection
    work_dir: Path
    config: bytes
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    state: m.TaskState = "running"
    done: trio.Event = field(default_factory=trio.Event)
    inbox: Inbox = field(default_factory=Inbox)

    @property
    def socket_path(self) -> Path:
        path = self.work_dir / "bridge.sock"
        if len(os.fsencode(path)) < MAX_SOCKET_PATH:
            return path
        # AF_UNIX paths are short: fall back to a private runtime directory for deep work dirs.
        runtime = Path(tempfile.gettempdir()) / f"hypha-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.chmod(runtime, 0o700)
        return runtime / f"{self.task_id[:16]}.sock"

    @property
    def job_path(self) -> Path:
        return self.work_dir / "job.json"


class JobManager:
    """Starts, watches and stops executors."""

    def __init__(self, node: Node, leases: WorkerLeases, config: WorkerConfig) -> None:
        self._node = node
        self._leases = leases
        self._config = config
        self.tasks: dict[str, Task] = {}
        self._nursery: trio.Nursery | None = None
        self.services: TaskServices | None = None
        node.rpc.register(m.DispatchTask, self._dispatch, roles={"scheduler"})
        node.rpc.register(m.CancelTask, self._cancel, roles={"scheduler"})
        leases.on_lease_end(self._lease_ended)

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
        if executor is None:
            return m.Refused(
                reason=f"executor {request.executor.executor_class}/{request.executor.name} not configured"
            )
        if self._nursery is None:
            return m.Refused(reason="worker is shutting down")
        work_dir = self._config.work_dir / f"task-{request.task_id[:16]}"
        try:
            work_dir.mkdir(parents=True, mode=0o700)
            os.chmod(work_dir, 0o700)
            (work_dir / "job.json").write_bytes(request.config)
        except OSError as exc:
            return m.Refused(reason=f"cannot create work directory {work_dir}: {exc}")
        task = Task(
            task_id=request.task_id,
            job_id=request.job_id,
            lease_id=request.lease_id,
            scheduler=peer,
            executor=executor,
            work_dir=work_dir,
            config=request.config,
        )
        self.tasks[task.task_id] = task
        self._nursery.start_soon(self._run_task, task)
        return m.Dispatched(task_id=task.task_id)

    async def _cancel(self, peer: str, request: m.CancelTask) -> m.Ack:
        self._leases.held_by(request.lease_id, peer)
        task = self.tasks.get(request.task_id)
        if task is not None and task.lease_id == request.lease_id:
            task.state = "cancelled"
            task.scope.cancel()
        return m.Ack()

    async def _lease_ended(self, lease_id: str, reason: str) -> None:
        for task in list(self.tasks.values()):
            if task.lease_id == lease_id:
                logger.warning("stopping task %s: %s", task.task_id, reason)
                task.state = "cancelled"
                task.scope.cancel()

    def task_for_job(self, job_id: str, executor_class: str) -> Task | None:
        """The running task of ``job_id`` with that executor class, if this worker has one."""
        for task in self.tasks.values():
            if task.job_id == job_id and task.executor.executor_class == executor_class:
                return task
        return None

    async def wait_task(self, task_id: str) -> Task:
        task = self.tasks[task_id]
        await task.done.wait()
        return task

    async def _run_task(self, task: Task) -> None:
        exit_code: int | None = None
        detail = ""
        try:
            with task.scope:
                await self._report(task, None, "")
                exit_code, detail = await self._execute(task)
                task.state = "finished" if exit_code == 0 else "failed"
        except HyphaError as exc:
            task.state = "failed"
            detail = str(exc)
            logger.warning("task %s failed: %s", task.task_id, exc)
        except Exception as exc:  # the per-task error boundary: a task never takes the worker down
            task.state = "failed"
            leaf = _leaf(exc)
            detail = f"{type(leaf).__name__}: {leaf}"
            logger.error("task %s crashed", task.task_id, exc_info=True)
        finally:
            with trio.CancelScope(shield=True):
                shutil.rmtree(task.work_dir, ignore_errors=True)
                if task.socket_path.parent != task.work_dir:
                    task.socket_path.unlink(missing_ok=True)
                self.tasks.pop(task.task_id, None)
                task.done.set()
                await self._report(task, exit_code, detail)

    async def _execute(self, task: Task) -> tuple[int, str]:
        if task.executor.runtime == "aggregate":
            from hypha.worker.executors.aggregate import run_aggregate
            from hypha.worker.transfers import Transfers

            services = self.services if isinstance(self.services, Transfers) else None
            await run_aggregate(self._node, task, services)
            return 0, ""
        from hypha.bridge.server import serve_bridge
        from hypha.worker.backend import TaskBackend

        backend = TaskBackend(self._node, task, self.services)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_bridge, backend, task.socket_path, task.work_dir)
            result = await run_executor_process(
                task.executor.cmd,
                task.executor.args,
                socket_path=task.socket_path,
                work_dir=task.work_dir,
                job_json=task.job_path,
                task_id=task.task_id,
                kill_grace_seconds=self._config.kill_grace_seconds,
                extra_env={"HYPHA_THROTTLE": str(self._config.throttle)}
                if self._config.throttle != 1.0
                else None,
            )
            nursery.cancel_scope.cancel()
        if result.exit_code != 0:
            return result.exit_code, result.stderr_tail
        return 0, ""

    async def _report(self, task: Task, exit_code: int | None, detail: str) -> None:
        status = m.TaskStatus(
            task_id=task.task_id,
            job_id=task.job_id,
            state=task.state,
            exit_code=exit_code,
            detail=detail[-8000:],
        )
        with trio.move_on_after(self._node.settings.rpc_timeout_seconds):
            try:
                await self._node.request(task.scheduler, status, m.Ack)
            except HyphaError as exc:
                logger.info("could not report %s of task %s: %s", task.state, task.task_id, exc)

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


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
