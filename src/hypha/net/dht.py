"""Kademlia records and provider records, typed.

Owns the ``hypha`` DHT namespace: a validator that accepts only wire messages under
``/hypha/...`` keys and, under ``/hypha/dataset/``, only ``DatasetRecord``s signed by a
data node (``net/records.py``; fully checked against our CA when the node passes its
verifier, structurally otherwise), put/get of typed records (``get`` checks the value it
returns once more, against the node's current CRL: the library returns values from the
node's own store as they were when stored), provide/find_providers with the library's
duplicate providers removed. Which providers to trust is the caller's decision. The DHT
service itself is started by ``net/host.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.records.validator import Validator

from hypha.errors import HyphaError, NetworkError, ProtocolError
from hypha.net.records import check_dataset_record
from hypha.net.rpc import M
from hypha.pki.verify import CertificateVerifier
from hypha.protocol import codec, ids
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)


class HyphaRecordValidator(Validator):  # type: ignore[misc]
    """Accept only well-formed wire messages under ``/hypha/``, and signed dataset records.

    Args:
        verifier: our CA's verifier; without it a dataset record is checked structurally
            only (its signature, key and role, but not who issued its certificate).
    """

    def __init__(self, verifier: CertificateVerifier | None = None) -> None:
        self._verifier = verifier

    def validate(self, key: str, value: bytes) -> None:
        self._check(key, value)

    def _check(self, key: str, value: bytes) -> m.Msg:
        """Decode ``value`` and check it for ``key``; return the message.

        Blocking when the verifier re-reads a changed CRL file.

        Raises:
            ValueError: the value is refused, with the reason (the library's contract).
        """
        try:
            msg = codec.decode_body(value)
        except codec.ProtocolError as exc:
            raise ValueError(f"invalid record under {key}: {exc}") from exc
        if key.startswith(ids.DATASET_KEY_PREFIX):
            if not isinstance(msg, m.DatasetRecord):
                raise ValueError(f"invalid record under {key}: {type(msg).__name__}, not a DatasetRecord")
            try:
                check_dataset_record(key, msg, self._verifier)
            except HyphaError as exc:  # AdmissionError, or ConfigError for an unreadable CRL
                raise ValueError(f"refused record under {key}: {exc}") from exc
        return msg

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


class Dht:
    """Typed access to the node's Kademlia DHT.

    Args:
        dht: the library's DHT service.
        verifier: the node's verifier; every dataset record stored or returned is checked
            against our CA and CRL with it.
    """

    def __init__(self, dht: KadDHT, verifier: CertificateVerifier) -> None:
        self._dht = dht
        self._validator = HyphaRecordValidator(verifier)
        dht.register_validator(ids.DHT_NAMESPACE, self._validator)

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
        """The record under ``key``, or None when the network holds none.

        A dataset record is returned only if a data node of our CA signed it and its
        certificate is not revoked by the node's current CRL.

        Raises:
            NetworkError: the lookup failed.
            ProtocolError: the value is malformed, not a ``kind``, or refused.
        """
        try:
            value = await self._dht.get_value(key)
        except Exception as exc:
            raise NetworkError(f"DHT get {key} failed: {exc}") from exc
        if value is None:
            return None
        try:
            # Again: a value from the local store was checked when stored, maybe before a
            # revocation. In a thread: the check may re-read a changed CRL file.
            msg = await trio.to_thread.run_sync(self._validator._check, key, value)
            return codec.expect(msg, kind)
        except (ValueError, codec.ProtocolError) as exc:
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
