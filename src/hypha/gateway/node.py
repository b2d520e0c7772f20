"""The gateway role: bootstrap peer, Kademlia anchor, circuit relay, gossip member.

Owns what a gateway does beyond a plain node: it relays (``relay_hop``), and it subscribes
to the worker topic so that advertisements are forwarded between schedulers and workers
that are connected only to gateways. It holds no job state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import trio

from hypha.config.schema import GatewayConfig
from hypha.net.host import Node
from hypha.net.runner import run_node, settings_from_config
from hypha.protocol import ids
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)


async def serve_gateway(node: Node, nursery: trio.Nursery) -> Mapping[str, object] | None:
    """Start the gateway's services on ``node`` (in ``nursery``)."""
    started = trio.Event()

    async def forward_adverts() -> None:
        # Being subscribed makes the gateway part of the topic's mesh; it only drains.
        async with node.gossip.subscribe(ids.WORKER_TOPIC, m.WorkerRequest, roles={"scheduler"}) as sub:
            started.set()
            async for received in sub:
                logger.debug("advert %s from %s", received.message.id, received.origin)

    nursery.start_soon(forward_adverts)
    await started.wait()
    return None


async def run_gateway(
    config: GatewayConfig,
    *,
    ready_file: Path | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a gateway until cancelled."""
    settings = settings_from_config("gateway", config)
    await run_node(settings, serve_gateway, ready_file=ready_file, task_status=task_status)
