"""Health probe of a remote node (``hypha probe``)."""

from __future__ import annotations

import dataclasses

from hypha.config.schema import NetworkSection
from hypha.net.host import open_node
from hypha.net.runner import settings_from_config
from hypha.protocol import ids
from hypha.protocol import messages as m


async def probe_health(config: NetworkSection, address: str) -> m.HealthResponse:
    """Dial ``address`` with the credentials in ``config`` and ask ``/hypha/health/1``.

    Raises:
        NetworkError: the node could not be reached or refused us.
    """
    settings = dataclasses.replace(
        settings_from_config("probe", config),
        listen_addresses=[],
        gateway_addresses=[],
        relay_circuit=False,
    )
    async with open_node(settings) as node:
        peer = await node.connect(address)
        return await node.request(peer, m.HealthRequest(), m.HealthResponse, protocol=ids.HEALTH_PROTOCOL)
