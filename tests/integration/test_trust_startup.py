"""Start-up refuses broken set-ups: a key that is not the certificate's, a port already taken.

In-process nodes show ``open_node``'s own checks (``net/startup.py``); child processes show
what an operator sees: exit code 2, one error line naming the files or the address, and no
ready file (nothing listens, so nothing half-works).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from hypha.errors import ConfigError, JobError
from hypha.net.host import NodeSettings, open_node
from hypha.pki import TlsFiles
from hypha.testing.cluster import Pki, open_test_node, spawn_node, write_toml


def _port(address: str) -> int:
    parts = address.split("/")
    return int(parts[parts.index("tcp") + 1])


async def refused_start(config: Path, tmp_path: Path, name: str) -> str:
    """Start gateway ``name`` from ``config``, which must refuse to start; return the error.

    A refused start is exit code 2 with an error line and no traceback, and no ready file.
    """
    with pytest.raises(JobError) as info:
        async with spawn_node(["gateway", "--config", str(config)], tmp_path, name):
            pytest.fail(f"{name} came up")
    message = str(info.value)
    assert f"{name} exited with 2" in message
    assert "Traceback" not in message
    assert not (tmp_path / f"{name}.ready.json").exists()
    return message


async def test_open_node_refuses_a_key_that_is_not_the_certificates(pki: Pki) -> None:
    mine, other = pki.node("a", "worker"), pki.node("b", "worker")
    crossed = TlsFiles(cert=mine.cert, key=other.key, trust=mine.trust, crls=mine.crls)
    with pytest.raises(ConfigError, match="does not belong to cert_pem") as info:
        async with open_node(NodeSettings(role="worker", tls=crossed)):
            pytest.fail("the node started")
    assert str(other.key) in str(info.value)
    assert str(mine.cert) in str(info.value)


async def test_open_node_refuses_a_port_a_node_or_a_program_holds(pki: Pki) -> None:
    async with open_test_node(pki, "first", "gateway", relay_hop=True) as first:
        # py-libp2p listens with SO_REUSEPORT: without the probe, this second node would
        # listen on the same port and take half of the first one's connections.
        taken = f"/ip4/127.0.0.1/tcp/{_port(first.listen_addrs()[0])}"
        settings = NodeSettings(role="gateway", tls=pki.node("second", "gateway"), listen_addresses=[taken])
        with pytest.raises(ConfigError, match=f"{taken}: TCP port .* is already in use"):
            async with open_node(settings):
                pytest.fail("a second node listens on a taken port")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        held = f"/ip4/127.0.0.1/tcp/{listeners[0].socket.getsockname()[1]}"
        settings = NodeSettings(role="worker", tls=pki.node("third", "worker"), listen_addresses=[held])
        with pytest.raises(ConfigError, match="is already in use"):
            async with open_node(settings):
                pytest.fail("a node listens on a port another program holds")
    finally:
        for listener in listeners:
            await listener.aclose()


@pytest.mark.cluster
async def test_a_gateway_with_another_nodes_key_exits_without_a_ready_file(pki: Pki, tmp_path: Path) -> None:
    mine, other = pki.node("gw", "gateway"), pki.node("other", "gateway")
    keys = {**pki.config_keys(mine), "key_pem": str(other.key)}
    config = write_toml(tmp_path / "gw.toml", {**keys, "listen_addresses": ["/ip4/127.0.0.1/tcp/0"]})
    message = await refused_start(config, tmp_path, "gw")
    assert f"key_pem {other.key} does not belong to cert_pem {mine.cert}" in message


@pytest.mark.cluster
async def test_a_second_gateway_on_a_taken_port_exits_without_a_ready_file(pki: Pki, tmp_path: Path) -> None:
    def config(name: str, listen: str) -> Path:
        keys = pki.config_keys(pki.node(name, "gateway"))
        return write_toml(tmp_path / f"{name}.toml", {**keys, "listen_addresses": [listen]})

    first_config = config("gw1", "/ip4/127.0.0.1/tcp/0")
    async with spawn_node(["gateway", "--config", str(first_config)], tmp_path, "gw1") as first:
        taken = f"/ip4/127.0.0.1/tcp/{_port(first.address)}"
        message = await refused_start(config("gw2", taken), tmp_path, "gw2")
        assert f"listen_addresses: {taken}: TCP port {_port(taken)} is already in use" in message
        assert first.process.returncode is None  # the first one is untouched
