"""The network layer against peers that misuse it, with real nodes and sockets on 127.0.0.1.

Idle sockets on the bulk listener (no certificate needed to open one) must not hold its
worker threads or outlive the handshake deadline; a peer whose certificate is revoked loses
its live connection, its requests and its leases; one peer's many slow request bodies are
refused past its budget while other peers are still served.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from hypha.errors import NetworkError, RemoteError
from hypha.net.bulk import BulkService
from hypha.net.bulk.direct import DirectChannel
from hypha.net.bulk.gate import HandshakeGate
from hypha.net.bulk.offers import Offers
from hypha.net.bulk.stats import Counters
from hypha.net.host import Node
from hypha.net.rpc import PEER_BUDGET_BYTES
from hypha.pki import CertificateVerifier, revoke
from hypha.protocol import codec, codes, ids
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.testing.cluster import Pki, open_test_node, wait_until
from hypha.worker.leases import WorkerLeases

OTHER_HOST = "127.0.0.2"
"""Idle sockets come from here, the real peers from 127.0.0.1: two hosts for the per-host cap."""


@asynccontextmanager
async def serving(
    node: Node, *, idle_timeout_seconds: float = 10.0, max_handshakes_per_host: int = 16
) -> AsyncIterator[BulkService]:
    bulk = BulkService(
        node,
        backoff_seconds=0.01,
        idle_timeout_seconds=idle_timeout_seconds,
        max_handshakes_per_host=max_handshakes_per_host,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(bulk.run)
        yield bulk
        nursery.cancel_scope.cancel()


async def idle_socket(address: str, source: str = OTHER_HOST) -> trio.socket.SocketType:
    """A TCP connection to ``address`` (``host:port``) that never says anything."""
    host, _, port = address.rpartition(":")
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect((host, int(port)))
    return sock


async def closed_by_peer(sock: trio.socket.SocketType) -> bool:
    try:
        return await sock.recv(1) == b""
    except ConnectionResetError:
        return True


async def test_idle_sockets_hold_no_thread_and_end_at_the_handshake_deadline(
    autojump_clock: trio.testing.MockClock, pki: Pki
) -> None:
    files = await trio.to_thread.run_sync(pki.node, "sender", "worker")
    counters = Counters()
    limiter = trio.CapacityLimiter(8)
    gate = HandshakeGate(counters, max_handshakes=64, max_per_host=16)
    verifier = CertificateVerifier(files.trust, files.crls)
    channel = DirectChannel(
        files, verifier, Offers(counters), limiter, 30.0, gate=gate, handshake_timeout_seconds=5.0
    )
    async with trio.open_nursery() as nursery:
        address = await nursery.start(channel.serve, "127.0.0.1", "127.0.0.1")
        start = trio.current_time()
        idle = [await idle_socket(address) for _ in range(12)]  # more than the 8 threads
        await idle[0].send(b"\x16\x03\x01")  # a TLS record begun, never finished
        with trio.fail_after(60):
            await wait_until(lambda: len(gate) == 12)
        assert limiter.borrowed_tokens == 0  # waiting for them takes no worker thread
        with trio.fail_after(60):
            await wait_until(lambda: counters.num_handshake_timeouts == 12)
        assert 5.0 <= trio.current_time() - start < 5.5  # the deadline, not the 30 s idle one
        assert len(gate) == 0
        assert counters.num_handshakes_refused == 0
        for sock in idle:
            assert await closed_by_peer(sock)
            sock.close()
        nursery.cancel_scope.cancel()


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "update.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(1 << 20))
    return path


async def test_pull_goes_direct_while_idle_sockets_outnumber_the_threads(
    pki: Pki, payload: Path, tmp_path: Path
) -> None:
    # The sender lets a transfer stall for 30 s; the receiver gives a handshake 5 s. Idle
    # sockets that held the sender's threads would make the receiver give up on the direct
    # channel, and the stream fallback has no connection to use: the pull would fail.
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        serving(a, idle_timeout_seconds=30.0) as sender,
        serving(b, idle_timeout_seconds=5.0) as receiver,
    ):
        offer = await sender.offer(payload, receiver=b.peer_id, purpose="update")
        assert offer.address is not None
        idle = [await idle_socket(offer.address) for _ in range(16)]  # twice the 8 threads
        with trio.fail_after(30):
            await wait_until(lambda: sender.statistics().num_handshaking == 16)
        with trio.fail_after(60):  # a hang guard only
            await receiver.pull(offer, a.peer_id, tmp_path / "got.bin")
        assert (tmp_path / "got.bin").read_bytes() == payload.read_bytes()
        stats = receiver.statistics()
        assert (stats.num_direct, stats.num_relayed) == (1, 0)  # not the stream fallback
        for sock in idle:
            sock.close()


async def test_connections_past_the_per_host_cap_are_closed_at_once(
    pki: Pki, payload: Path, tmp_path: Path
) -> None:
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        serving(a, max_handshakes_per_host=2) as sender,
        serving(b) as receiver,
    ):
        offer = await sender.offer(payload, receiver=b.peer_id, purpose="update")
        assert offer.address is not None
        idle = [await idle_socket(offer.address) for _ in range(5)]
        with trio.fail_after(30):
            await wait_until(lambda: sender.statistics().num_handshakes_refused == 3)
        assert sender.statistics().num_handshaking == 2
        with trio.fail_after(30):
            closed = [await closed_by_peer(sock) for sock in idle[2:]]
        assert closed == [True, True, True]
        # Another host's connections are not capped by this one's: the pull goes direct.
        with trio.fail_after(60):
            await receiver.pull(offer, a.peer_id, tmp_path / "got.bin")
        assert receiver.statistics().num_direct == 1
        for sock in idle:
            sock.close()
        with trio.fail_after(30):
            await wait_until(lambda: sender.statistics().num_handshaking == 0)


async def test_revoked_peer_is_cut_its_requests_refused_and_its_leases_ended(pki: Pki) -> None:
    async with (
        open_test_node(pki, "w", "worker") as worker,
        open_test_node(pki, "s", "scheduler") as sched,
        open_test_node(pki, "t", "scheduler") as other,
    ):
        leases = WorkerLeases(worker, Resources(cpu=2, memory=2))
        ended: list[tuple[str, str]] = []
        revoked: list[str] = []

        async def on_end(lease_id: str, reason: str) -> None:
            ended.append((lease_id, reason))

        async def on_revoked(peer: str) -> None:
            revoked.append(peer)

        leases.on_lease_end(on_end)
        worker.on_peer_revoked(on_revoked)
        async with trio.open_nursery() as nursery:
            await nursery.start(leases.run)
            for holder, lease_id in ((sched, "l1"), (other, "l2")):
                await holder.connect(worker.listen_addrs()[0])
                leases.ledger.reserve(lease_id, holder.peer_id, Resources(cpu=1, memory=1), 5.0)
                leases.ledger.promote(lease_id, holder.peer_id, 60.0)
                leases.remember_duration(lease_id, 60.0)
            leases.changed()
            renewal = m.RenewLeaseRequest(lease_id="l1")
            assert isinstance(await sched.request(worker.peer_id, renewal, m.LeaseRenewed), m.LeaseRenewed)

            await trio.to_thread.run_sync(revoke, pki.root, sched.settings.tls.cert)
            with trio.fail_after(30):
                await wait_until(lambda: not worker.is_connected(sched.peer_id) and ended and revoked)
            assert ended == [("l1", "the holder's certificate was revoked")]
            assert revoked == [sched.peer_id]
            assert leases.ledger.get("l1") is None
            assert leases.ledger.get("l2") is not None  # the other holder's lease is untouched
            assert leases.statistics().num_revoked == 1
            assert worker.statistics().num_revoked_peers == 1
            # The revoked peer cannot come back: the handshake refuses it now.
            with pytest.raises(NetworkError):
                await sched.request(worker.peer_id, renewal, m.LeaseRenewed)
            assert not worker.is_connected(sched.peer_id)
            health = await other.request(worker.peer_id, m.HealthRequest(), m.HealthResponse)
            assert health.healthy
            nursery.cancel_scope.cancel()


async def test_requests_of_a_revoked_peer_are_refused_on_its_live_connection(pki: Pki) -> None:
    async with open_test_node(pki, "a", "worker") as a, open_test_node(pki, "b", "worker") as b:
        await b.connect(a.listen_addrs()[0])
        assert (await b.request(a.peer_id, m.HealthRequest(), m.HealthResponse)).healthy
        a.directory.mark_revoked(b.peer_id)  # what the CRL watcher does before it disconnects
        with pytest.raises(RemoteError, match="revoked") as refused:
            await b.request(a.peer_id, m.HealthRequest(), m.HealthResponse)
        assert refused.value.code == codes.FORBIDDEN
        assert a.is_connected(b.peer_id)  # refused on the open connection, not by a handshake
        assert a.statistics().rpc.num_revoked == 1


async def test_slow_bodies_past_a_peers_budget_are_refused_and_others_served(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hypha.net.rpc")
    async with (
        open_test_node(pki, "server", "worker", rpc_timeout_seconds=60) as server,
        open_test_node(pki, "flood", "worker") as flood,
        open_test_node(pki, "other", "worker") as other,
    ):
        for peer in (flood, other):
            await peer.connect(server.listen_addrs()[0])
        num_streams = 12
        num_admitted = PEER_BUDGET_BYTES // codec.MAX_FRAME_BYTES
        # Each stream announces the largest body, sends a little of it, then stalls.
        begun = codec.HEADER.pack(codec.PROTOCOL_VERSION, codec.MAX_FRAME_BYTES) + b"\x00" * 1000
        streams = []
        for _ in range(num_streams):
            stream = await flood.open_stream(server.peer_id, ids.API_PROTOCOL)
            await stream.write(begun)
            streams.append(stream)
        with trio.fail_after(30):
            await wait_until(lambda: server.rpc.statistics().num_over_budget == num_streams - num_admitted)
        stats = server.rpc.statistics()
        assert stats.num_bytes_reading == num_admitted * codec.MAX_FRAME_BYTES  # never more
        over = sum("refused a" in r.getMessage() for r in caplog.records if r.name == "hypha.net.rpc")
        assert over == 1  # logged once, not once per refusal
        # Another peer is served; the flooding one is at its budget, so refused at once.
        assert (await other.request(server.peer_id, m.HealthRequest(), m.HealthResponse)).healthy
        with pytest.raises(RemoteError) as refused:
            await flood.request(server.peer_id, m.HealthRequest(), m.HealthResponse)
        assert refused.value.code == codes.TOO_MANY_BYTES
        assert server.rpc.statistics().num_over_budget == num_streams - num_admitted + 1
        # Once its bodies end, the flooding peer's budget is free again.
        for stream in streams:
            await stream.reset()
        with trio.fail_after(30):
            await wait_until(lambda: server.rpc.statistics().num_bytes_reading == 0)
        assert (await flood.request(server.peer_id, m.HealthRequest(), m.HealthResponse)).healthy
