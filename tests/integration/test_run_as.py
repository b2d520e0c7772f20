"""``run_as``: a root worker runs its executors as another user, who reaches only its own socket.

The process runner and the bridge are the real ones, with a real child process: the
executor (stdlib Python, run as ``nobody``) reports its uid, gid and groups, asks its own
bridge for ``/health``, reads its job document, and tries a bridge socket that was not
handed to it (the worker's, 0600 in a 0700 directory), which must stay out of its reach.
These need root (CI runs as root); the checks of the configuration run as any user.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from hypha.bridge import serve_bridge
from hypha.config.schema import ExecutorSection, WorkerConfig
from hypha.errors import ConfigError, ExecutorStartError
from hypha.worker.executors.process import ProcessRunner, hand_over, resolve_user
from hypha.worker.task import Task

EXECUTOR = textwrap.dedent(
    """
    import json, os, socket, sys

    def health(path):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(b"GET /health HTTP/1.1\\r\\nHost: hypha\\r\\nConnection: close\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return int(data.split(b" ", 2)[1])

    try:
        health(sys.argv[1])
        other = "reachable"
    except OSError as exc:
        other = type(exc).__name__
    with open(os.environ["HYPHA_JOB"]) as f:
        job = f.read()
    report = {
        "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "status": health(os.environ["HYPHA_SOCKET"]), "job": job, "other": other,
        "home": os.environ["HOME"],
    }
    with open("who.json", "w") as f:
        json.dump(report, f)
    """
)


def _python_for(uid: int, gid: int) -> str | None:
    """An interpreter that ``uid`` may run (the venv's may sit under root's home)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            subprocess.run(
                [candidate, "-c", "pass"], user=uid, group=gid, extra_groups=[], check=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError):
            continue
        return candidate
    return None


@pytest.fixture
def nobody() -> tuple[int, int, str]:
    if os.geteuid() != 0:
        pytest.skip("run_as needs a worker running as root")
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    python = _python_for(entry.pw_uid, entry.pw_gid)
    if python is None:
        pytest.skip("no Python interpreter that 'nobody' may run")
    return entry.pw_uid, entry.pw_gid, python


@pytest.fixture
def base() -> Iterator[Path]:
    # Under /tmp (short socket paths), searchable by everyone like a real worker's work_dir;
    # pytest's tmp_path is private to root.
    with tempfile.TemporaryDirectory(prefix="hr-", dir="/tmp") as name:
        os.chmod(name, 0o711)
        yield Path(name)


def make_task(base: Path, task_id: str, executor: ExecutorSection) -> Task:
    """A task as the job manager makes it: a private work dir holding job.json."""
    work_dir = base / f"task-{task_id}"
    work_dir.mkdir(mode=0o700)
    (work_dir / "job.json").write_text('{"job_id": "j"}')
    return Task(
        task_id=task_id,
        job_id="j",
        lease_id="l",
        scheduler="s",
        executor=executor,
        work_dir=work_dir,
        config=b'{"job_id": "j"}',
        socket_path=work_dir / "bridge.sock",
    )


class Backend:
    """Just enough of a worker for ``/health``."""

    task_id = "other"


async def test_executor_runs_as_the_configured_user(nobody: tuple[int, int, str], base: Path) -> None:
    uid, gid, python = nobody
    other_dir = base / "task-other"
    other_dir.mkdir(mode=0o700)
    other_socket = other_dir / "bridge.sock"
    executor = ExecutorSection(name="script", cmd=python, args=["-c", EXECUTOR, str(other_socket)])
    config = WorkerConfig(work_dir=base, executors=[executor], kill_grace_seconds=1.0, run_as="nobody")
    runner = ProcessRunner(None, None, config)  # type: ignore[arg-type]  # /health needs neither
    task = make_task(base, "t1", executor)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            # A bridge of the worker's own uid, not handed over (as every socket is without run_as).
            await nursery.start(partial(serve_bridge, Backend(), other_socket, other_dir))  # type: ignore[arg-type]
            exited = await runner(task)
            nursery.cancel_scope.cancel()
    assert exited.exit_code == 0, exited.detail
    report = json.loads((task.work_dir / "who.json").read_text())
    assert (report["uid"], report["gid"], report["groups"]) == (uid, gid, [])
    assert report["status"] == 200  # its own bridge answers it
    assert report["job"] == '{"job_id": "j"}'
    assert report["other"] == "PermissionError"  # a socket of the worker's uid is out of reach
    assert report["home"] == str(task.work_dir)
    info = os.stat(task.work_dir)
    assert (info.st_uid, info.st_gid) == (uid, gid)
    assert os.stat(task.work_dir / "who.json").st_uid == uid


async def test_without_run_as_the_executor_is_the_worker(base: Path) -> None:
    executor = ExecutorSection(name="script", cmd=sys.executable, args=["-c", EXECUTOR, "/nonexistent.sock"])
    config = WorkerConfig(work_dir=base, executors=[executor], kill_grace_seconds=1.0)
    task = make_task(base, "t2", executor)
    with trio.fail_after(60):
        exited = await ProcessRunner(None, None, config)(task)  # type: ignore[arg-type]
    assert exited.exit_code == 0, exited.detail
    report = json.loads((task.work_dir / "who.json").read_text())
    assert (report["uid"], report["status"]) == (os.getuid(), 200)


def test_run_as_must_name_a_usable_user(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no user"):
        resolve_user("no-such-user-hypha")
    me = pwd.getpwuid(os.geteuid())
    assert resolve_user(me.pw_name) == resolve_user(str(me.pw_uid)) == (me.pw_uid, me.pw_gid)
    with pytest.raises(ConfigError, match="no user"):
        ProcessRunner(None, None, WorkerConfig(run_as="no-such-user-hypha"))  # type: ignore[arg-type]
    # A socket outside the work dir (the shared runtime directory) is never handed over.
    (tmp_path / "w").mkdir()
    with pytest.raises(ExecutorStartError, match="inside the task's work dir"):
        hand_over(tmp_path / "w", tmp_path / "runtime" / "t.sock", (me.pw_uid, me.pw_gid))
