"""Reaching peers: direct dials, DHT address lookups, relay circuits, and the gateways.

Owns which addresses a node may dial (what peers announced, minus ``exclude_cidr``), dialing
a full multiaddr with a failure explained (our refusal of the peer, or the peer's of us),
reaching a peer by ID (a known address, else one the DHT knows, else a circuit through each
gateway's relay), and joining the gateways at start with optional relay reservations. It
does not build the host or start its services (``host.py``); library errors become
``hypha.errors`` here.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.transport import CircuitV2Transport

from hypha.errors import HyphaError, NetworkError, PeerUnreachableError, describe
from hypha.net.admission import AdmissionTransport

logger = logging.getLogger(__name__)

Lookup = Callable[[str], Awaitable[list[str]]]
"""``async def lookup(peer_id) -> addresses`` (the DHT's ``find_peer_addresses``)."""


@dataclass(frozen=True, slots=True)
class DialerStatistics:
    """What a ``Dialer`` set up at start."""

    num_gateways: int
    """Gateways that answered (the relays that circuits go through)."""
    num_reservations: int
    """Relay slots reserved on them (``relay_circuit``), so peers can reach this node."""


class Dialer:
    """How one host reaches other peers.

    Args:
        host: the py-libp2p host that dials.
        security: the host's admission transport, which remembers why it refused a peer.
        lookup: finds addresses of a peer the host knows none of.
        exclude_cidr: networks never dialed, whatever a peer announces.
        timeout_seconds: bound of each gateway dial and relay reservation; half of it bounds
            a DHT lookup.
    """

    def __init__(
        self,
        host: Any,
        security: AdmissionTransport,
        lookup: Lookup,
        *,
        exclude_cidr: list[str],
        timeout_seconds: float,
    ) -> None:
        self._host = host
        self._security = security
        self._lookup = lookup
        self._excluded = [ipaddress.ip_network(c, strict=False) for c in exclude_cidr]
        self._timeout = timeout_seconds
        self.relay: CircuitV2Transport | None = None
        """The circuit relay transport, once the host's relay service runs."""
        self._gateways: list[PeerInfo] = []
        self._num_reservations = 0

    def statistics(self) -> DialerStatistics:
        """Return a snapshot of the gateways joined and relay slots reserved."""
        return DialerStatistics(num_gateways=len(self._gateways), num_reservations=self._num_reservations)

    def _allowed(self, addr: multiaddr.Multiaddr) -> bool:
        if not self._excluded:
            return True
        for proto in ("ip4", "ip6"):
            try:
                value = addr.value_for_protocol(proto)
            except Exception:  # not present in this address
                continue
            if value and any(ipaddress.ip_address(value) in net for net in self._excluded):
                return False
        return True

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (``.../p2p/<id>``); return the peer ID."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise NetworkError(f"invalid peer address {addr!r}: {exc}") from exc
        try:
            await self._host.connect(info)
        except Exception as exc:
            raise PeerUnreachableError(
                f"cannot connect to {addr}: {self._why(str(info.peer_id), exc)}"
            ) from exc
        return str(info.peer_id)

    def _why(self, peer_id: str, exc: BaseException) -> str:
        """A dial failure explained: our refusal of the peer, or the peer's of us."""
        refusal = self._security.refusals.pop(peer_id, None)
        if refusal is not None:
            return f"refused the peer: {refusal}"
        text = describe(exc)
        if "Failed to connect after" in text or "upgrade" in text.lower() or "handshake" in text.lower():
            return (
                f"{text}; the peer closed the connection during the security handshake "
                "(it may not trust our certificate: another CA, revoked or expired)"
            )
        return text

    def remember_addresses(self, peer_id: str, addresses: list[str]) -> None:
        """Record addresses a peer announced (filtered by ``exclude_cidr``) for later dials."""
        suffix = f"/p2p/{peer_id}"
        good = []
        for text in addresses:
            if "/p2p-circuit" in text:
                continue
            try:
                addr = multiaddr.Multiaddr(text.removesuffix(suffix))
            except Exception:  # a malformed address from a peer is just ignored
                continue
            if self._allowed(addr):
                good.append(addr)
        if not good:
            return
        pid = ID.from_base58(peer_id)
        store = self._host.get_peerstore()
        known = set(map(str, store.addrs(pid))) if _known(self._host, pid) else set()
        if known != set(map(str, good)):
            # What a peer announces now is where it is now: a restarted node (same identity,
            # new port) must not be dialled at its old address, nor stay in the swarm's
            # negative cache of peers whose every address failed a moment ago.
            store.clear_addrs(pid)
            self._host.get_network().unblock_peer(pid)
        store.add_addrs(pid, good, 3600)

    def _known_addrs(self, pid: ID) -> list[Any]:
        if not _known(self._host, pid):
            return []
        return [a for a in self._host.get_peerstore().addrs(pid) if self._allowed(a)]

    def is_connected(self, peer_id: str) -> bool:
        return bool(self._host.get_network().get_connections(ID.from_base58(peer_id)))

    async def ensure_connected(self, peer_id: str) -> None:
        """Connect to ``peer_id`` directly if any known address allows, else via a relay.

        Raises:
            PeerUnreachableError: no direct address and no gateway's circuit worked.
        """
        pid = ID.from_base58(peer_id)
        if self.is_connected(peer_id):
            return
        addrs = self._known_addrs(pid)
        if not addrs:
            # Gateways learn every peer's addresses when it connects: ask the DHT.
            with trio.move_on_after(self._timeout / 2):
                try:
                    self.remember_addresses(peer_id, await self._lookup(peer_id))
                except HyphaError as exc:
                    logger.debug("DHT lookup of %s failed: %s", peer_id, exc)
            addrs = self._known_addrs(pid)
        if addrs:
            try:
                await self._host.connect(PeerInfo(pid, addrs))
                return
            except Exception as exc:
                logger.debug("direct dial of %s failed: %s", peer_id, describe(exc))
        errors = []
        for gateway in self._gateways:
            if str(gateway.peer_id) == peer_id:
                continue
            circuit = multiaddr.Multiaddr(
                f"{gateway.addrs[0]}/p2p/{gateway.peer_id}/p2p-circuit/p2p/{peer_id}"
            )
            try:
                assert self.relay is not None
                await self.relay.dial(circuit)
                return
            except Exception as exc:
                errors.append(f"via {gateway.peer_id}: {describe(exc)}")
        raise PeerUnreachableError(f"cannot reach {peer_id}: " + ("; ".join(errors) or "no known address"))

    async def join_gateways(self, addrs: list[str], nursery: trio.Nursery, *, reserve: bool) -> None:
        """Dial every gateway in ``addrs``; with ``reserve``, reserve a relay slot on each.

        Spawns the reservations' refresh tasks in ``nursery``. No gateways, nothing to do.

        Raises:
            NetworkError: none of ``addrs`` could be reached.
        """
        if not addrs:
            return
        errors: list[str] = []
        for addr in addrs:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            except Exception as exc:
                errors.append(f"{addr}: not a multiaddr with /p2p/<peer id>: {exc}")
                continue
            try:
                with trio.fail_after(self._timeout):
                    await self._host.connect(info)
            except Exception as exc:
                errors.append(f"{addr}: {describe(exc)}")
                logger.warning("gateway %s unreachable: %s", addr, describe(exc))
                continue
            self._gateways.append(info)
            if reserve and self.relay is not None:
                try:
                    with trio.fail_after(self._timeout):
                        stream = await self._host.new_stream(info.peer_id, [HOP_PROTOCOL])
                        ok = await self.relay.reserve(stream, info.peer_id, nursery)
                    if ok:
                        self._num_reservations += 1
                    else:
                        logger.warning("relay reservation on %s refused", info.peer_id)
                except Exception as exc:
                    logger.warning("relay reservation on %s failed: %s", info.peer_id, describe(exc))
        if not self._gateways:
            raise NetworkError("no gateway reachable: " + "; ".join(errors))
        # No routing-table refresh here: the gateways answer DHT queries (server mode), and a
        # refresh makes every node dial dozens of others at start, quadratic in network size.


def _known(host: Any, pid: ID) -> bool:
    try:
        return pid in host.get_peerstore().peer_ids()
    except Exception:
        return False
