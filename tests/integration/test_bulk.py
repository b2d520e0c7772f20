"""Bulk transfers between real nodes on 127.0.0.1: direct TLS, stream and relay fallbacks, refusals."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio

from hypha.errors import TransferError
from hypha.net.bulk import BulkService
from hypha.net.host import Node, NodeSettings, open_node
from hypha.net.spares import SpareFiles
from hypha.pki.ca import load_certificate
from hypha.pki.verify import CertificateVerifier, TlsFiles, bulk_ssl_context
from hypha.protocol import codec
from hypha.protocol import messages as m
from hypha.testing.cluster import Pki, open_test_node, wait_until

SIZE = 9 * 1024 * 1024 + 12345  # three 4 MiB chunks, the last partial, not a TLS record multiple


@asynccontextmanager
async def serving(node: Node, spares: SpareFiles | None = None) -> AsyncIterator[BulkService]:
    bulk = BulkService(node, backoff_seconds=0.01, idle_timeout_seconds=10, spares=spares)
    async with trio.open_nursery() as nursery:
        await nursery.start(bulk.run)
        yield bulk
        nursery.cancel_scope.cancel()


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "update.safetensors"
    path.parent.mkdir()
    path.write_bytes(os.urandom(SIZE))
    return path


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".part")]


async def settle(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        await wait_until(predicate)


def test_bulk_package_exports_what_other_packages_import() -> None:
    import hypha.net.bulk as bulk

    assert sorted(bulk.__all__) == sorted(
        ["BulkService", "BulkStatistics", "CHANGED", "CHUNK_BYTES", "STREAM_CHUNK_BYTES"]
    )
    assert all(hasattr(bulk, name) for name in bulk.__all__)


async def test_direct_transfer_is_checked_and_token_used_once(
    pki: Pki, payload: Path, tmp_path: Path
) -> None:
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        serving(a) as sender,
        serving(b) as receiver,
    ):
        offer = await sender.offer(payload, receiver=b.peer_id, purpose="update", job_id="j", round=3)
        assert offer.size == SIZE
        assert offer.address == sender.address
        assert offer.address is not None
        dest = tmp_path / "in" / "nested" / "got.safetensors"
        with trio.fail_after(20):
            assert await receiver.pull(offer, a.peer_id, dest) == dest
        assert dest.read_bytes() == payload.read_bytes()
        stats = receiver.statistics()
        assert (stats.num_direct, stats.num_relayed, stats.bytes_received) == (1, 0, SIZE)
        await settle(lambda: sender.statistics().num_direct == 1)
        assert sender.statistics().bytes_sent == SIZE
        assert sender.statistics().num_pending == 0
        # The token was consumed by the confirmed transfer: a replay is refused, without retries.
        with pytest.raises(TransferError, match="unknown"):
            await receiver.pull(offer, a.peer_id, tmp_path / "in" / "again.bin")
        assert receiver.statistics().num_retries == 0
        assert receiver.statistics().num_failed == 1
        assert leftovers(dest.parent) == []
        assert not (tmp_path / "in" / "again.bin").exists()


@pytest.mark.parametrize("channel", ["direct", "stream"])
async def test_pull_overwrites_a_recycled_file_exactly(
    pki: Pki, payload: Path, tmp_path: Path, channel: str
) -> None:
    spares = SpareFiles(tmp_path / "in" / "spare", max_bytes=1 << 30)
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        serving(a) as sender,
        serving(b, spares) as receiver,
    ):
        if channel == "stream":
            await b.connect(a.listen_addrs()[0])
        # A used file longer than the next transfer, with other bytes in it.
        used = tmp_path / "in" / "applied-update.safetensors"
        used.write_bytes(b"\xff" * (SIZE + 5000))
        receiver.recycle(used)
        assert not used.exists()
        offer = await sender.offer(payload, receiver=b.peer_id, purpose="update")
        if channel == "stream":
            offer = msgspec.structs.replace(offer, address=None)
        dest = tmp_path / "in" / "got.safetensors"
        with trio.fail_after(20):
            await receiver.pull(offer, a.peer_id, dest)
        assert dest.read_bytes() == payload.read_bytes()  # overwritten and cut to size
        assert receiver.statistics().num_reused == 1
        assert spares.statistics().num_bytes == 0
        # With no spare left, the next pull writes a new file.
        again = await sender.offer(payload, receiver=b.peer_id, purpose="update")
        if channel == "stream":
            again = msgspec.structs.replace(again, address=None)
        with trio.fail_after(20):
            await receiver.pull(again, a.peer_id, tmp_path / "in" / "new.safetensors")
        assert (tmp_path / "in" / "new.safetensors").read_bytes() == payload.read_bytes()
        assert receiver.statistics().num_reused == 1
        assert leftovers(dest.parent) == []


@pytest.mark.parametrize("channel", ["direct", "stream"])
async def test_unknown_token_is_refused(pki: Pki, payload: Path, tmp_path: Path, channel: str) -> None:
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        serving(a) as sender,
        serving(b) as receiver,
    ):
        offer = await sender.offer(payload, receiver=b.peer_id, purpose="weights")
        if channel == "stream":
            offer = msgspec.structs.replace(offer, address=None)
            await b.connect(a.listen_addrs()[0])
        forged = msgspec.structs.replace(offer, token="0" * 32)
        with pytest.raises(TransferError, match="unknown"):
            await receiver.pull(forged, a.peer_id, tmp_path / "forged.bin")
        await settle(lambda: sender.statistics().num_refused == 1)
        assert not (tmp_path / "forged.bin").exists()
        # The real token still works, over the same channel.
        with trio.fail_after(20):
            await receiver.pull(offer, a.peer_id, tmp_path / "real.bin")
        assert (tmp_path / "real.bin").read_bytes() == payload.read_bytes()
        stats = receiver.statistics()
        assert (stats.num_direct, stats.num_relayed) == ((1, 0) if channel == "direct" else (0, 1))


async def test_non_listening_sender_is_pulled_through_relay(pki: Pki, tmp_path: Path) -> None:
    payload = tmp_path / "small.bin"  # the relay moves about 7 MB/s
    payload.write_bytes(os.urandom(1024 * 1024 + 7))
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw:
        addr = gw.listen_addrs()[0]
        async with (
            open_test_node(
                pki, "natted", "worker", gateways=[addr], listen=False, relay_circuit=True
            ) as natted,
            open_test_node(pki, "caller", "scheduler", gateways=[addr]) as caller,
            serving(natted) as sender,
            serving(caller) as receiver,
        ):
            assert sender.address is None
            offer = await sender.offer(payload, receiver=caller.peer_id, purpose="update")
            assert offer.address is None
            with trio.fail_after(30):
                await receiver.pull(offer, natted.peer_id, tmp_path / "relayed.bin")
            assert (tmp_path / "relayed.bin").read_bytes() == payload.read_bytes()
            stats = receiver.statistics()
            assert (stats.num_direct, stats.num_relayed, stats.bytes_received) == (0, 1, 1024 * 1024 + 7)
            await settle(lambda: sender.statistics().num_relayed == 1)


async def test_empty_file_on_both_channels_and_withdrawn_offer(pki: Pki, tmp_path: Path) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        serving(a) as sender,
        serving(b) as receiver,
    ):
        await b.connect(a.listen_addrs()[0])
        for name, direct in (("direct.bin", True), ("stream.bin", False)):
            offer = await sender.offer(empty, receiver=b.peer_id, purpose="file")
            if not direct:
                offer = msgspec.structs.replace(offer, address=None)
            with trio.fail_after(20):
                await receiver.pull(offer, a.peer_id, tmp_path / name)
            assert (tmp_path / name).read_bytes() == b""
        assert (receiver.statistics().num_direct, receiver.statistics().num_relayed) == (1, 1)
        offer = await sender.offer(empty, receiver=b.peer_id, purpose="file")
        assert sender.withdraw(offer.transfer_id)
        assert not sender.withdraw(offer.transfer_id)
        with pytest.raises(TransferError, match="unknown"):
            await receiver.pull(offer, a.peer_id, tmp_path / "withdrawn.bin")


def foreign_tls(pki: Pki, tmp_path: Path, name: str) -> TlsFiles:
    """Credentials from another CA that nevertheless trust our CA (the worst case for us)."""
    other = Pki.create(tmp_path / f"other-{name}").node(name, "worker")
    return TlsFiles(cert=other.cert, key=other.key, trust=pki.root / "ca-cert.pem", crls=None)


def raw_pull(files: TlsFiles, address: str, offer: m.TensorOffer) -> bytes:
    """A hand-written client: TLS handshake, send the stolen token, read what comes back."""
    host, _, port = address.rpartition(":")
    ctx = bulk_ssl_context(files, server_side=False)
    request = codec.encode_frame(m.StreamPullRequest(transfer_id=offer.transfer_id, token=offer.token))
    # TLS 1.3: the client's handshake ends before the server has judged its certificate.
    with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(request)
        return tls.recv(1 << 16)


async def test_intruder_from_another_ca_cannot_pull_over_direct_tls(
    pki: Pki, payload: Path, tmp_path: Path
) -> None:
    intruder = foreign_tls(pki, tmp_path, "intruder")
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        serving(a) as sender,
        serving(b) as receiver,
    ):
        offer = await sender.offer(payload, receiver=b.peer_id, purpose="update")
        assert offer.address is not None
        try:
            reply = await trio.to_thread.run_sync(raw_pull, intruder, offer.address, offer)
        except OSError:  # ssl.SSLError (alert: unknown CA) or a reset: the handshake was refused
            reply = b""
        assert reply == b""
        await settle(lambda: sender.statistics().num_refused == 1)
        assert sender.statistics().bytes_sent == 0
        with trio.fail_after(20):
            await receiver.pull(offer, a.peer_id, tmp_path / "ok.bin")
        assert receiver.statistics().num_direct == 1


@pytest.mark.parametrize("impostor", ["other_ca", "other_peer"])
async def test_receiver_never_gives_its_token_to_an_impostor_listener(
    pki: Pki, payload: Path, tmp_path: Path, impostor: str
) -> None:
    if impostor == "other_ca":
        settings = NodeSettings(role="worker", tls=foreign_tls(pki, tmp_path, "impostor"))
        opened = open_node(settings)
    else:
        opened = open_test_node(pki, "c", "worker")
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        opened as c,
        serving(a) as sender,
        serving(b) as receiver,
        serving(c) as fake,
    ):
        offer = await sender.offer(payload, receiver=b.peer_id, purpose="update")
        hijacked = msgspec.structs.replace(offer, address=fake.address)
        await b.connect(a.listen_addrs()[0])
        with trio.fail_after(20):
            await receiver.pull(hijacked, a.peer_id, tmp_path / "got.bin", attempts=1)
        # The direct channel was refused by the receiver; the stream to the real sender worked.
        assert (tmp_path / "got.bin").read_bytes() == payload.read_bytes()
        assert (receiver.statistics().num_direct, receiver.statistics().num_relayed) == (0, 1)
        await settle(lambda: fake.statistics().num_refused == 1)


async def test_peer_id_mismatch_is_refused(pki: Pki, payload: Path, tmp_path: Path) -> None:
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        open_test_node(pki, "c", "worker") as c,
        serving(a) as sender,
        serving(b) as receiver,
        serving(c) as thief,
    ):
        offer = await sender.offer(payload, receiver=b.peer_id, purpose="update")
        with pytest.raises(TransferError, match="another peer"):
            await thief.pull(offer, a.peer_id, tmp_path / "stolen.bin")
        assert (thief.statistics().num_failed, thief.statistics().num_retries) == (1, 0)
        assert sender.statistics().num_refused == 1
        assert not (tmp_path / "stolen.bin").exists()
        with trio.fail_after(20):
            await receiver.pull(offer, a.peer_id, tmp_path / "ok.bin")
        assert (tmp_path / "ok.bin").read_bytes() == payload.read_bytes()


async def test_changed_file_fails_after_retries_and_keeps_the_offer(
    pki: Pki, payload: Path, tmp_path: Path
) -> None:
    async with (
        open_test_node(pki, "a", "worker") as a,
        open_test_node(pki, "b", "worker") as b,
        serving(a) as sender,
        serving(b) as receiver,
    ):
        offer = await sender.offer(payload, receiver=b.peer_id, purpose="update")
        with payload.open("r+b") as f:  # same size, one byte flipped after the offer
            f.seek(SIZE // 2)
            byte = f.read(1)
            f.seek(SIZE // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        dest = tmp_path / "in" / "got.bin"
        with trio.fail_after(20), pytest.raises(TransferError, match="sha256 mismatch"):
            await receiver.pull(offer, a.peer_id, dest, attempts=3)
        stats = receiver.statistics()
        assert (stats.num_retries, stats.num_failed, stats.bytes_received) == (2, 1, 0)
        assert not dest.exists()
        assert leftovers(dest.parent) == []
        # Unconfirmed transfers do not consume the token.
        assert sender.statistics().num_pending == 1
        assert sender.statistics().bytes_sent == 0
        # A file whose size changed is refused outright.
        with payload.open("ab") as f:
            f.write(b"more")
        with pytest.raises(TransferError, match="changed"):
            await receiver.pull(offer, a.peer_id, dest, attempts=3)
        assert receiver.statistics().num_retries == 2


async def test_cancelled_pull_stops_its_threads_and_leaves_nothing(pki: Pki, tmp_path: Path) -> None:
    """A sender that stalls after the go frame: cancelling the pull unblocks the thread."""
    stall = pki.node("stall", "worker")
    stall_id = CertificateVerifier(stall.trust).verify(load_certificate(stall.cert))[0].peer_id
    ctx = bulk_ssl_context(stall, server_side=True)
    listener = socket.create_server(("127.0.0.1", 0))
    went, closed = threading.Event(), threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1 << 16)  # the StreamPullRequest
            tls.sendall(codec.encode_frame(m.TransferDone(transfer_id="t1", ok=True)) + b"x" * 1000)
            went.set()
            with contextlib.suppress(OSError):
                while tls.recv(1 << 16):  # until the receiver's socket is shut down
                    pass
            closed.set()

    offer = m.TensorOffer(
        transfer_id="t1",
        purpose="file",
        size=64 * 1024 * 1024,
        sha256="0" * 64,
        token="t" * 32,
        address=f"127.0.0.1:{listener.getsockname()[1]}",
    )
    dest = tmp_path / "in" / "never.bin"
    async with (
        open_test_node(pki, "b", "worker") as b,
        serving(b) as receiver,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(trio.to_thread.run_sync, serve)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(receiver.pull, offer, stall_id, dest)
                with trio.fail_after(10):
                    await trio.to_thread.run_sync(went.wait, abandon_on_cancel=True)
                scope.cancel()
        with trio.fail_after(10):
            await trio.to_thread.run_sync(closed.wait, abandon_on_cancel=True)
    listener.close()
    assert scope.cancelled_caught
    assert not dest.exists()
    assert leftovers(dest.parent) == []
