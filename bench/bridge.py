"""Benchmark of the job bridge: request rate and cached-slice fetch throughput.

Serves a real bridge on a Unix socket whose backend hard-links (or copies, across devices)
a cached slice into the work dir, the path a worker takes for a slice it already holds. A
separate client process, using ``hypha.training.session.Session`` like an executor, measures
(a) requests per second of ``GET /health`` and of a small ``POST /progress``, (b) MB/s of
"fetch the slice and read every byte", and (c) MB/s of reading the cached file directly.

    python bench/bridge.py [--size-mib 64] [--repeat 5] [--num-requests 2000]

Writes ``bench/results/bridge.json``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

from hypha.bridge import serve_bridge
from hypha.protocol import bridge as b
from hypha.testing.benchmarks import machine, write_result
from hypha.training.session import Session

RESULTS = Path(__file__).resolve().parent / "results" / "bridge.json"
CHUNK = 1024 * 1024


class ClientResult(msgspec.Struct, frozen=True, kw_only=True):
    """What the client process measured (printed as JSON on its stdout)."""

    health_rps: float
    progress_rps: float
    fetch_mbps: list[float]
    direct_mbps: list[float]


class CachedSliceBackend:
    """Serves one cached slice file to every ``SliceRef`` fetch; nothing else."""

    task_id = "bench-task"

    def __init__(self, cache_file: Path, sha256: str) -> None:
        self.cache_file = cache_file
        self.sha256 = sha256
        self.num_fetches = 0

    def job_document(self) -> bytes:
        return b'{"job_id": "bench"}'

    async def fetch(self, ref: b.Reference, work_dir: Path) -> list[b.FetchedFile]:
        if not isinstance(ref, b.SliceRef):
            raise ValueError("the bench backend only serves slices")
        rel = "slices/0.bin"
        target = work_dir / rel
        target.parent.mkdir(exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(self.cache_file, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            await trio.to_thread.run_sync(shutil.copyfile, self.cache_file, target)
        self.num_fetches += 1
        size = target.stat().st_size
        return [b.FetchedFile(path=rel, size=size, sha256=self.sha256, index=0, dataset="bench")]

    async def send(self, request: b.SendRequest, path: Path) -> list[str]:
        raise ValueError("not part of this benchmark")

    def subscribe_received(self) -> trio.MemoryReceiveChannel[b.ReceivedFile]:
        _, receive = trio.open_memory_channel[b.ReceivedFile](0)
        return receive

    async def progress(self, body: b.ProgressBody) -> b.InstructionBody:
        return b.InstructionBody(action="continue")

    async def metrics(self, body: b.MetricsBody) -> None:
        return None


def read_all(path: Path) -> int:
    """Read every byte of ``path`` into a reused buffer; return the byte count."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total


def rate(fn: Callable[[], object], num: int) -> float:
    start = time.perf_counter()
    for _ in range(num):
        fn()
    return num / (time.perf_counter() - start)


def run_client(args: argparse.Namespace) -> None:
    """Client process: measure through ``Session`` and print one JSON object."""
    cache_file = Path(args.cache_file)
    report = b.ProgressReport(batches=1, samples=32, seconds=0.05, loss=0.5, round=0)
    with Session(args.socket, args.work_dir) as session:
        session.health()  # warm the connection
        health_rps = rate(session.health, args.num_requests)
        progress_rps = rate(lambda: session.report_progress(report), args.num_requests)
        fetch_mbps, direct_mbps = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            num_bytes = read_all(cache_file)
            direct_mbps.append(num_bytes / 1e6 / (time.perf_counter() - start))
            start = time.perf_counter()
            (fetched,) = session.fetch(b.SliceRef(dataset="bench"))
            num_bytes = read_all(session.local_path(fetched.path))
            fetch_mbps.append(num_bytes / 1e6 / (time.perf_counter() - start))
            assert num_bytes == fetched.size
    result = ClientResult(
        health_rps=health_rps,
        progress_rps=progress_rps,
        fetch_mbps=fetch_mbps,
        direct_mbps=direct_mbps,
    )
    sys.stdout.buffer.write(msgspec.json.encode(result))


async def run_server(args: argparse.Namespace) -> ClientResult:
    with tempfile.TemporaryDirectory(prefix="hbb-", dir="/tmp") as name:
        root = Path(name)
        cache_file, work_dir = root / "cache" / "slice.bin", root / "work"
        cache_file.parent.mkdir()
        work_dir.mkdir(mode=0o700)
        digest = hashlib.sha256()
        with open(cache_file, "wb") as f:
            for _ in range(args.size_mib):
                chunk = os.urandom(CHUNK)
                digest.update(chunk)
                f.write(chunk)
        backend = CachedSliceBackend(cache_file, digest.hexdigest())
        socket_path = root / "bridge.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_bridge, backend, socket_path, work_dir))
            command = [sys.executable, __file__, "--client", "--socket", str(socket_path)]
            command += ["--work-dir", str(work_dir), "--cache-file", str(cache_file)]
            command += ["--repeat", str(args.repeat), "--num-requests", str(args.num_requests)]
            done = await trio.run_process(command, capture_stdout=True)
            nursery.cancel_scope.cancel()
        return msgspec.json.decode(done.stdout, type=ClientResult)


def summarize(args: argparse.Namespace, raw: ClientResult) -> dict[str, Any]:
    fetch, direct = raw.fetch_mbps, raw.direct_mbps
    fetch_median, direct_median = statistics.median(fetch), statistics.median(direct)
    results = [
        {"name": "health", "metric": "requests_per_second", "value": raw.health_rps},
        {"name": "progress", "metric": "requests_per_second", "value": raw.progress_rps},
        {"name": "fetch_and_read", "metric": "MB/s", "value": fetch_median, "samples": fetch},
        {"name": "direct_read", "metric": "MB/s", "value": direct_median, "samples": direct},
    ]
    return {
        "benchmark": "bridge",
        "machine": machine(),
        "params": {
            "size_mib": args.size_mib,
            "repeat": args.repeat,
            "num_requests": args.num_requests,
            "statistic": "median",
            "transport": "HTTP/1.1 over a Unix socket (hypercorn, httpx)",
            "fetch_path": "hard link from cache (copy if cross-device), then read",
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "results": results,
        "headline": {
            "metric": "fetch_throughput",
            "unit": "MB/s",
            "value": fetch_median,
            "baseline": "direct file read",
            "baseline_value": direct_median,
            "ratio": fetch_median / direct_median,
            "goal": 0.5,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--cache-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_client(args)
        return
    summary = summarize(args, trio.run(run_server, args))
    print(f"{'benchmark':<16} {'metric':<20} {'value':>12}")
    for row in summary["results"]:
        print(f"{row['name']:<16} {row['metric']:<20} {row['value']:>12.1f}")
    headline = summary["headline"]
    print(f"fetch / direct read = {headline['ratio']:.2f} (goal >= 0.5)")
    write_result(args.out, summary)


if __name__ == "__main__":
    main()
