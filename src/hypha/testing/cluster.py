"""Harness that starts real Hypha nodes for tests and benchmarks.

Owns in-process nodes for multi-node tests in one trio run (``open_test_node``), configs
for in-process workers and schedulers built from Python values, and ``wait_until``. It
builds on ``hypha.local`` (the development PKI, child node processes) and re-exports those
names with the TOML writer, so tests import one module. Nothing here fakes the network:
every node is a real py-libp2p host on 127.0.0.1.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from hypha.config.load import build_section
from hypha.config.schema import SchedulerConfig, WorkerConfig
from hypha.config.toml import write_toml
from hypha.errors import ConfigError
from hypha.local.children import ChildNode, spawn_node
from hypha.local.pki import Pki
from hypha.net.host import Node, NodeSettings, open_node

__all__ = [
    "ChildNode",
    "Pki",
    "open_test_node",
    "scheduler_config",
    "spawn_node",
    "wait_until",
    "worker_config",
    "write_toml",
]

T = TypeVar("T")


async def wait_until(predicate: Callable[[], object], *, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until true; callers bound it with ``trio.fail_after``."""
    while not predicate():  # noqa: ASYNC110 - polling a predicate under the caller's deadline
        await trio.sleep(interval)


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
    tls = await trio.to_thread.run_sync(pki.node, name, role)  # key generation and files block
    settings = NodeSettings(
        role=role,
        tls=tls,
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
) -> WorkerConfig:
    """A ``WorkerConfig`` for an in-process or child worker with fresh credentials.

    Raises:
        ValueError: the values do not make a valid config (its args list the problems).
    """
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
    return _build(WorkerConfig, raw, name)


def scheduler_config(pki: Pki, name: str, gateway: str, **extra: Any) -> SchedulerConfig:
    """A ``SchedulerConfig`` with fresh credentials (``ValueError`` as for ``worker_config``)."""
    raw = {
        **pki.config_keys(pki.node(name, "scheduler")),
        "gateway_addresses": [gateway],
        "relay_circuit": False,
        **extra,
    }
    return _build(SchedulerConfig, raw, name)


def _build(cls: type[T], raw: Mapping[str, Any], name: str) -> T:
    try:
        return build_section(cls, raw, where=f"{name} (test config)")
    except ConfigError as exc:
        raise ValueError(exc.problems) from exc
