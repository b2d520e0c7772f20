"""Kademlia records and provider records, typed.

Owns the ``hypha`` DHT namespace: a validator that accepts only wire messages under
``/hypha/...`` keys, put/get of typed records, provide/find_providers with the library's
duplicate providers removed. The DHT service itself is started by ``net/host.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.records.validator import Validator

from hypha.errors import NetworkError, ProtocolError
from hypha.net.rpc import M
from hypha.protocol import codec, ids

logger = logging.getLogger(__name__)


class HyphaRecordValidator(Validator):  # type: ignore[misc]
    """Accept only well-formed wire messages as values under ``/hypha/``."""

    def validate(self, key: str, value: bytes) -> None:
        try:
            codec.decode_body(value)
        except codec.ProtocolError as exc:
            raise ValueError(f"invalid record under {key}: {exc}") from exc

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


class Dht:
    """Typed access to the node's Kademlia DHT."""

    def __init__(self, dht: KadDHT) -> None:
        self._dht = dht
        dht.register_validator(ids.DHT_NAMESPACE, HyphaRecordValidator())

    async def bootstrap(self) -> None:
        try:
            await self._dht.refresh_routing_table()
        except Exception as exc:
            logger.debug("DHT bootstrap: %s", exc)

    async def find_peer_addresses(self, peer_id: str) -> list[str]:
        """Addresses of ``peer_id`` known to the network (gateways learn them on connect)."""
        from libp2p.peer.id import ID

        try:
            info = await self._dht.find_peer(ID.from_base58(peer_id))
        except Exception as exc:
            raise NetworkError(f"DHT find_peer {peer_id} failed: {exc}") from exc
        return [str(a) for a in info.addrs] if info is not None else []

    async def put(self, key: str, record: Any) -> None:
        try:
            await self._dht.put_value(key, codec.encode_body(record))
        except Exception as exc:
            raise NetworkError(f"DHT put {key} failed: {exc}") from exc

    async def get(self, key: str, kind: type[M]) -> M | None:
        try:
            value = await self._dht.get_value(key)
        except Exception as exc:
            raise NetworkError(f"DHT get {key} failed: {exc}") from exc
        if value is None:
            return None
        try:
            return codec.expect(codec.decode_body(value), kind)
        except codec.ProtocolError as exc:
            raise ProtocolError(f"bad record under {key}: {exc}") from exc

    async def provide(self, key: str) -> None:
        try:
            ok = await self._dht.provide(key)
        except Exception as exc:
            raise NetworkError(f"DHT provide {key} failed: {exc}") from exc
        if not ok:
            raise NetworkError(f"DHT provide {key} was not stored")

    async def find_providers(self, key: str) -> list[str]:
        try:
            infos = await self._dht.find_providers(key)
        except Exception as exc:
            raise NetworkError(f"DHT find_providers {key} failed: {exc}") from exc
        seen: dict[str, None] = {}
        for info in infos:
            seen.setdefault(str(info.peer_id), None)
        return list(seen)
