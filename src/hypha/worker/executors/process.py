"""The process executor: run a task's program as a child process and watch it.

Owns spawning (placeholders ``{SOCKET_PATH}``, ``{WORK_DIR}``, ``{JOB_JSON}`` in the args and
the same values in ``HYPHA_SOCKET``, ``HYPHA_WORK_DIR``, ``HYPHA_JOB``), forwarding its
stdout/stderr into the worker's log line by line with the task id, keeping the last lines of
stderr for failure reports, and stopping it: SIGTERM, then SIGKILL after a grace period.
``ProcessRunner`` is the job manager's runner of ``runtime = "process"``: it serves the task's
job bridge (``worker/backend.py`` behind ``hypha.bridge``) while the program runs. With
``run_as`` (a worker running as root) the program runs as that user, with only that user's
group, and the task's work dir and socket are handed to it first: it cannot read the
worker's key, cache or anything else of the worker's uid, and sockets are 0600 in 0700
directories, so other local users reach none. Tasks under the same ``run_as`` user can
reach each other's work dirs and sockets; isolating them needs one user per worker.
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from hypha.bridge.server import serve_bridge
from hypha.config.schema import WorkerConfig
from hypha.errors import ConfigError, ExecutorStartError
from hypha.net.host import Node
from hypha.worker.backend import TaskBackend, TaskServices
from hypha.worker.task import Exited, Task

logger = logging.getLogger(__name__)
STDERR_TAIL_LINES = 20


@dataclass(frozen=True)
class ProcessResult:
    exit_code: int
    stderr_tail: str


def expand_args(args: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Replace ``{SOCKET_PATH}``-style placeholders in each argument."""
    out = []
    for arg in args:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


async def _pump(stream: trio.abc.ReceiveStream, prefix: str, level: int, tail: deque[str] | None) -> None:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.decode(errors="replace").rstrip()
            logger.log(level, "%s %s", prefix, line)
            if tail is not None:
                tail.append(line)
    if buffer:
        line = buffer.decode(errors="replace").rstrip()
        logger.log(level, "%s %s", prefix, line)
        if tail is not None:
            tail.append(line)


async def run_executor_process(
    cmd: str,
    args: Sequence[str],
    *,
    socket_path: Path,
    work_dir: Path,
    job_json: Path,
    task_id: str,
    kill_grace_seconds: float,
    extra_env: Mapping[str, str] | None = None,
    user: tuple[int, int] | None = None,
) -> ProcessResult:
    """Run the executor to completion and return its exit code and stderr tail.

    ``user`` is the ``(uid, gid)`` to run it as (no supplementary groups, ``HOME`` the work
    dir); the work dir and socket must already be that user's (``hand_over``).

    Cancellation: the child gets SIGTERM, then SIGKILL after ``kill_grace_seconds``; this
    returns only once it is gone.

    Raises:
        ExecutorStartError: the program could not be started.
    """
    values = {"SOCKET_PATH": str(socket_path), "WORK_DIR": str(work_dir), "JOB_JSON": str(job_json)}
    argv = [cmd, *expand_args(args, values)]
    env = {
        **os.environ,
        "HYPHA_SOCKET": str(socket_path),
        "HYPHA_WORK_DIR": str(work_dir),
        "HYPHA_JOB": str(job_json),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    if user is not None:
        env["HOME"] = str(work_dir)  # the worker's own home is not the executor's to use
    try:
        process = await trio.lowlevel.open_process(
            argv,
            cwd=str(work_dir),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            user=user[0] if user is not None else None,
            group=user[1] if user is not None else None,
            extra_groups=[] if user is not None else None,  # none of the worker's groups
        )
    except OSError as exc:
        hint = f" as uid {user[0]} (run_as): can that user run it?" if user is not None else ""
        raise ExecutorStartError(f"cannot start executor {cmd!r}{hint}: {exc}") from exc
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    prefix = f"[task {task_id[:8]}]"
    logger.info("%s started pid %d: %s", prefix, process.pid, " ".join(argv))
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(_pump, process.stdout, prefix, logging.INFO, None)
            nursery.start_soon(_pump, process.stderr, prefix, logging.WARNING, tail)
            await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(process, kill_grace_seconds, prefix)
    code = process.returncode if process.returncode is not None else -1
    logger.info("%s exited with %d", prefix, code)
    return ProcessResult(exit_code=code, stderr_tail="\n".join(tail))


async def stop_process(process: trio.Process, grace_seconds: float, prefix: str) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_seconds`` if still running."""
    if process.returncode is not None:
        return
    _signal_group(process, signal.SIGTERM)
    with trio.move_on_after(grace_seconds):
        await process.wait()
    if process.returncode is None:
        logger.warning("%s ignored SIGTERM for %.1f s; killing it", prefix, grace_seconds)
        _signal_group(process, signal.SIGKILL)
        await process.wait()


def _signal_group(process: trio.Process, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        process.send_signal(signum)


def resolve_user(run_as: str) -> tuple[int, int]:
    """The ``(uid, gid)`` of ``run_as`` (a user name or a numeric uid), checked usable.

    Blocking (reads the user database).

    Raises:
        ConfigError: no such user, or this process may not switch to it (not root).
    """
    try:
        entry = pwd.getpwuid(int(run_as)) if run_as.isdigit() else pwd.getpwnam(run_as)
    except KeyError:
        raise ConfigError(f"run_as: no user {run_as!r} on this machine") from None
    if entry.pw_uid != os.geteuid() and os.geteuid() != 0:
        raise ConfigError(f"run_as: running executors as {run_as!r} needs a worker running as root")
    return entry.pw_uid, entry.pw_gid


def hand_over(work_dir: Path, socket_path: Path, user: tuple[int, int]) -> None:
    """Give the task's work dir (everything in it) and socket to ``user``; blocking.

    Links are changed themselves, never followed. The socket must be in the work dir: the
    shared runtime directory of deep work dirs holds other tasks' sockets.

    Raises:
        ExecutorStartError: the socket is outside the work dir, or a chown failed.
    """
    if socket_path.parent != work_dir:
        raise ExecutorStartError(
            f"run_as needs the bridge socket inside the task's work dir, but {work_dir} is too "
            "deep for an AF_UNIX path: use a shorter work_dir"
        )
    uid, gid = user
    try:
        os.chown(work_dir, uid, gid, follow_symlinks=False)
        for root, dirs, files in os.walk(work_dir):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
    except OSError as exc:
        raise ExecutorStartError(f"cannot hand {work_dir} to uid {uid} (run_as): {exc}") from exc


class ProcessRunner:
    """Runs a task's program with its job bridge (the ``Runner`` of ``runtime = "process"``).

    Args:
        node: the worker's node (the bridge reports progress through it).
        services: the worker's data plane, for the bridge's fetch and send.
        config: the worker's section (grace period, throttle, run_as).

    Raises:
        ConfigError: ``run_as`` names no user, or another one while the worker is not root.
    """

    def __init__(self, node: Node, services: TaskServices, config: WorkerConfig) -> None:
        self._node = node
        self._services = services
        self._config = config
        self._user = resolve_user(config.run_as) if config.run_as is not None else None
        if self._user == (os.geteuid(), os.getegid()):
            self._user = None  # already that user: nothing to switch or hand over

    async def __call__(self, task: Task) -> Exited:
        """Serve the bridge, run the program to its end, stop the bridge.

        Raises:
            ExecutorStartError: the program could not be started.
        """
        backend = TaskBackend(self._node, task, self._services)
        throttle = self._config.throttle
        user = self._user
        async with trio.open_nursery() as nursery:
            serve = partial(serve_bridge, backend, task.socket_path, task.work_dir, owner=user)
            await nursery.start(serve)
            if user is not None:
                await trio.to_thread.run_sync(hand_over, task.work_dir, task.socket_path, user)
            result = await run_executor_process(
                task.executor.cmd,
                task.executor.args,
                socket_path=task.socket_path,
                work_dir=task.work_dir,
                job_json=task.job_path,
                task_id=task.task_id,
                kill_grace_seconds=self._config.kill_grace_seconds,
                extra_env={"HYPHA_THROTTLE": str(throttle)} if throttle != 1.0 else None,
                user=user,
            )
            nursery.cancel_scope.cancel()
        if result.exit_code != 0:
            return Exited(result.exit_code, result.stderr_tail)
        return Exited(0)
