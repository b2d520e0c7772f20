"""``hypha up`` stopped by SIGTERM or a Ctrl-C: every child stopped, every port freed, one line.

Runs the real command as a child in its own session, waits until its job is training (the
job's ``status.json`` has closed a round), records its role processes, their children (the
trainer) and the TCP ports they listen on, from ``/proc``, then sends the signal: to the
``hypha up`` process alone for SIGTERM (``kill PID``), and to its whole process group for
SIGINT, as a terminal's Ctrl-C does. And a role command run by hand exits 130 or 143 after
one line, without a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from hypha.local import Pki, read_status, spawn_node
from hypha.testing.cluster import write_toml

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

START_SECONDS = 90.0
"""Dataset, PKI, five role processes and the first round, on two shared cores."""
STOP_SECONDS = 30.0
POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Proc:
    """A process as /proc names it: the pid and its start time (so a reused pid is not it)."""

    pid: int
    start_ticks: int

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and int(stat[19]) == self.start_ticks and stat[0] != "Z"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, ... (None if gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _descendants(root: int) -> list[Proc]:
    """Every live descendant of ``root`` (children in their own sessions included)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents.setdefault(int(stat[1]), []).append(int(entry.name))
    found: list[Proc] = []
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _stat(pid)
        if stat is not None and stat[0] != "Z":
            found.append(Proc(pid, int(stat[19])))
            todo.extend(parents.get(pid, []))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _listening() -> Iterator[tuple[int, str]]:
    """(port, socket inode) of every TCP socket in LISTEN state on this machine."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                yield int(fields[1].rsplit(":", 1)[1], 16), fields[9]


def _listen_ports(procs: list[Proc]) -> set[int]:
    inodes = set().union(*(_socket_inodes(p.pid) for p in procs))
    return {port for port, inode in _listening() if inode in inodes}


def _ready_files(root: Path) -> dict[str, dict[str, object]]:
    logs = root / "network" / "logs"
    return {p.name.removesuffix(".ready.json"): json.loads(p.read_text()) for p in logs.glob("*.ready.json")}


async def _stop_by_signal(tmp_path: Path, signum: signal.Signals, *, ctrl_c: bool) -> None:
    """Start ``hypha up``, signal it once it trains, check what is left and what it said.

    With ``ctrl_c`` the signal goes to its process group, as a terminal sends it, and again
    once it is stopping (the scheduler has its SIGTERM), as an impatient user does.
    """
    root = tmp_path / "net"
    output = tmp_path / "up.out"
    cmd = [sys.executable, "-m", "hypha", "up", "--no-live", "--dir", str(root), "--rounds", "200"]
    cmd += ["--workers", "1"]  # a trainer and a parameter server: five role processes, one trainer
    with output.open("wb") as out:
        up = await trio.lowlevel.open_process(
            cmd, stdout=out, stderr=out, cwd=tmp_path, start_new_session=True
        )
    started: list[Proc] = []
    try:
        with trio.fail_after(START_SECONDS):
            while (status := read_status(tmp_path / "runs" / "demo")) is None or status["round"] < 1:
                assert up.poll() is None, output.read_text()
                await trio.sleep(POLL_SECONDS)
        started = _descendants(up.pid)
        roles = [p for p in started if int((_stat(p.pid) or ["", "0"])[1]) == up.pid]
        ready = _ready_files(root)
        assert sorted(ready) == ["data", "gateway", "scheduler", "worker0", "worker1"]
        assert {int(str(r["pid"])) for r in ready.values()} == {p.pid for p in roles}
        assert len(started) > len(roles)  # the trainer, a child of its worker
        ports = _listen_ports(started)
        for r in ready.values():
            addresses = r["listen_addresses"]
            assert isinstance(addresses, list)
            assert int(str(addresses[0]).split("/")[4]) in ports
        before = output.stat().st_size

        with trio.move_on_after(STOP_SECONDS):
            if ctrl_c:
                os.killpg(up.pid, signum)  # a terminal's Ctrl-C: the foreground process group
                scheduler_log = root / "network" / "logs" / "scheduler.log"
                while "received SIGTERM" not in scheduler_log.read_text():
                    await trio.sleep(POLL_SECONDS)
                os.killpg(up.pid, signum)  # pressed again while it stops its children
            else:
                up.send_signal(signum)
            await up.wait()
            while any(p.alive() for p in started):
                await trio.sleep(POLL_SECONDS)
        alive = [p.pid for p in started if p.alive()]
        assert not alive, f"still running {STOP_SECONDS} s after {signum.name}: {alive}"
        text = output.read_text()
        assert up.returncode == 128 + signum, text
        assert "Traceback" not in text
        after = [line for line in text[before:].splitlines() if line.strip()]
        assert len(after) == 1, after
        assert after[0].startswith(f"hypha up: stopped by {signum.name}; 5 role processes stopped;"), after
        assert after[0].endswith(f"results so far in {tmp_path / 'runs' / 'demo'}")
        assert not ports & {port for port, _inode in _listening()}
    finally:
        leftovers = started + (_descendants(up.pid) if up.poll() is None else [])
        if up.poll() is None:
            up.kill()
        for proc in leftovers:
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)
        with trio.move_on_after(5):
            await up.wait()


async def test_sigterm_stops_every_child_frees_every_port_and_exits_143(tmp_path: Path) -> None:
    await _stop_by_signal(tmp_path, signal.SIGTERM, ctrl_c=False)


async def test_ctrl_c_twice_stops_every_child_frees_every_port_and_exits_130(tmp_path: Path) -> None:
    await _stop_by_signal(tmp_path, signal.SIGINT, ctrl_c=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_role_command_exits_128_plus_signal_after_one_line(
    pki: Pki, tmp_path: Path, signum: signal.Signals
) -> None:
    config = write_toml(
        tmp_path / "gw.toml",
        {**pki.config_keys(pki.node("gw", "gateway")), "listen_addresses": ["/ip4/127.0.0.1/tcp/0"]},
    )
    async with spawn_node(["gateway", "--config", str(config)], tmp_path, "gw") as gw:
        before = gw.log_path.stat().st_size
        gw.process.send_signal(signum)
        with trio.fail_after(STOP_SECONDS):
            await gw.process.wait()
        text = gw.log()
    assert gw.process.returncode == 128 + signum, text
    assert "Traceback" not in text
    after = [line for line in text[before:].splitlines() if line.strip()]
    assert after == [f"gateway: received {signum.name}, shutting down"]
