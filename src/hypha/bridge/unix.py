"""The bridge's Unix socket: private to the task's user, bound and removed here.

Owns the isolation of one task's socket from every other local user: the socket file is
mode 0600 from before anyone can connect (it is chmod-ed, and chown-ed to the executor's
user when that is another one, between ``bind`` and ``listen``), and it is bound only in a
directory that is the worker's and closed to group and others (0700), so no other user can
reach it, replace it or watch it appear. What it does not own: the task's work directory
and handing it to the executor's user (``worker/executors/process.py``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path
from typing import Final

MAX_UNIX_PATH_BYTES: Final = 107
"""Longest AF_UNIX socket path on Linux (108 bytes with the NUL)."""


def check_private_dir(directory: Path) -> None:
    """Refuse a socket directory another user owns or that group or others may enter.

    Raises:
        ValueError: the directory is not private to this process's user.
        OSError: it cannot be examined.
    """
    info = os.stat(directory)
    if info.st_uid != os.geteuid():
        raise ValueError(
            f"bridge socket directory {directory} belongs to uid {info.st_uid}, not to this worker "
            f"(uid {os.geteuid()})"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ValueError(
            f"bridge socket directory {directory} has mode {mode:o}: other users could reach the "
            "socket; it must be private (0700)"
        )


def bind_private_socket(
    socket_path: Path, backlog: int, owner: tuple[int, int] | None = None
) -> socket.socket:
    """Bind and listen on ``socket_path`` with mode 0600, replacing a stale socket file.

    Blocking: call it in a thread.

    Args:
        socket_path: where the socket goes; its directory must pass ``check_private_dir``.
        backlog: the listen backlog.
        owner: ``(uid, gid)`` to give the socket to (an executor that runs as another user).

    Raises:
        ValueError: the path is too long for AF_UNIX, or its directory is not private.
        OSError: the socket could not be created.
    """
    if len(os.fsencode(socket_path)) > MAX_UNIX_PATH_BYTES:
        raise ValueError(
            f"socket path {socket_path} is longer than the {MAX_UNIX_PATH_BYTES} bytes "
            "AF_UNIX allows; use a shorter work dir"
        )
    check_private_dir(socket_path.parent)
    try:
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            socket_path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(os.fspath(socket_path))
        bound = True
        # Nobody can connect before listen(), so there is no window with a wider mode or owner.
        os.chmod(socket_path, 0o600)
        if owner is not None:
            os.chown(socket_path, *owner, follow_symlinks=False)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if bound:  # only the file this call made
            with contextlib.suppress(OSError):
                os.unlink(socket_path)
        raise
    return sock


def remove_socket(socket_path: Path) -> None:
    """Remove the socket file if it is still there (blocking)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
