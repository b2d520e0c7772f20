"""One task a worker runs: its identity, folders, lifetime and inbox.

Owns the ``Task`` record every part of the worker shares (the job manager creates and ends
tasks, the data plane puts files in their folders and inboxes, the executors run them), the
rule for a task's bridge socket path, and the lookup of a job's task on this worker. It
does no I/O of its own except ``choose_socket_path``, which callers run in a thread. It
does not start, watch or stop anything: that is ``worker/jobs.py``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from hypha.bridge.inbox import Inbox
from hypha.config.schema import ExecutorSection
from hypha.errors import JobError
from hypha.protocol import codec
from hypha.protocol import messages as m
from hypha.protocol.tasks import TrainTask

MAX_SOCKET_PATH = 100
"""Bytes of a bridge socket path in the work dir; longer ones go to a runtime directory."""


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
    socket_path: Path
    """The task's bridge socket (``choose_socket_path``)."""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    state: m.TaskState = "running"
    done: trio.Event = field(default_factory=trio.Event)
    inbox: Inbox = field(default_factory=Inbox)

    @property
    def job_path(self) -> Path:
        return self.work_dir / "job.json"


@dataclass(frozen=True, slots=True)
class Exited:
    """How a runner's task ended: the executor's exit code and, when it failed, why."""

    exit_code: int
    detail: str = ""


class Runner(Protocol):
    """Runs one task to its end (one per executor runtime, chosen by ``JobManager``).

    Raises ``HyphaError`` (its ``wire_code`` goes into the failed ``TaskStatus``) when the
    task cannot run; an executor that ran and failed is an ``Exited`` with a non-zero code.
    Cancellation: the task was cancelled; stop the executor before returning.
    """

    async def __call__(self, task: Task) -> Exited: ...


def choose_socket_path(work_dir: Path, task_id: str) -> Path:
    """Where a task's bridge socket goes: in its work dir unless that path is too long.

    Blocking (it may create the private runtime directory): call it in a thread.
    """
    path = work_dir / "bridge.sock"
    if len(os.fsencode(path)) < MAX_SOCKET_PATH:
        return path
    # AF_UNIX paths are short: fall back to a private runtime directory for deep work dirs.
    runtime = Path(tempfile.gettempdir()) / f"hypha-{os.getuid()}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.chmod(runtime, 0o700)
    return runtime / f"{task_id[:16]}.sock"


def train_doc(task: Task) -> TrainTask:
    """The training document ``task`` was dispatched with.

    Raises:
        JobError: The task's config is not a ``TrainTask`` (another kind of executor's task).
    """
    try:
        return codec.decode_json(task.config, TrainTask)
    except codec.ProtocolError as exc:
        raise JobError(f"task {task.task_id} has no training document: {exc}") from exc


def find_task(tasks: Iterable[Task], job_id: str, executor_class: str) -> Task | None:
    """The running task of ``job_id`` with that executor class, if there is one."""
    for task in tasks:
        if task.job_id == job_id and task.executor.executor_class == executor_class:
            return task
    return None


TaskTable = Mapping[str, Task]
"""The worker's running tasks by id (``JobManager`` writes it, the data plane reads it)."""
