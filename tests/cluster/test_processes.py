"""Separate processes from generated certificates and configs find each other."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from hypha.cli.main import main
from hypha.testing.cluster import ChildNode, Pki, spawn_node, write_toml

pytestmark = pytest.mark.cluster


class PeerClient:
    """Talks to a ``hypha.testing.peer`` child over its stdin/stdout."""

    def __init__(self, child: ChildNode) -> None:
        self.child = child
        self._buffer = b""

    async def call(self, **cmd: Any) -> Any:
        assert self.child.process.stdin is not None
        assert self.child.process.stdout is not None
        await self.child.process.stdin.send_all(json.dumps(cmd).encode() + b"\n")
        while b"\n" not in self._buffer:
            chunk = await self.child.process.stdout.receive_some(65536)
            assert chunk, f"peer exited:\n{self.child.log()}"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        assert reply["ok"], reply
        return reply["result"]


def _node_config(pki: Pki, tmp: Path, name: str, role: str, **extra: Any) -> Path:
    keys = pki.config_keys(pki.node(name, role))
    return write_toml(tmp / f"{name}.toml", {**keys, **extra})


async def test_gateway_and_two_processes_dht_gossip_rpc(pki: Pki, tmp_path: Path) -> None:
    gw_cfg = _node_config(pki, tmp_path, "gw", "gateway", listen_addresses=["/ip4/127.0.0.1/tcp/0"])
    async with spawn_node(["gateway", "--config", str(gw_cfg)], tmp_path, "gw") as gw:
        cfg = {"gateway_addresses": [gw.address], "relay_circuit": False}
        a_cfg = _node_config(pki, tmp_path, "a", "worker", **cfg)
        b_cfg = _node_config(pki, tmp_path, "b", "scheduler", **cfg)
        async with (
            spawn_node(
                ["--config", str(a_cfg)],
                tmp_path,
                "a",
                module="hypha.testing.peer",
                stdin=subprocess.PIPE,
            ) as a,
            spawn_node(
                ["--config", str(b_cfg), "--role", "scheduler"],
                tmp_path,
                "b",
                module="hypha.testing.peer",
                stdin=subprocess.PIPE,
            ) as b,
        ):
            pa, pb = PeerClient(a), PeerClient(b)
            with trio.fail_after(60):
                await pa.call(op="put", key="/hypha/probe/books", value="books")
                assert await pb.call(op="get", key="/hypha/probe/books") == "books"
                assert (await pb.call(op="echo", peer=a.peer_id, payload="ping")) == f"ping from {a.peer_id}"
                await pa.call(op="subscribe")
                seen = None
                for attempt in range(40):  # bounded re-advertising while the mesh forms
                    await pb.call(op="publish", payload=f"ad{attempt}")
                    with trio.move_on_after(0.5):
                        seen = await pa.call(op="next_gossip", timeout=0.5)
                    if seen:
                        break
                assert seen is not None
                assert seen["origin"] == b.peer_id
            assert await trio.to_thread.run_sync(main, ["probe", gw.address, "--config", str(a_cfg)]) == 0


async def test_validate_reports_every_problem(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "worker.toml"
    bad.write_text(
        'cert_pem = "missing-cert.pem"\nkey_pem = "k.pem"\ntrust_pem = "t.pem"\n'
        'listen_addresses = 7\nbogus = true\n[offer]\nfloor = "low"\n'
    )
    assert main(["worker", "--config", str(bad), "--validate"]) == 2
    out = capsys.readouterr().err
    for key in ("listen_addresses", "bogus", "offer.floor"):
        assert key in out
    fixed = tmp_path / "worker2.toml"
    fixed.write_text('cert_pem = "missing-cert.pem"\nkey_pem = "k.pem"\ntrust_pem = "t.pem"\n')
    assert main(["worker", "--config", str(fixed), "--validate"]) == 2
    out = capsys.readouterr().err
    assert "cert_pem" in out
    assert "key_pem" in out
    assert "trust_pem" in out
    assert "does not exist" in out


async def test_certutil_and_init_commands(tmp_path: Path) -> None:
    assert main(["certutil", "ca", "--org", "Acme", "--out", str(tmp_path / "ca")]) == 0

    def node_cert(role: str) -> int:
        ca, out = str(tmp_path / "ca"), str(tmp_path)
        return main(["certutil", "node", "--ca", ca, "--name", "g", "--role", role, "--out", out])

    assert node_cert("gateway") == 0
    assert (tmp_path / "g-key.pem").stat().st_mode & 0o777 == 0o600
    assert node_cert("king") == 2
    assert main(["init", "gateway", "-o", str(tmp_path / "g.toml"), "--name", "g"]) == 0
    assert main(["init", "gateway", "-o", str(tmp_path / "g.toml")]) == 2  # exists
    assert main(["gateway", "--config", str(tmp_path / "g.toml"), "--validate"]) == 0
    assert (
        main(
            [
                "certutil",
                "revoke",
                "--ca",
                str(tmp_path / "ca"),
                "--cert",
                str(tmp_path / "g-cert.pem"),
            ]
        )
        == 0
    )
