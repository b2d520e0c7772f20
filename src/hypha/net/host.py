"""The py-libp2p host behind every Hypha node, and the only module that builds one.

Owns host construction (TLS admission as the only security, Yamux only, one connection per
peer), the start order of services (pubsub, gossipsub, DHT, relay) before any dial, and the
``Node`` facade that roles use: RPC, streams, gossip, DHT, ``statistics()``, and cutting
peers whose certificates a changed CRL revokes (``on_peer_revoked``). Reaching peers
and gateways (direct dials, DHT lookups, relay circuits and reservations) is ``dialer.py``'s.
Library errors are translated into ``hypha.errors`` here. Roles never import libp2p.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from cryptography.hazmat.primitives import serialization
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519Private
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.tls.transport import PROTOCOL_ID as TLS_PROTOCOL
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from hypha.errors import ConfigError, NetworkError, RequestTimeoutError, describe, hypha_leaf
from hypha.net import pubsub as ps
from hypha.net.admission import AdmissionStatistics, AdmissionTransport, PeerDirectory
from hypha.net.dht import Dht
from hypha.net.dialer import Dialer, DialerStatistics
from hypha.net.rpc import M, RpcServer, RpcStatistics, Stream, exchange
from hypha.net.startup import check_node_start
from hypha.pki.ca import load_private_key
from hypha.pki.verify import CertificateVerifier, TlsFiles
from hypha.protocol import ids
from hypha.protocol import messages as m

logger = logging.getLogger(__name__)

OnPeerRevoked = Callable[[str], Awaitable[None]]
"""``async def on_revoked(peer_id)``: drop what the peer holds (leases, pool membership)."""


@dataclass(frozen=True)
class NodeSettings:
    """What the network layer needs to know about a node (built from its config)."""

    role: str
    tls: TlsFiles
    listen_addresses: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    external_addresses: list[str] = field(default_factory=list)
    gateway_addresses: list[str] = field(default_factory=list)
    relay_circuit: bool = False
    exclude_cidr: list[str] = field(default_factory=list)
    rpc_timeout_seconds: float = 10.0
    relay_hop: bool = False
    relay_max_reservations: int = 128
    relay_max_circuits: int = 16
    revocation_check_seconds: float = 1.0
    """How often the CRL file is checked for newly revoked peers (a ``stat`` each time)."""


def _key_pair(path: Any) -> KeyPair:
    key = load_private_key(path)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    private = Libp2pEd25519Private.from_bytes(raw)
    return KeyPair(private, private.get_public_key())


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    """A running node's state and the counters of its parts."""

    healthy: bool
    num_connected_peers: int
    dialer: DialerStatistics
    admission: AdmissionStatistics
    rpc: RpcStatistics
    gossip: ps.GossipStatistics
    num_revoked_peers: int
    """Admitted peers cut since start because a changed CRL revoked their certificates."""


class Node:
    """A running Hypha network node. Create it with ``open_node``."""

    def __init__(
        self,
        settings: NodeSettings,
        host: Any,
        directory: PeerDirectory,
        security: AdmissionTransport,
        verifier: CertificateVerifier,
    ) -> None:
        self.settings = settings
        self._security = security
        self.verifier = verifier
        """Our CA's verifier, one per node: admission, the DHT's record checks and the bulk
        channel share it, so they share one CRL, which the revocation watcher keeps fresh."""
        self.role = settings.role
        self._host = host
        self.directory = directory
        self.peer_id: str = str(host.get_id().to_base58())
        self.rpc = RpcServer(directory.role, settings.rpc_timeout_seconds, is_revoked=directory.is_revoked)
        self.dht: Dht
        self.gossip: ps.Gossip
        self._dialer = Dialer(
            host,
            security,
            self._find_addresses,
            exclude_cidr=settings.exclude_cidr,
            timeout_seconds=settings.rpc_timeout_seconds,
        )
        self.healthy = False
        self._on_revoked: list[OnPeerRevoked] = []
        self._num_revoked_peers = 0

    def statistics(self) -> NodeStatistics:
        """Return a snapshot of the node's health, connections and its parts' counters."""
        return NodeStatistics(
            healthy=self.healthy,
            num_connected_peers=len(self._host.get_network().connections),
            dialer=self._dialer.statistics(),
            admission=self._security.statistics(),
            rpc=self.rpc.statistics(),
            gossip=self.gossip.statistics(),
            num_revoked_peers=self._num_revoked_peers,
        )

    # --- addresses and connections (``dialer.py``) ------------------------------------

    def listen_addrs(self) -> list[str]:
        """Addresses others can dial, each ending in ``/p2p/<peer id>``."""
        out = [str(a) for a in self._host.get_addrs()]
        out += [f"{a}/p2p/{self.peer_id}" for a in self.settings.external_addresses]
        return out

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (``.../p2p/<id>``); return the peer ID.

        Raises:
            NetworkError: ``addr`` is not a peer address.
            PeerUnreachableError: the dial failed; the message says who refused whom.
        """
        return await self._dialer.connect(addr)

    def remember_addresses(self, peer_id: str, addresses: list[str]) -> None:
        """Record addresses a peer announced (filtered by ``exclude_cidr``) for later dials."""
        self._dialer.remember_addresses(peer_id, addresses)

    def is_connected(self, peer_id: str) -> bool:
        return self._dialer.is_connected(peer_id)

    async def ensure_connected(self, peer_id: str) -> None:
        """Connect to ``peer_id`` directly if any known address allows, else via a relay."""
        await self._dialer.ensure_connected(peer_id)

    async def _find_addresses(self, peer_id: str) -> list[str]:
        return await self.dht.find_peer_addresses(peer_id)

    # --- streams ----------------------------------------------------------------------

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """Open a stream to ``peer_id`` for ``protocol``, connecting first if needed."""
        await self.ensure_connected(peer_id)
        try:
            stream: Stream = await self._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        except Exception as exc:
            raise NetworkError(f"cannot open {protocol} to {peer_id}: {describe(exc)}") from exc
        return stream

    async def request(
        self,
        peer_id: str,
        msg: m.Msg,
        expect: type[M],
        protocol: str = ids.API_PROTOCOL,
        *,
        timeout_seconds: float | None = None,
    ) -> M:
        """Send one request and return the typed response.

        Bounded by ``timeout_seconds`` (default: the node's ``rpc_timeout_seconds``); requests
        whose handler moves bulk data pass a deadline that grows with the size.

        Raises:
            RequestTimeoutError: no answer within the deadline (a ``NetworkError``, so every
                caller that handles a failed request handles a silent peer too).
            NetworkError: the peer could not be reached or answered with an error.
        """
        seconds = timeout_seconds or self.settings.rpc_timeout_seconds
        try:
            with trio.fail_after(seconds):
                stream = await self.open_stream(peer_id, protocol)
                return await exchange(stream, msg, expect)
        except trio.TooSlowError:
            name = type(msg).__name__
            raise RequestTimeoutError(f"{name} to {peer_id}: no answer within {seconds:g} s") from None

    def set_stream_handler(self, protocol: str, handler: Callable[[Stream, str], Awaitable[None]]) -> None:
        """Serve raw streams of ``protocol``; ``handler(stream, peer_id)``."""

        async def _handler(stream: Any) -> None:
            peer = str(stream.muxed_conn.peer_id)
            try:
                await handler(stream, peer)
            except Exception:
                logger.exception("stream handler for %s failed (peer %s)", protocol, peer)
                try:
                    await stream.reset()
                except Exception:  # already gone
                    pass

        self._host.set_stream_handler(TProtocol(protocol), _handler)

    async def disconnect(self, peer_id: str) -> None:
        try:
            await self._host.disconnect(ID.from_base58(peer_id))
        except Exception as exc:
            logger.debug("disconnect %s: %s", peer_id, exc)

    def connected_peers(self) -> list[str]:
        return [str(p) for p in self._host.get_network().connections]

    # --- revocation -------------------------------------------------------------------

    def on_peer_revoked(self, callback: OnPeerRevoked) -> None:
        """Call ``await callback(peer_id)`` for each admitted peer a changed CRL revokes.

        By then the peer's requests are refused and its connection is closed. Each call
        runs in its own task of the node's revocation watcher; an error in one ends the node,
        as an error in any background task does.
        """
        self._on_revoked.append(callback)

    async def _watch_revocations(self) -> None:
        """Cut the peers whose certificates a changed CRL revokes, until cancelled.

        Every ``revocation_check_seconds`` the CRL file is checked (in a worker thread: a
        ``stat``, and a read when it changed). The CRL a handshake or a record check re-read
        counts too: they share the node's verifier.
        """
        failure = ""
        async with trio.open_nursery() as callbacks:
            while True:  # until the node stops
                await trio.sleep(self.settings.revocation_check_seconds)
                try:
                    await trio.to_thread.run_sync(self.verifier.refresh_crls)
                    failure = ""
                except ConfigError as exc:  # a CRL being rewritten, or a broken one: keep the last
                    if str(exc) != failure:
                        logger.warning("CRL not re-read, the one read before stays in force: %s", exc)
                    failure = str(exc)
                for peer in self._security.newly_revoked():
                    self._num_revoked_peers += 1
                    logger.warning("certificate of %s revoked: closing its connection", peer)
                    with trio.move_on_after(self.settings.rpc_timeout_seconds):
                        await self.disconnect(peer)
                    for callback in self._on_revoked:
                        callbacks.start_soon(callback, peer)

    # --- health -----------------------------------------------------------------------

    async def _health(self, peer: str, request: m.HealthRequest) -> m.HealthResponse:
        return m.HealthResponse(healthy=self.healthy, role=self.role, peer_id=self.peer_id)


@asynccontextmanager
async def open_node(settings: NodeSettings) -> AsyncIterator[Node]:
    """Start a node: host, services, listeners, gateway dials, relay reservation.

    Cancellation: leaving the context stops every service and closes every connection.

    Raises:
        NetworkError: no gateway in ``gateway_addresses`` could be reached.
        ConfigError: unreadable key or certificate files, a key that is not the
            certificate's, or a fixed listen port another process holds.
    """
    tls = settings.tls
    # Blocking (file reads, probe binds, the trust bundle and CRL): in a worker thread.
    await trio.to_thread.run_sync(check_node_start, tls, settings.listen_addresses)
    verifier = await trio.to_thread.run_sync(CertificateVerifier, tls.trust, tls.crls)
    directory = PeerDirectory()
    key_pair = _key_pair(tls.key)
    security = AdmissionTransport(key_pair, tls, directory, verifier)
    host = new_host(
        key_pair=key_pair,
        sec_opt={TLS_PROTOCOL: security},
        muxer_opt={TProtocol(YAMUX_PROTOCOL): Yamux},
        # One connection per peer (else every dial waits 250 ms); no background auto-dialing.
        connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0, low_watermark=0),
        listen_addrs=[multiaddr.Multiaddr(a) for a in settings.listen_addresses] or None,
    )
    node = Node(settings, host, directory, security, verifier)
    try:
        async with _serve_node(node, host) as served:
            yield served
    except BaseExceptionGroup as group:
        leaf = hypha_leaf(group)
        if leaf is None:
            raise
        raise leaf from group


@asynccontextmanager
async def _serve_node(node: Node, host: Any) -> AsyncIterator[Node]:
    settings = node.settings
    for protocol in (ids.API_PROTOCOL, ids.PROGRESS_PROTOCOL, ids.HEALTH_PROTOCOL):
        node.set_stream_handler(protocol, node.rpc.handle)
    node.rpc.register(m.HealthRequest, node._health)
    async with AsyncExitStack() as stack:
        listen = [multiaddr.Multiaddr(a) for a in settings.listen_addresses]
        await stack.enter_async_context(host.run(listen_addrs=listen))
        # Services before any dial: the pubsub handler crashes the run otherwise.
        gossip = ps.open_gossip(host, node.directory, hub=settings.relay_hop)
        node.gossip = await stack.enter_async_context(gossip)
        dht = KadDHT(host, DHTMode.SERVER)
        # Records are checked against our CA (and CRL) when stored, not only when read.
        node.dht = Dht(dht, node.verifier)
        await stack.enter_async_context(background_trio_service(dht))
        await _start_relay(node, host, stack)
        nursery = await stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(node._watch_revocations)
        await node._dialer.join_gateways(settings.gateway_addresses, nursery, reserve=settings.relay_circuit)
        node.healthy = True
        logger.info("node %s (%s) up at %s", node.peer_id, node.role, node.listen_addrs())
        yield node
        node.healthy = False
        nursery.cancel_scope.cancel()


async def _start_relay(node: Node, host: Any, stack: AsyncExitStack) -> None:
    s = node.settings
    limits = RelayLimits(
        duration=3600,
        data=1 << 34,
        max_circuit_conns=s.relay_max_circuits,
        max_reservations=s.relay_max_reservations,
    )
    if s.relay_hop:
        protocol = CircuitV2Protocol(host, limits, allow_hop=True)
        roles = RelayRole.HOP | RelayRole.STOP
    else:
        protocol = CircuitV2Protocol(host, limits, allow_hop=False)
        roles = RelayRole.STOP
    await stack.enter_async_context(background_trio_service(protocol))
    node._dialer.relay = CircuitV2Transport(host, protocol, RelayConfig(roles=roles, limits=limits))
