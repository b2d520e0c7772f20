"""The node runner every role reuses: settings from config, start, ready file, serve.

Owns turning a role's config section into ``NodeSettings``, writing the ``--ready-file``
JSON once the node is up (``{role, peer_id, listen_addresses}`` plus role extras), and the
structure of a role's ``run``: open the node, start the role's services, report ready, run
until cancelled. Signal handling belongs to the CLI, which cancels this.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from hypha.config.schema import ClientNetworkSection, GatewayConfig, NetworkSection
from hypha.net.host import Node, NodeSettings, open_node
from hypha.pki.verify import TlsFiles


def settings_from_config(role: str, config: NetworkSection) -> NodeSettings:
    """Build the network settings of ``role`` from its config section."""
    tls = TlsFiles(cert=config.cert_pem, key=config.key_pem, trust=config.trust_pem, crls=config.crls_pem)
    common = {
        "role": role,
        "tls": tls,
        "listen_addresses": list(config.listen_addresses),
        "external_addresses": list(config.external_addresses),
        "exclude_cidr": list(config.exclude_cidr),
        "rpc_timeout_seconds": config.rpc_timeout_seconds,
    }
    if isinstance(config, GatewayConfig):
        return NodeSettings(
            **common,  # type: ignore[arg-type]
            relay_hop=True,
            relay_max_reservations=config.relay_max_reservations,
            relay_max_circuits=config.relay_max_circuits,
        )
    if not isinstance(config, ClientNetworkSection):
        return NodeSettings(**common)  # type: ignore[arg-type]
    return NodeSettings(
        **common,  # type: ignore[arg-type]
        gateway_addresses=list(config.gateway_addresses),
        relay_circuit=config.relay_circuit,
    )


def write_ready_file(path: Path, node: Node, extra: Mapping[str, object] | None = None) -> None:
    """Atomically write the node's ready JSON to ``path``."""
    doc: dict[str, object] = {
        "role": node.role,
        "peer_id": node.peer_id,
        "listen_addresses": node.listen_addrs(),
        "pid": os.getpid(),
    }
    doc.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


RoleBody = Callable[[Node, trio.Nursery], Awaitable[Mapping[str, object] | None]]
"""Starts a role's services in the nursery; returns extra ready-file fields."""


async def run_node(
    settings: NodeSettings,
    body: RoleBody,
    *,
    ready_file: Path | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until cancelled.

    Cancellation: cancelling the caller's scope stops the role's tasks, then the node.
    """
    async with open_node(settings) as node, trio.open_nursery() as nursery:
        extra = await body(node, nursery)
        if ready_file is not None:
            write_ready_file(ready_file, node, extra)
        task_status.started(node)
        await trio.sleep_forever()


class RoleService(Protocol):
    """A role's services on one node (``Worker``, ``DataNode``)."""

    async def start(self, nursery: trio.Nursery) -> Mapping[str, object]: ...


S = TypeVar("S", bound=RoleService)


async def run_role(
    settings: NodeSettings,
    build: Callable[[Node], S],
    *,
    ready_file: Path | None = None,
    task_status: trio.TaskStatus[S] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node with the role service ``build(node)`` until cancelled; report the service."""
    built: list[S] = []

    async def body(node: Node, nursery: trio.Nursery) -> Mapping[str, object]:
        built.append(build(node))
        return await built[0].start(nursery)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_node(settings, body, ready_file=ready_file, task_status=task_status)
        )
        task_status.started(built[0])
