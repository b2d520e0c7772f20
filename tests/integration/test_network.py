"""Real py-libp2p nodes in one trio run on 127.0.0.1: DHT, gossip, RPC, relay, admission."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
import trio

from hypha.errors import HyphaError, NetworkError, RemoteError, RequestTimeoutError
from hypha.net.dialer import DialerStatistics
from hypha.net.rpc import read_frame
from hypha.protocol import codec, ids
from hypha.protocol import messages as m
from hypha.testing.cluster import Pki, open_test_node, wait_until


def advert(node_id: str, rid: str = "r1") -> m.WorkerRequest:
    return m.WorkerRequest(
        id=rid,
        scheduler=node_id,
        resources=m.ResourceSpec(cpu=1),
        executors=[],
        bid=1.0,
        expires_at=0.0,
    )


async def test_dht_gossip_rpc_between_nodes(pki: Pki) -> None:
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw:
        addr = gw.listen_addrs()[0]
        async with (
            open_test_node(pki, "a", "worker", gateways=[addr]) as a,
            open_test_node(pki, "b", "scheduler", gateways=[addr]) as b,
        ):
            record = m.EchoRequest(payload="a record")
            await a.dht.put("/hypha/probe/text", record)
            with trio.fail_after(10):
                assert await b.dht.get("/hypha/probe/text", m.EchoRequest) == record
            # A worker cannot announce a dataset: those records only data nodes sign.
            unsigned = m.DatasetRecord(
                name="text",
                num_slices=4,
                manifest_sha256="00" * 32,
                peer_id=a.peer_id,
                certificate=b"",
                signature=b"",
            )
            with pytest.raises(NetworkError):
                await a.dht.put(ids.dataset_key("text"), unsigned)

            async def echo(peer: str, req: m.EchoRequest) -> m.EchoResponse:
                assert peer == b.peer_id
                return m.EchoResponse(payload=req.payload.upper())

            a.rpc.register(m.EchoRequest, echo)
            assert (await b.request(a.peer_id, m.EchoRequest(payload="hi"), m.EchoResponse)).payload == "HI"

            async with a.gossip.subscribe(ids.WORKER_TOPIC, m.WorkerRequest) as sub:
                with trio.fail_after(15):
                    # Gossip meshes form asynchronously: publish a bounded number of times
                    # until the subscriber has seen one, as a real scheduler re-advertises.
                    got = None
                    for attempt in range(60):
                        await b.gossip.publish(ids.WORKER_TOPIC, advert(b.peer_id, f"r{attempt}"))
                        with trio.move_on_after(0.25):
                            got = await sub.receive()
                        if got is not None:
                            break
                assert got is not None
                assert got.origin == b.peer_id
                assert got.message.scheduler == b.peer_id


async def test_unanswered_request_is_a_network_error(pki: Pki) -> None:
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw:
        addr = gw.listen_addrs()[0]
        async with open_test_node(pki, "silent", "worker", gateways=[addr]) as silent:
            answered = trio.Event()

            async def never(peer: str, req: m.EchoRequest) -> m.EchoResponse:
                await answered.wait()  # the peer is stuck: no answer until the test ends
                return m.EchoResponse(payload="late")

            silent.rpc.register(m.EchoRequest, never)
            # Callers handle failed requests as HyphaError; a silent peer must be one too.
            with pytest.raises(HyphaError) as timed_out:
                await gw.request(
                    silent.peer_id, m.EchoRequest(payload="x"), m.EchoResponse, timeout_seconds=0.5
                )
            assert isinstance(timed_out.value, RequestTimeoutError)
            assert isinstance(timed_out.value, NetworkError)
            answered.set()
            health = await gw.request(silent.peer_id, m.HealthRequest(), m.HealthResponse)
            assert health.healthy


async def test_non_listening_node_is_reached_through_relay(pki: Pki) -> None:
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw:
        addr = gw.listen_addrs()[0]
        async with (
            open_test_node(
                pki, "natted", "worker", gateways=[addr], listen=False, relay_circuit=True
            ) as natted,
            open_test_node(pki, "caller", "scheduler", gateways=[addr]) as caller,
        ):
            assert natted.listen_addrs() == []
            assert not caller.is_connected(natted.peer_id)
            health = await caller.request(natted.peer_id, m.HealthRequest(), m.HealthResponse)
            assert health.healthy
            assert health.role == "worker"
            assert health.peer_id == natted.peer_id
            assert natted.statistics().dialer == DialerStatistics(num_gateways=1, num_reservations=1)
            assert caller.statistics().dialer == DialerStatistics(num_gateways=1, num_reservations=0)


@pytest.mark.parametrize("case", ["other_ca", "revoked", "expired"])
async def test_untrusted_peers_are_refused_both_ways(pki: Pki, tmp_path, caplog, case: str) -> None:
    caplog.set_level(logging.WARNING, logger="hypha.net.admission")
    if case == "other_ca":
        intruder_pki = Pki.create(tmp_path / "other")
        intruder_tls = intruder_pki.node("intruder", "worker")
    elif case == "revoked":
        from hypha.pki import revoke

        intruder_tls = pki.node("intruder", "worker")
        revoke(pki.root, intruder_tls.cert)
    else:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
        intruder_tls = pki.node("intruder", "worker", not_before=past - dt.timedelta(days=1), not_after=past)
    from hypha.net.host import NodeSettings, open_node

    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw:
        settings = NodeSettings(role="worker", tls=intruder_tls, listen_addresses=["/ip4/127.0.0.1/tcp/0"])
        async with open_node(settings) as intruder:
            with pytest.raises(NetworkError):
                await intruder.connect(gw.listen_addrs()[0])
            reason = {
                "other_ca": "not signed by a trusted CA",
                "revoked": "is revoked",
                "expired": "expired",
            }[case]
            refusals = [r.getMessage() for r in caplog.records if "refused inbound" in r.getMessage()]
            assert any(reason in line for line in refusals), refusals
            # The other direction: the gateway refuses to complete a dial to the intruder.
            with pytest.raises(
                NetworkError, match="refused the peer" if case != "other_ca" else "trusted CA"
            ):
                await gw.connect(intruder.listen_addrs()[0])
            assert intruder.peer_id not in gw.connected_peers()
            admission = gw.statistics().admission
            assert admission.num_refused_inbound >= 1
            assert admission.num_refused_outbound >= 1


async def test_plain_libp2p_node_is_refused(pki: Pki, caplog) -> None:
    import multiaddr
    from libp2p import new_host
    from libp2p.peer.peerinfo import info_from_p2p_addr

    caplog.set_level(logging.WARNING, logger="hypha.net.admission")
    async with open_test_node(pki, "gw", "gateway", relay_hop=True) as gw:
        plain = new_host()  # default security: Noise, TLS (self-signed), secio, plaintext
        async with plain.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with pytest.raises(Exception, match=r"."):  # library-specific error types
                await plain.connect(info_from_p2p_addr(multiaddr.Multiaddr(gw.listen_addrs()[0])))
            assert any("refused inbound" in r.getMessage() for r in caplog.records)
            plain_addr = f"{plain.get_addrs()[0]}"
            with pytest.raises(NetworkError):
                await gw.connect(plain_addr)
            assert str(plain.get_id()) not in gw.connected_peers()


async def test_malformed_and_oversized_rpc_rejected_node_keeps_serving(pki: Pki, caplog) -> None:
    caplog.set_level(logging.INFO, logger="hypha.net.rpc")
    async with (
        open_test_node(pki, "gw", "gateway", relay_hop=True) as gw,
        open_test_node(pki, "client", "worker", gateways=[gw.listen_addrs()[0]]) as client,
    ):
        cases = [
            codec.HEADER.pack(codec.PROTOCOL_VERSION, 5) + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
            codec.HEADER.pack(codec.PROTOCOL_VERSION, codec.MAX_FRAME_BYTES + 1),  # oversized
            codec.HEADER.pack(99, 1) + b"\x80",  # unknown protocol version
            codec.HEADER.pack(codec.PROTOCOL_VERSION, 3) + b"\x81\xa1k",  # truncated map
        ]
        for frame in cases:
            stream = await client.open_stream(gw.peer_id, ids.API_PROTOCOL)
            await stream.write(frame)
            with trio.fail_after(5):
                reply = await read_frame(stream)
            assert isinstance(reply, m.ErrorResponse)
            assert reply.code == "bad_request"
        assert gw.statistics().rpc.num_rejected == len(cases)
        assert sum("rejected request" in r.getMessage() for r in caplog.records) == len(cases)
        # A stream closed before its first byte is a cancelled request, not a malformed one.
        stream = await client.open_stream(gw.peer_id, ids.API_PROTOCOL)
        await stream.close()
        with trio.fail_after(5):
            await wait_until(lambda: any("abandoned" in r.getMessage() for r in caplog.records))
        assert gw.rpc.statistics().num_rejected == len(cases)
        # An unknown request kind is refused too, and the node still answers good requests.
        with pytest.raises(RemoteError, match="unsupported"):
            await client.request(gw.peer_id, m.EchoRequest(payload="x"), m.EchoResponse)
        health = await client.request(gw.peer_id, m.HealthRequest(), m.HealthResponse)
        assert health.healthy


async def test_node_without_reachable_gateway_fails_clearly(pki: Pki) -> None:
    with pytest.raises(NetworkError, match="no gateway reachable"):
        async with open_test_node(
            pki,
            "lonely",
            "worker",
            gateways=["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWFyCo6ssNX9k6b62LKZ7W2pD7gf3chgVMgaVoWMuCeFTu"],
            rpc_timeout_seconds=3,
        ):
            pass


async def test_wait_until_helper_bounded() -> None:
    flag = {"v": False}

    async def setter() -> None:
        await trio.sleep(0)
        flag["v"] = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(setter)
        with trio.fail_after(1):
            await wait_until(lambda: flag["v"])
