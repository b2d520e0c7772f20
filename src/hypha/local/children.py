"""Role processes on this machine: start ``python -m hypha <role>``, wait until up, stop.

Owns one child node's life: its command line and environment, its log file, waiting for its
ready file (``--ready-file``, written once the node listens), and stopping it with SIGTERM,
then SIGKILL after a grace period. Each child runs in its own session, so a terminal's Ctrl-C
(or hangup) reaches only its parent, which then stops the children in its own order.
``hypha up`` and the test harness start nodes through ``spawn_node``; which nodes to start,
and in what order, is the caller's business.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import trio

from hypha.errors import JobError


@dataclass
class ChildNode:
    """A node running as a child process."""

    role: str
    process: trio.Process
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return str(self.ready["peer_id"])

    @property
    def address(self) -> str:
        return str(self.ready["listen_addresses"][0])

    def log(self) -> str:
        """The child's log so far ("" if unreadable); blocking, async callers use a thread."""
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


async def stop_process(process: trio.Process, grace_seconds: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace_seconds``, then SIGKILL; shielded, so it runs when cancelled."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace_seconds):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def _open_log(path: Path) -> BinaryIO:
    return path.open("wb")


@asynccontextmanager
async def spawn_node(
    role_args: Sequence[str],
    workdir: Path,
    name: str,
    *,
    env: Mapping[str, str] | None = None,
    ready_timeout_seconds: float = 60.0,
    module: str = "hypha",
    stdin: int | None = None,
    stop_grace_seconds: float = 5.0,
) -> AsyncIterator[ChildNode]:
    """Start ``python -m <module> <role_args> --ready-file ...`` and wait for its ready file.

    Args:
        role_args: The role and its flags, e.g. ``["worker", "--config", "w.toml"]``.
        workdir: Where the log (``<name>.log``) and ready file (``<name>.ready.json``) go.
        name: The node's name in file names and messages.
        env: Variables added to this process's environment.
        ready_timeout_seconds: How long the node may take to come up.
        module: The module run with ``python -m`` (``hypha.testing.peer`` for test peers).
        stdin: A pipe for the child's stdin; then its stdout is a pipe too and stderr logs.
        stop_grace_seconds: How long the node may take to stop after SIGTERM (then SIGKILL).

    Raises:
        JobError: the child exited before it was ready (the message ends with its log).
        trio.TooSlowError: it was not ready within ``ready_timeout_seconds``.

    Resource handling:
        On exit the process is stopped (SIGTERM, then SIGKILL) unless it already ended, also
        when cancelled. The child runs in a new session (``start_new_session``): signals sent
        to the caller's process group (a terminal's Ctrl-C) do not reach it, so the caller
        decides when and in what order its children stop.
    """
    ready_file = workdir / f"{name}.ready.json"
    await trio.to_thread.run_sync(lambda: ready_file.unlink(missing_ok=True))
    log_path = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", module, *role_args, "--ready-file", str(ready_file)]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with await trio.to_thread.run_sync(_open_log, log_path) as log:
        if stdin is None:
            process = await trio.lowlevel.open_process(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
            )
        else:
            process = await trio.lowlevel.open_process(
                cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=log, env=child_env, start_new_session=True
            )
    node = ChildNode(role_args[0], process, log_path)
    try:
        with trio.fail_after(ready_timeout_seconds):
            while not await trio.to_thread.run_sync(ready_file.exists):
                if process.returncode is not None or process.poll() is not None:
                    log_text = await trio.to_thread.run_sync(node.log)
                    raise JobError(f"{name} exited with {process.returncode}:\n{log_text[-4000:]}")
                await trio.sleep(0.05)
        node.ready = json.loads(await trio.to_thread.run_sync(ready_file.read_text))
        yield node
    finally:
        await stop_process(process, stop_grace_seconds)
