"""Benchmark of bulk transfer: raw TCP, a bare TLS 1.3 loop, our bulk path, py-libp2p, the relay.

Every mode moves bytes from a sender process to this (receiver) process on 127.0.0.1, in one run:

- ``raw_tcp``: blocking sockets, 4 MiB ``sendall`` from memory, ``recv_into`` a 4 MiB buffer.
- ``tls_loop``: the same loop on TLS 1.3 sockets of the standard ``ssl`` module, with the
  bulk channel's contexts and certificates: the practical limit of one encrypted stream.
- ``bulk``: ``BulkService.pull`` of an offered file over the direct TLS channel (connect,
  handshake, peer check, file read, sha256 and write to a new file, rename, confirmation).
- ``bulk_recycled``: the same pull into a spare file (``net/spares.py``) the previous pull of
  that size left, as a worker overwrites evicted slices and applied updates.
- ``libp2p_stream``: bytes on one py-libp2p stream (TLS, Yamux) between two Hypha nodes.
- ``bulk_stream``: ``BulkService.pull`` forced onto the libp2p stream fallback (no relay).
- ``relay``: ``BulkService.pull`` from a node that does not listen, through a gateway's relay
  (a third process).
- ``tls_sha_file`` (largest size only): the TLS loop that also hashes and writes each 4 MiB
  to a new file, in one thread: the bulk receiver's work without its protocol.

Modes that write a new file start after a pause (``SETTLE_SECONDS``) and the order rotates
per repetition: on this VM a file's cost depends on how recently memory was freed (see
``SETTLE_SECONDS``), so every mode gets the same, cold, start. Reported per mode: the median
MB/s and the CPU seconds per GiB of each side, plus the receiver's costs measured alone
(sha256, writing a new file cold and warm, overwriting a cached one), and what those CPU
figures allow on this machine's cores (``cpu_budget``).

    python bench/bulk_transfer.py [--sizes-mib 256 1024] [--repeat 3] [--libp2p-mib 64] [--relay-mib 16]

Writes ``bench/results/bulk_transfer.json``; headline: bulk MB/s over tls_loop MB/s at 1 GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

from hypha.net.bulk import BulkService
from hypha.net.host import NodeSettings, open_node
from hypha.net.rpc import Stream, read_exactly
from hypha.net.spares import SpareFiles
from hypha.pki.verify import bulk_ssl_context
from hypha.protocol import messages as m
from hypha.testing.benchmarks import machine, write_result
from hypha.testing.cluster import Pki

RESULTS = Path(__file__).resolve().parent / "results" / "bulk_transfer.json"
CHUNK = 4 * 1024 * 1024
STREAM_CHUNK = 1024 * 1024
MIB = 1024 * 1024
BENCH_PROTOCOL = "/hypha-bench/stream/1"
WARMUP_MIB = 64
SETTLE_SECONDS = 3.0
"""Pause before each mode that writes a new file. This VM (Firecracker, free page reporting)
hands freed guest memory back to the host about 2 s after it is freed; a file written right
after another was deleted reuses warm pages and runs about 10x faster than one written later.
The pause makes every such mode start cold, as a transfer after idle time would."""
FILE_MODES = ("bulk", "bulk_recycled", "tls_sha_file", "bulk_stream", "relay")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")
    sys.stdout.flush()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("peer closed")
        data += chunk
    return data


# --- child processes -------------------------------------------------------------------


def run_socket_sender(args: argparse.Namespace) -> None:
    """Serve raw TCP and TLS: read an 8-byte size, send that many bytes from memory."""
    ctx = bulk_ssl_context(Pki(Path(args.pki)).node("sock-sender", "worker"), server_side=True)
    payload = memoryview(os.urandom(CHUNK))

    def serve(listener: socket.socket, tls: bool) -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                sock = ctx.wrap_socket(conn, server_side=True) if tls else conn
                remaining = int.from_bytes(recv_exactly(sock, 8), "big")
                while remaining > 0:
                    num = min(CHUNK, remaining)
                    sock.sendall(payload[:num])
                    remaining -= num
                sock.recv(1)  # until the receiver closes

    ports = {}
    for name, tls in (("raw_port", False), ("tls_port", True)):
        listener = socket.create_server(("127.0.0.1", 0))
        ports[name] = listener.getsockname()[1]
        threading.Thread(target=serve, args=(listener, tls), daemon=True).start()
    emit(ports)
    for line in sys.stdin:
        if json.loads(line)["cmd"] == "cpu":
            emit({"cpu": cpu_seconds()})


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            chunk = os.urandom(CHUNK)
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


async def run_node_sender(args: argparse.Namespace) -> None:
    """A Hypha node with a BulkService, offering files of the given sizes on request."""
    listen = [] if args.no_listen else ["/ip4/127.0.0.1/tcp/0"]
    settings = NodeSettings(
        role="gateway" if args.gateway_role else "worker",
        tls=Pki(Path(args.pki)).node(args.name, "gateway" if args.gateway_role else "worker"),
        listen_addresses=listen,
        gateway_addresses=list(args.gateway),
        relay_hop=args.gateway_role,
        relay_circuit=args.no_listen,
        rpc_timeout_seconds=30,
    )
    payload = os.urandom(STREAM_CHUNK)

    async def serve_stream(stream: Stream, peer: str) -> None:
        remaining = int.from_bytes(await read_exactly(stream, 8), "big")
        while remaining > 0:
            num = min(STREAM_CHUNK, remaining)
            await stream.write(payload if num == STREAM_CHUNK else payload[:num])
            remaining -= num
        await stream.read(1)  # until the receiver closes

    workdir = Path(args.workdir)
    files: dict[int, tuple[Path, str]] = {}
    for size_mib in [] if args.gateway_role else sorted(set(args.sizes_mib)):
        path = workdir / f"{args.name}-{size_mib}.bin"
        files[size_mib] = (path, await trio.to_thread.run_sync(make_file, path, size_mib * MIB))
    async with open_node(settings) as node, trio.open_nursery() as nursery:
        bulk = BulkService(node)
        await nursery.start(bulk.run)
        node.set_stream_handler(BENCH_PROTOCOL, serve_stream)
        emit({"peer_id": node.peer_id, "addrs": node.listen_addrs()})
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["cmd"] == "cpu":
                emit({"cpu": cpu_seconds()})
            elif cmd["cmd"] == "offer":
                path, sha = files[cmd["size_mib"]]
                offer = await bulk.offer(path, receiver=cmd["receiver"], purpose="file", sha256=sha)
                emit({"offer": msgspec.to_builtins(offer)})
        nursery.cancel_scope.cancel()


class Child:
    """A child process of this script, spoken to by JSON lines on stdin/stdout."""

    def __init__(self, workdir: Path, name: str, args: list[str]) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        command = [sys.executable, __file__, "--name", name, "--workdir", str(workdir), *args]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
            )

    async def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        with trio.fail_after(120):
            line = await trio.to_thread.run_sync(self.process.stdout.readline)
        if not line:
            raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-4000:]}")
        result: dict[str, Any] = json.loads(line)
        return result

    async def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(cmd) + "\n")
        self.process.stdin.flush()
        return await self.read()

    async def cpu(self) -> float:
        return float((await self.ask({"cmd": "cpu"}))["cpu"])

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- the receiver (this process) -------------------------------------------------------


def socket_pull(
    port: int, size: int, ctx: ssl.SSLContext | None, info: dict[str, Any], dest: Path | None
) -> float:
    """Connect, ask for ``size`` bytes, receive them; return seconds from connect to last byte.

    With ``dest``, each 4 MiB is also hashed and written to that new file (then removed).
    """
    view = memoryview(bytearray(CHUNK))
    digest = hashlib.sha256()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as raw:
        sock = ctx.wrap_socket(raw) if ctx is not None else raw
        if isinstance(sock, ssl.SSLSocket):
            info.update(tls_version=sock.version(), cipher=(sock.cipher() or ("?",))[0])
        sock.sendall(size.to_bytes(8, "big"))
        with open(dest, "wb") if dest is not None else contextlib.nullcontext() as out:
            remaining = size
            while remaining > 0:
                want = min(CHUNK, remaining)
                num = sock.recv_into(view, want)
                if out is not None:  # a whole chunk, then hash and write it
                    while 0 < num < want and (got := sock.recv_into(view[num:want])):
                        num += got
                    digest.update(view[:num])
                    out.write(view[:num])
                if not num:
                    raise EOFError("sender closed early")
                remaining -= num
        elapsed = time.perf_counter() - start
    if dest is not None:
        dest.unlink()
    return elapsed


async def stream_pull(node: Any, peer: str, size: int) -> None:
    stream = await node.open_stream(peer, BENCH_PROTOCOL)
    await stream.write(size.to_bytes(8, "big"))
    remaining = size
    while remaining > 0:
        chunk = await stream.read(min(remaining, CHUNK))
        if not chunk:
            raise EOFError("stream ended early")
        remaining -= len(chunk)
    await stream.close()


class Recorder:
    def __init__(self) -> None:
        self.samples: dict[tuple[str, int], list[dict[str, float]]] = {}

    async def measure(
        self, mode: str, size_mib: int, sender: Child, fn: Callable[[], Awaitable[float | None]]
    ) -> float:
        if mode in FILE_MODES:
            await trio.sleep(SETTLE_SECONDS)
        sender_cpu, own_cpu = await sender.cpu(), cpu_seconds()
        start = time.perf_counter()
        inner = await fn()
        elapsed = inner if inner is not None else time.perf_counter() - start
        own_cpu, sender_cpu = cpu_seconds() - own_cpu, await sender.cpu() - sender_cpu
        mbps = size_mib * MIB / 1e6 / elapsed
        gib = size_mib / 1024
        self.samples.setdefault((mode, size_mib), []).append(
            {"mbps": mbps, "receiver_cpu": own_cpu / gib, "sender_cpu": sender_cpu / gib}
        )
        print(f"  {mode:<14} {size_mib:>5} MiB {mbps:>8.1f} MB/s", flush=True)
        return mbps

    def median(self, mode: str, size_mib: int) -> float:
        return statistics.median(s["mbps"] for s in self.samples[(mode, size_mib)])


def components(workdir: Path) -> list[dict[str, Any]]:
    """Receiver-side costs of the bulk path beyond the TLS loop, 1 GiB each, no network."""
    buf = memoryview(os.urandom(CHUNK))
    rows = []
    digest = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(256):
        digest.update(buf)
    rows.append(("sha256_in_memory", time.perf_counter() - start))
    path = workdir / "component.bin"
    time.sleep(SETTLE_SECONDS)
    for name, mode in (("write_new_file", "wb"), ("overwrite_cached_file", "r+b")):
        start = time.perf_counter()
        with open(path, mode) as f:
            for _ in range(256):
                f.write(buf)
        rows.append((name, time.perf_counter() - start))
    path.unlink()
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(256):
            f.write(buf)
    rows.append(("write_new_file_right_after_freeing_1gib", time.perf_counter() - start))
    path.unlink()
    return [
        {"name": name, "size_mib": 1024, "metric": "MB/s", "value": 1024 * MIB / 1e6 / secs}
        for name, secs in rows
    ]


def cpu_budget(results: list[dict[str, Any]], size_mib: int) -> list[dict[str, Any]]:
    """Where the time goes, from the measured CPU seconds per GiB of both processes.

    ``*_cpu_bound``: the MB/s a mode would reach if its sender's and receiver's CPU work
    were spread perfectly over this machine's cores (both processes share them).
    ``tls_loop_plus_sha256_over_tls_loop``: the best ratio to the TLS loop that any receiver
    verifying a sha256 can reach here, running as efficiently as the bare loop itself:
    the loop's CPU work over the loop's work plus hashing 1 GiB.
    """
    rows = {(r["name"], r["size_mib"]): r for r in results}
    cores = os.cpu_count() or 1
    out: list[dict[str, Any]] = []
    for mode in ("tls_loop", "bulk", "bulk_recycled"):
        row = rows[(mode, size_mib)]
        cpu = row["receiver_cpu_seconds_per_gib"] + row["sender_cpu_seconds_per_gib"]
        bound = cores * 1024 * MIB / 1e6 / cpu
        out.append({"name": f"{mode}_cpu_bound", "size_mib": size_mib, "metric": "MB/s", "value": bound})
        out.append(
            {
                "name": f"{mode}_core_use",
                "size_mib": size_mib,
                "metric": "fraction",
                "value": row["value"] / bound,
            }
        )
    tls = rows[("tls_loop", size_mib)]
    tls_cpu = tls["receiver_cpu_seconds_per_gib"] + tls["sender_cpu_seconds_per_gib"]
    sha_cpu = 1024 * MIB / 1e6 / rows[("sha256_in_memory", 1024)]["value"]
    out.append(
        {
            "name": "tls_loop_plus_sha256_over_tls_loop",
            "size_mib": size_mib,
            "metric": "ratio",
            "value": tls_cpu / (tls_cpu + sha_cpu),
        }
    )
    return out


async def run_receiver(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hbulk-", dir="/tmp") as name:
        root = Path(name)
        pki = Pki.create(root / "pki")
        common = ["--pki", str(pki.root)]
        gateway = Child(root, "gateway", [*common, "--role", "node-sender", "--gateway-role"])
        children = [gateway]
        try:
            gw_addr = (await gateway.read())["addrs"][0]
            sizes = [WARMUP_MIB, *args.sizes_mib, args.libp2p_mib]
            sender = Child(
                root, "sender", [*common, "--role", "node-sender", "--sizes-mib", *map(str, sizes)]
            )
            natted_args = ["--role", "node-sender", "--no-listen", "--gateway", gw_addr]
            natted = Child(root, "natted", [*common, *natted_args, "--sizes-mib", str(args.relay_mib)])
            sockets = Child(root, "sockets", [*common, "--role", "socket-sender"])
            children += [sender, natted, sockets]
            ports, sender_info, natted_info = await sockets.read(), await sender.read(), await natted.read()
            settings = NodeSettings(
                role="worker", tls=pki.node("receiver", "worker"), gateway_addresses=[gw_addr]
            )
            async with open_node(settings) as node, trio.open_nursery() as nursery:
                spares = SpareFiles(root / "spare", 4 * max(args.sizes_mib) * MIB)
                bulk = BulkService(node, spares=spares)
                await nursery.start(bulk.run)
                await node.connect(sender_info["addrs"][0])
                result = await measure_all(
                    args,
                    root,
                    node,
                    bulk,
                    spares,
                    pki,
                    ports,
                    sender,
                    natted,
                    sockets,
                    sender_info,
                    natted_info,
                )
                nursery.cancel_scope.cancel()
        finally:
            for child in children:
                child.stop()
        result["params"]["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        result["results"] += components(root)
        result["results"] += cpu_budget(result["results"], max(args.sizes_mib))
        return result


async def measure_all(
    args: argparse.Namespace,
    root: Path,
    node: Any,
    bulk: BulkService,
    spares: SpareFiles,
    pki: Pki,
    ports: dict[str, int],
    sender: Child,
    natted: Child,
    sockets: Child,
    sender_info: dict[str, Any],
    natted_info: dict[str, Any],
) -> dict[str, Any]:
    client_ctx = bulk_ssl_context(pki.node("receiver-tls", "worker"), server_side=False)
    tls_info: dict[str, Any] = {}
    rec = Recorder()
    dest = root / "dest.bin"

    async def socket_mode(
        port: int, size_mib: int, ctx: ssl.SSLContext | None, to_file: bool = False
    ) -> float:
        sink = root / "tls-dest.bin" if to_file else None
        return await trio.to_thread.run_sync(socket_pull, port, size_mib * MIB, ctx, tls_info, sink)

    async def pull_mode(
        child: Child, peer: str, size_mib: int, direct: bool, recycled: bool = False, keep: bool = False
    ) -> float:
        """Ask ``child`` for an offer (not timed), then time ``BulkService.pull``.

        ``recycled``: the pull overwrites the file the previous pull of this size left (as
        a worker overwrites an evicted slice or an applied update); the received file is
        given back to the spares afterwards. Otherwise every spare is set aside first, so
        the pull writes a new file, which is deleted afterwards (``keep``: becomes a spare).
        """
        reply = await child.ask({"cmd": "offer", "size_mib": size_mib, "receiver": node.peer_id})
        offer = msgspec.convert(reply["offer"], m.TensorOffer)
        if not direct:
            offer = msgspec.structs.replace(offer, address=None)
        aside: list[Path] = []
        while not recycled and spares.take(0, root / f"aside-{len(aside)}"):
            aside.append(root / f"aside-{len(aside)}")
        before = bulk.statistics()
        start = time.perf_counter()
        await bulk.pull(offer, peer, dest, attempts=1)
        elapsed = time.perf_counter() - start
        after = bulk.statistics()
        assert after.num_direct - before.num_direct == (1 if direct else 0), "wrong channel"
        assert after.num_reused - before.num_reused == (1 if recycled else 0), "spare not used as meant"
        if recycled or keep:
            bulk.recycle(dest)
        else:
            dest.unlink()
        for path in aside:
            spares.give(path)
        return elapsed

    sender_id, natted_id = sender_info["peer_id"], natted_info["peer_id"]
    print("warm-up", flush=True)
    await socket_mode(ports["raw_port"], WARMUP_MIB, None)
    await socket_mode(ports["tls_port"], WARMUP_MIB, client_ctx)
    await pull_mode(sender, sender_id, WARMUP_MIB, True)
    for size in args.sizes_mib:  # leave one used file per size for the recycled pulls
        await pull_mode(sender, sender_id, size, True, keep=True)
    await stream_pull(node, sender_id, WARMUP_MIB * MIB)
    libp2p_mib, relay_mib = args.libp2p_mib, args.relay_mib
    for rep in range(args.repeat):
        print(f"repetition {rep + 1} of {args.repeat}", flush=True)
        for size in args.sizes_mib:
            raw_port, tls_port = ports["raw_port"], ports["tls_port"]
            modes = [
                ("raw_tcp", sockets, partial(socket_mode, raw_port, size, None)),
                ("tls_loop", sockets, partial(socket_mode, tls_port, size, client_ctx)),
                ("bulk", sender, partial(pull_mode, sender, sender_id, size, True)),
                ("bulk_recycled", sender, partial(pull_mode, sender, sender_id, size, True, True)),
            ]
            if size == max(args.sizes_mib):
                modes.append(
                    ("tls_sha_file", sockets, partial(socket_mode, tls_port, size, client_ctx, True))
                )
            shift = rep % len(modes)
            for mode, child, fn in modes[shift:] + modes[:shift]:
                await rec.measure(mode, size, child, fn)
        libp2p = partial(stream_pull, node, sender_id, libp2p_mib * MIB)
        await rec.measure("libp2p_stream", libp2p_mib, sender, libp2p)
        bulk_stream = partial(pull_mode, sender, sender_id, libp2p_mib, False)
        await rec.measure("bulk_stream", libp2p_mib, sender, bulk_stream)
        if rep < args.relay_repeat:
            relay = partial(pull_mode, natted, natted_id, relay_mib, False)
            await rec.measure("relay", relay_mib, natted, relay)
    return summarize(args, rec, tls_info)


def summarize(args: argparse.Namespace, rec: Recorder, tls_info: dict[str, Any]) -> dict[str, Any]:
    big = max(args.sizes_mib)
    tls_big, bulk_big = rec.median("tls_loop", big), rec.median("bulk", big)
    results: list[dict[str, Any]] = []
    for (mode, size_mib), samples in rec.samples.items():
        value = rec.median(mode, size_mib)
        row: dict[str, Any] = {"name": mode, "size_mib": size_mib, "metric": "MB/s", "value": value}
        if (("tls_loop", size_mib)) in rec.samples:
            row["vs_tls_loop"] = value / rec.median("tls_loop", size_mib)
            row["vs_raw_tcp"] = value / rec.median("raw_tcp", size_mib)
        row["samples"] = [s["mbps"] for s in samples]
        row["receiver_cpu_seconds_per_gib"] = statistics.median(s["receiver_cpu"] for s in samples)
        row["sender_cpu_seconds_per_gib"] = statistics.median(s["sender_cpu"] for s in samples)
        results.append(row)
    libp2p = rec.median("libp2p_stream", args.libp2p_mib)
    results += [
        {"name": "bulk_over_tls_loop", "size_mib": big, "metric": "ratio", "value": bulk_big / tls_big},
        {
            "name": "bulk_over_raw_tcp",
            "size_mib": big,
            "metric": "ratio",
            "value": bulk_big / rec.median("raw_tcp", big),
        },
        {
            "name": "tls_loop_over_raw_tcp",
            "size_mib": big,
            "metric": "ratio",
            "value": tls_big / rec.median("raw_tcp", big),
        },
        {
            "name": "bulk_over_tls_sha_file",
            "size_mib": big,
            "metric": "ratio",
            "value": bulk_big / rec.median("tls_sha_file", big),
        },
        {"name": "bulk_over_libp2p_stream", "size_mib": big, "metric": "ratio", "value": bulk_big / libp2p},
        {
            "name": "bulk_recycled_over_tls_loop",
            "size_mib": big,
            "metric": "ratio",
            "value": rec.median("bulk_recycled", big) / tls_big,
        },
        {
            "name": "bulk_recycled_over_libp2p_stream",
            "size_mib": big,
            "metric": "ratio",
            "value": rec.median("bulk_recycled", big) / libp2p,
        },
        {
            "name": "bulk_over_relay",
            "size_mib": big,
            "metric": "ratio",
            "value": bulk_big / rec.median("relay", args.relay_mib),
        },
    ]
    return {
        "benchmark": "bulk_transfer",
        "machine": machine(),
        "params": {
            "sizes_mib": args.sizes_mib,
            "libp2p_stream_mib": args.libp2p_mib,
            "relay_mib": args.relay_mib,
            "repeat": args.repeat,
            "relay_repeat": min(args.relay_repeat, args.repeat),
            "statistic": "median; the order of modes rotates per repetition",
            "processes": "a sender child process -> this receiver process on 127.0.0.1 (relay: + gateway)",
            "socket_writes_bytes": CHUNK,
            "libp2p_stream_writes_bytes": STREAM_CHUNK,
            "tls": f"{tls_info.get('tls_version')} {tls_info.get('cipher')}, mutual, bulk_ssl_context",
            "libp2p": "py-libp2p, TLS 1.3 (Hypha admission) + Yamux, one connection",
            "bulk_receiver": "bulk: new file via temp + os.replace, sha256 checked, sockets with 30 s "
            "timeouts; bulk_recycled: the same into a spare file left by the previous pull of that size",
            "settle_seconds_before_file_modes": SETTLE_SECONDS,
            "openssl": ssl.OPENSSL_VERSION,
            "python": platform.python_version(),
        },
        "results": results,
        "headline": {
            "metric": "bulk_throughput_1gib" if big == 1024 else f"bulk_throughput_{big}mib",
            "unit": "MB/s",
            "value": bulk_big,
            "baseline": f"bare TLS 1.3 socket loop (ssl module), {big} MiB, same run",
            "baseline_value": tls_big,
            "ratio": bulk_big / tls_big,
            "goal": 0.8,
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    head = f"{'mode':<16} {'MiB':>5} {'MB/s':>9} {'vs TLS':>7} {'vs raw':>7}"
    print(f"\n{head} {'rx cpu/GiB':>11} {'tx cpu/GiB':>11}")
    for row in summary["results"]:
        if row["metric"] != "MB/s" or "samples" not in row:
            continue
        vs_tls = f"{row['vs_tls_loop']:.2f}" if "vs_tls_loop" in row else "-"
        vs_raw = f"{row['vs_raw_tcp']:.2f}" if "vs_raw_tcp" in row else "-"
        print(
            f"{row['name']:<16} {row['size_mib']:>5} {row['value']:>9.1f} {vs_tls:>7} {vs_raw:>7}"
            f" {row['receiver_cpu_seconds_per_gib']:>10.2f}s {row['sender_cpu_seconds_per_gib']:>10.2f}s"
        )
    print("\nreceiver-side components (1 GiB, no network) and CPU bounds (both sides' work / cores):")
    for row in summary["results"]:
        if row["metric"] == "MB/s" and "samples" not in row:
            print(f"  {row['name']:<40} {row['value']:>9.1f} MB/s")
        elif row["metric"] == "fraction":
            print(f"  {row['name']:<40} {row['value']:>9.2f} of the bound")
    print("\nratios:")
    for row in summary["results"]:
        if row["metric"] == "ratio":
            print(f"  {row['name']:<40} {row['value']:>9.2f}")
    head = summary["headline"]
    print(f"\nheadline: bulk / TLS loop = {head['ratio']:.2f} (goal >= {head['goal']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--libp2p-mib", type=int, default=64)
    parser.add_argument("--relay-mib", type=int, default=16)
    parser.add_argument("--relay-repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--role", default="receiver", help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="receiver", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--no-listen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gateway-role", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gateway", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "socket-sender":
        run_socket_sender(args)
        return
    if args.role == "node-sender":
        trio.run(run_node_sender, args)
        return
    start = time.perf_counter()
    summary = trio.run(run_receiver, args)
    summary["params"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    print_table(summary)
    write_result(args.out, summary)


if __name__ == "__main__":
    main()
