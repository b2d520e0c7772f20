"""Harness that starts real Hypha nodes for tests and benchmarks.

Owns a throwaway PKI per test, config files written from Python values, child node processes
(each logging to its own file, reported through its ready file, stopped with SIGTERM then
SIGKILL), and in-process nodes for multi-node tests in one trio run. Nothing here fakes the
network: every node is a real py-libp2p host on 127.0.0.1.
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
from typing import Any

import trio

from hypha.errors import JobError
from hypha.net.host import Node, NodeSettings, open_node
from hypha.pki import TlsFiles, create_ca, issue_node


@dataclass
class Pki:
    """A development CA in ``root`` that issues node credentials on demand."""

    root: Path

    @classmethod
    def create(cls, root: Path, org: str = "Test") -> Pki:
        create_ca(org, root)
        return cls(root)

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    def node(self, name: str, role: str, **kwargs: Any) -> TlsFiles:
        files = issue_node(self.root, name, role, self.root, **kwargs)
        return TlsFiles(cert=files.cert, key=files.key, trust=files.trust, crls=self.crl)

    def config_keys(self, tls: TlsFiles) -> dict[str, Any]:
        return {
            "cert_pem": str(tls.cert),
            "key_pem": str(tls.key),
            "trust_pem": str(tls.trust),
            "crls_pem": str(tls.crls or self.crl),
        }


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(path: Path, values: Mapping[str, Any]) -> Path:
    """Write a flat-or-nested mapping as TOML (tables and arrays of tables supported)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]")
            tables += [f"{k} = {_toml(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                tables.append(f"\n[[{key}]]")
                tables += [f"{k} = {_toml(v)}" for k, v in item.items()]
        else:
            lines.append(f"{key} = {_toml(value)}")
    path.write_text("\n".join(lines + tables) + "\n")
    return path


async def wait_until(predicate: Any, *, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until true; callers bound it with ``trio.fail_after``."""
    while not predicate():  # noqa: ASYNC110 - polling a predicate under the caller's deadline
        await trio.sleep(interval)


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
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


async def _stop(process: trio.Process, grace_seconds: float = 5.0) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace_seconds):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


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
) -> AsyncIterator[ChildNode]:
    """Start ``python -m hypha <role_args> --ready-file ...`` and wait for its ready file.

    The child logs to ``workdir/<name>.log``; on exit the process is stopped (SIGTERM, then
    SIGKILL) unless the test already killed it.
    """
    ready_file = workdir / f"{name}.ready.json"
    ready_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", module, *role_args, "--ready-file", str(ready_file)]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        if stdin is None:
            process = await trio.lowlevel.open_process(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env
            )
        else:
            process = await trio.lowlevel.open_process(
                cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=log, env=child_env
            )
    node = ChildNode(role_args[0], process, log_path)
    try:
        with trio.fail_after(ready_timeout_seconds):
            while not ready_file.exists():
                if process.returncode is not None or process.poll() is not None:
                    raise JobError(f"{name} exited with {process.returncode}:\n{node.log()[-4000:]}")
                await trio.sleep(0.05)
        node.ready = json.loads(ready_file.read_text())
        yield node
    finally:
        await _stop(process)


@asynccontextmanager
async def open_test_node(
    pki: Pki,
    name: str,
    role: str,
    *,
    gateways: Sequence[str] = (),
    listen: bool = True,
    relay_hop: bool = False,
    relay_circuit: bool = False,
    rpc_timeout_seconds: float = 10.0,
) -> AsyncIterator[Node]:
    """An in-process node with fresh credentials (several can share one trio run)."""
    settings = NodeSettings(
        role=role,
        tls=pki.node(name, role),
        listen_addresses=["/ip4/127.0.0.1/tcp/0"] if listen else [],
        gateway_addresses=list(gateways),
        relay_hop=relay_hop,
        relay_circuit=relay_circuit,
        rpc_timeout_seconds=rpc_timeout_seconds,
    )
    async with open_node(settings) as node, trio.open_nursery() as nursery:
        if role == "gateway":
            # Behave like a real gateway: be part of the advert topic's mesh.
            from hypha.gateway.node import serve_gateway

            await serve_gateway(node, nursery)
        yield node
        nursery.cancel_scope.cancel()


def worker_config(
    pki: Pki,
    name: str,
    gateway: str,
    work_dir: Path,
    *,
    price: float = 1.0,
    floor: float = 0.1,
    strategy: str = "whole",
    cpu: float = 1.0,
    memory: float = 4.0,
    gpu: float = 0.0,
    executors: Sequence[Mapping[str, Any]] = ({"class": "train", "name": "diloco", "cmd": sys.executable},),
    listen: bool = True,
    **extra: Any,
) -> Any:
    """A ``WorkerConfig`` for an in-process or child worker with fresh credentials."""
    from hypha.config.load import _build
    from hypha.config.schema import WorkerConfig

    tls = pki.node(name, "worker")
    raw: dict[str, Any] = {
        **pki.config_keys(tls),
        "gateway_addresses": [gateway],
        "relay_circuit": False,
        "listen_addresses": ["/ip4/127.0.0.1/tcp/0"] if listen else [],
        "work_dir": str(work_dir / name),
        "resources": {"cpu": cpu, "memory": memory, "gpu": gpu, "storage": 10.0},
        "offer": {"price": price, "floor": floor, "strategy": strategy},
        "executors": [dict(e) for e in executors],
        **extra,
    }
    problems: list[str] = []
    config = _build(WorkerConfig, raw, "", problems, None)
    if problems:
        raise ValueError(problems)
    return config


def scheduler_config(pki: Pki, name: str, gateway: str, **extra: Any) -> Any:
    """A ``SchedulerConfig`` with fresh credentials."""
    from hypha.config.load import _build
    from hypha.config.schema import SchedulerConfig

    raw = {
        **pki.config_keys(pki.node(name, "scheduler")),
        "gateway_addresses": [gateway],
        "relay_circuit": False,
        **extra,
    }
    problems: list[str] = []
    config = _build(SchedulerConfig, raw, "", problems, None)
    if problems:
        raise ValueError(problems)
    return config
