"""A scriptable node for cross-process tests: ``python -m hypha.testing.peer``.

It joins the network with a worker-style config, writes its ready file, then reads one JSON
command per line on stdin (put, get, subscribe, next_gossip, publish, echo, health) and
answers one JSON line on stdout each. Tests use it to make separate processes talk through
the real network; it is not part of any role.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from hypha.config import load_config
from hypha.errors import HyphaError
from hypha.local.logs import init_logging
from hypha.net.host import Node
from hypha.net.pubsub import Received
from hypha.net.runner import run_node, settings_from_config
from hypha.protocol import ids
from hypha.protocol import messages as m


async def _serve_commands(node: Node) -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    inbox_send, inbox = trio.open_memory_channel[Received[m.WorkerRequest]](64)

    async with trio.open_nursery() as nursery:

        async def subscribe(ready: trio.Event) -> None:
            async with node.gossip.subscribe(ids.WORKER_TOPIC, m.WorkerRequest) as sub:
                ready.set()
                async for item in sub:
                    await inbox_send.send(item)

        async def run(cmd: dict[str, Any]) -> Any:
            op = cmd["op"]
            if op == "put":  # any record but a dataset's (those only data nodes may sign)
                await node.dht.put(cmd["key"], m.EchoRequest(payload=cmd["value"]))
                return None
            if op == "get":
                got = await node.dht.get(cmd["key"], m.EchoRequest)
                return got.payload if got else None
            if op == "subscribe":
                ready = trio.Event()
                nursery.start_soon(subscribe, ready)
                await ready.wait()
                return None
            if op == "next_gossip":
                item = await inbox.receive()
                return {"origin": item.origin, "id": item.message.id}
            if op == "publish":
                msg = m.WorkerRequest(
                    id=cmd["payload"],
                    scheduler=node.peer_id,
                    resources=m.ResourceSpec(),
                    executors=[],
                    bid=0.0,
                    expires_at=0.0,
                )
                await node.gossip.publish(ids.WORKER_TOPIC, msg)
                return None
            if op == "echo":
                r = await node.request(cmd["peer"], m.EchoRequest(payload=cmd["payload"]), m.EchoResponse)
                return r.payload
            if op == "health":
                h = await node.request(cmd["peer"], m.HealthRequest(), m.HealthResponse)
                return {"healthy": h.healthy, "role": h.role}
            raise ValueError(f"unknown op {op}")

        while True:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                nursery.cancel_scope.cancel()
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                cmd = json.loads(line)
                try:
                    with trio.fail_after(float(cmd.get("timeout", 20))):
                        reply = {"ok": True, "result": await run(cmd)}
                except (HyphaError, ValueError, trio.TooSlowError) as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                await trio.to_thread.run_sync(_write_line, json.dumps(reply))


def _write_line(line: str) -> None:
    """One answer on stdout (a pipe to the test, which may be slow to read: blocking)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--role", default="worker")
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args()
    init_logging(f"peer-{args.role}")
    config = load_config(args.role, args.config)

    async def body(node: Node, nursery: trio.Nursery) -> None:
        async def echo(peer: str, req: m.EchoRequest) -> m.EchoResponse:
            return m.EchoResponse(payload=f"{req.payload} from {node.peer_id}")

        node.rpc.register(m.EchoRequest, echo)
        nursery.start_soon(_serve_commands, node)

    trio.run(lambda: run_node(settings_from_config(args.role, config), body, ready_file=args.ready_file))


if __name__ == "__main__":
    main()
