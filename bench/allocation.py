"""Benchmark of allocation: seconds from the WorkerRequest to all leases granted, and memory.

Starts a real gateway (``python -m hypha gateway``) and real workers hosted ten to a process
(``python -m hypha.testing.workers``), and runs the scheduler's ``Allocator`` in this process.
For each size and allocation policy it warms the gossip mesh with one untimed allocation of
one worker, then times ``Allocator.allocate`` (which publishes the WorkerRequest at once) until
it returns with every lease granted, releasing all leases between repetitions.

Policies, each run on its own freshly started workers:
  ours      Hypha's defaults: workers batch adverts for 50 ms, the scheduler re-publishes
            every 0.4 s and returns once it holds enough offers and none arrived for 0.15 s.
  baseline  the original Hypha's timing (hypha-space/hypha, arbiter.rs WINDOW_WAIT = 200 ms,
            allocator.rs GreedyOfferAggregator): workers batch for 200 ms, the scheduler
            publishes once and returns the moment it holds ``count`` offers at or under its
            bid; reproduced with our allocator (settle 0 s, no re-publish).
Both use a 5 s offer deadline (the original's DEFAULT_TIMEOUT), an upper bound only.

Memory per tracked worker: a fresh scheduler node leases every worker and keeps the leases
renewed (``Allocator.keep`` tasks, as a pool does); tracemalloc and RSS deltas are divided by
the number of workers.

    python bench/allocation.py [--sizes 10,50] [--repeat 3]

Writes ``bench/results/allocation.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import trio

from hypha.cli.logs import init_logging
from hypha.net.host import Node
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.scheduler.allocator import Allocator, Grant, Price, WorkerSpec
from hypha.testing.cluster import Pki, open_test_node, spawn_node, wait_until, write_toml

RESULTS = Path(__file__).resolve().parent / "results" / "allocation.json"
WORKERS_PER_PROCESS = 10
DEADLINE_SECONDS = 5.0
LEASE_SECONDS = 30.0
MEMORY_LEASE_SECONDS = 2.0
PAUSE_SECONDS = 0.5
"""Untimed pause after releasing, so stray re-published adverts of the last request drain."""
SPEC = WorkerSpec(
    resources=Resources(cpu=1, memory=2),
    executors=(m.ExecutorDescriptor(executor_class="train", name="diloco"),),
)
PRICE = Price(bid=1.0, max_price=2.0)


@dataclass(frozen=True)
class Policy:
    name: str
    batch_window_seconds: float
    settle_seconds: float
    republish_seconds: float
    description: str


OURS = Policy(
    "ours", 0.05, 0.15, 0.4, "batch 50 ms; re-publish every 0.4 s; return once enough and 0.15 s quiet"
)
BASELINE = Policy(
    "baseline",
    0.2,
    0.0,
    DEADLINE_SECONDS,
    "original Hypha: batch 200 ms; publish once; return at the count-th offer <= bid",
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{platform.platform()} / {cpu} / {os.cpu_count()} cores"


async def host_workers(
    pki: Pki, gateway: str, root: Path, name: str, count: int, policy: Policy,
    *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one worker host process until cancelled; report its workers' peer ids."""
    args = ["--pki", str(pki.root), "--gateway", gateway, "--count", str(count)]
    args += ["--prefix", f"{name}-w", "--work-dir", str(root / "work")]
    args += ["--prices", "1.0", "--batch-window-seconds", str(policy.batch_window_seconds)]
    async with spawn_node(args, root, name, module="hypha.testing.workers", ready_timeout_seconds=150) as child:
        task_status.started(list(child.ready["peer_ids"]))
        await trio.sleep_forever()


@asynccontextmanager
async def open_workers(
    pki: Pki, gateway: str, root: Path, tag: str, num_workers: int, policy: Policy
) -> AsyncIterator[list[str]]:
    """Host ``num_workers`` workers, ten to a process (started together); yield their ids."""
    peer_ids: list[str] = []
    async with trio.open_nursery() as nursery:

        async def start(name: str, count: int) -> None:
            peer_ids.extend(await nursery.start(host_workers, pki, gateway, root, name, count, policy))

        async with trio.open_nursery() as starting:
            for first in range(0, num_workers, WORKERS_PER_PROCESS):
                count = min(WORKERS_PER_PROCESS, num_workers - first)
                starting.start_soon(start, f"{tag}-h{first // WORKERS_PER_PROCESS}", count)
        yield peer_ids
        nursery.cancel_scope.cancel()


async def release_all(allocator: Allocator, grants: list[Grant]) -> None:
    async with trio.open_nursery() as nursery:
        for grant in grants:
            nursery.start_soon(allocator.release, grant)


async def allocate_all(allocator: Allocator, count: int) -> tuple[float, list[Grant]]:
    """Time one allocation of ``count`` workers; all must be granted."""
    start = time.perf_counter()
    with trio.fail_after(DEADLINE_SECONDS + 10):
        grants = await allocator.allocate(SPEC, PRICE, count)
    seconds = time.perf_counter() - start
    if len(grants) != count:
        await release_all(allocator, grants)
        raise RuntimeError(f"only {len(grants)} of {count} leases granted in {seconds:.3f} s")
    return seconds, grants


def make_allocator(node: Node, policy: Policy, lease_seconds: float = LEASE_SECONDS) -> Allocator:
    return Allocator(
        node,
        lease_seconds=lease_seconds,
        offer_deadline_seconds=DEADLINE_SECONDS,
        settle_seconds=policy.settle_seconds,
        republish_seconds=policy.republish_seconds,
    )


async def time_policy(
    pki: Pki, gateway: str, num_workers: int, policy: Policy, repeat: int
) -> list[float]:
    """Warm up once, then time ``repeat`` allocations of every worker."""
    async with open_test_node(pki, f"s-{policy.name}-{num_workers}", "scheduler", gateways=[gateway]) as node:
        allocator = make_allocator(node, policy)
        _, warm = await allocate_all(allocator, 1)
        await release_all(allocator, warm)
        await trio.sleep(2 * PAUSE_SECONDS)
        samples = []
        for _ in range(repeat):
            seconds, grants = await allocate_all(allocator, num_workers)
            print(f"    {seconds:.3f} s {allocator.stats}", flush=True)
            samples.append(seconds)
            await release_all(allocator, grants)
            await trio.sleep(PAUSE_SECONDS)
        return samples


async def hold_leases(pki: Pki, gateway: str, num_workers: int, name: str, traced: bool) -> dict[str, float]:
    """Lease every worker from a fresh scheduler node and keep the leases renewed.

    Returns traced (or RSS) bytes before, while holding (after one renewal round) and after
    releasing; the fresh node starts connected to the gateway only.
    """
    process = psutil.Process()

    def measure() -> float:
        gc.collect()
        return float(tracemalloc.get_traced_memory()[0] if traced else process.memory_info().rss)

    async with open_test_node(pki, name, "scheduler", gateways=[gateway]) as node:
        allocator = make_allocator(node, OURS, MEMORY_LEASE_SECONDS)
        if traced:
            tracemalloc.start()
        try:
            before = measure()
            _, grants = await allocate_all(allocator, num_workers)
            async with trio.open_nursery() as keepers:
                for grant in grants:
                    keepers.start_soon(allocator.keep, grant)
                with trio.fail_after(MEMORY_LEASE_SECONDS * 5):
                    await wait_until(
                        lambda: allocator.stats.num_renewals >= num_workers or allocator.stats.num_lost > 0
                    )
                holding = measure()
                lost = allocator.stats.num_lost
                keepers.cancel_scope.cancel()
            if lost:
                raise RuntimeError(f"{lost} leases lost while measuring memory")
            await release_all(allocator, grants)
            after = measure()
        finally:
            if traced:
                tracemalloc.stop()
    return {"before": before, "holding": holding, "after": after}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hba-", dir="/tmp") as name:
        root = args.keep_dir or Path(name)
        root.mkdir(parents=True, exist_ok=True)
        pki = Pki.create(root / "pki")
        gw_config = write_toml(
            root / "gw.toml",
            {**pki.config_keys(pki.node("gw", "gateway")), "listen_addresses": ["/ip4/127.0.0.1/tcp/0"]},
        )
        async with spawn_node(["gateway", "--config", str(gw_config)], root, "gw") as gw:
            for size in args.sizes:
                for policy in (OURS, BASELINE):
                    tag = f"{policy.name}{size}"
                    started = time.perf_counter()
                    async with open_workers(pki, gw.address, root, tag, size, policy):
                        up = time.perf_counter() - started
                        samples = await time_policy(pki, gw.address, size, policy, args.repeat)
                        print(f"  {tag}: {size} workers up in {up:.1f} s; samples {samples}", flush=True)
                        results.append(
                            {
                                "name": f"{policy.name}_{size}_workers",
                                "policy": policy.name,
                                "num_workers": size,
                                "metric": "seconds_to_all_leases",
                                "value": statistics.median(samples),
                                "min": min(samples),
                                "max": max(samples),
                                "samples": samples,
                            }
                        )
                        if policy is OURS and size == max(args.sizes):
                            rss = await hold_leases(pki, gw.address, size, f"mem-rss-{size}", traced=False)
                            traced = await hold_leases(pki, gw.address, size, f"mem-tm-{size}", traced=True)
                            memory = {
                                "num_workers": size,
                                "traced_bytes_per_worker": (traced["holding"] - traced["before"]) / size,
                                "traced_lease_bytes_per_worker": (traced["holding"] - traced["after"]) / size,
                                "rss_bytes_per_worker": (rss["holding"] - rss["before"]) / size,
                                "raw": {"traced": traced, "rss": rss},
                            }
    return summarize(args, results, memory)


def summarize(args: argparse.Namespace, results: list[dict[str, Any]], memory: dict[str, Any]) -> dict[str, Any]:
    size = max(args.sizes)
    ours = next(r for r in results if r["policy"] == "ours" and r["num_workers"] == size)
    base = next(r for r in results if r["policy"] == "baseline" and r["num_workers"] == size)
    if memory:
        for key, what in (
            ("traced_bytes_per_worker", "tracemalloc, lease + connection + keep task"),
            ("traced_lease_bytes_per_worker", "tracemalloc, lease + keep task (connection kept)"),
            ("rss_bytes_per_worker", "RSS delta, lease + connection + keep task"),
        ):
            results.append(
                {
                    "name": key,
                    "num_workers": memory["num_workers"],
                    "metric": "bytes_per_tracked_worker",
                    "value": memory[key],
                    "what": what,
                }
            )
    return {
        "benchmark": "allocation",
        "machine": machine(),
        "params": {
            "sizes": args.sizes,
            "repeat": args.repeat,
            "statistic": "median",
            "workers_per_process": WORKERS_PER_PROCESS,
            "offer_deadline_seconds": DEADLINE_SECONDS,
            "lease_seconds": LEASE_SECONDS,
            "memory_lease_seconds": MEMORY_LEASE_SECONDS,
            "pause_between_repetitions_seconds": PAUSE_SECONDS,
            "ours": OURS.description,
            "baseline": BASELINE.description,
            "timed": "Allocator.allocate call (publishes the WorkerRequest) to return with every lease granted",
            "topology": "gateway and worker hosts as child processes, scheduler in the bench process, 127.0.0.1",
            "python": sys.version.split()[0],
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "results": results,
        "headline": {
            "metric": f"seconds_to_all_{size}_leases",
            "unit": "s",
            "value": ours["value"],
            "baseline": "original Hypha allocation timing (200 ms batching, greedy first-N aggregation)",
            "baseline_value": base["value"],
            "ratio": base["value"] / ours["value"],
            "goal": 1.0,
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    rows = [r for r in summary["results"] if r["metric"] == "seconds_to_all_leases"]
    per_worker = next((r["value"] for r in summary["results"] if r["name"] == "traced_bytes_per_worker"), None)
    print(f"{'workers':>7} {'ours med':>9} {'min':>7} {'max':>7} {'base med':>9} {'ratio':>6} {'B/worker':>9}")
    for size in summary["params"]["sizes"]:
        ours = next(r for r in rows if r["policy"] == "ours" and r["num_workers"] == size)
        base = next(r for r in rows if r["policy"] == "baseline" and r["num_workers"] == size)
        memory = f"{per_worker:9.0f}" if per_worker is not None and size == max(summary["params"]["sizes"]) else ""
        print(
            f"{size:>7} {ours['value']:>9.3f} {ours['min']:>7.3f} {ours['max']:>7.3f} "
            f"{base['value']:>9.3f} {base['value'] / ours['value']:>6.2f} {memory:>9}"
        )
    print(f"ours:     {summary['params']['ours']}")
    print(f"baseline: {summary['params']['baseline']}")
    for r in summary["results"]:
        if r["metric"] == "bytes_per_tracked_worker":
            print(f"{r['name']}: {r['value']:.0f} B ({r['what']})")
    headline = summary["headline"]
    print(f"{headline['metric']}: {headline['value']:.3f} s (goal <= {headline['goal']} s), ratio {headline['ratio']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-dir", type=Path, default=None, help="Keep configs and node logs here.")
    args = parser.parse_args()
    if args.repeat <= 0 or not args.sizes or min(args.sizes) <= 0:
        parser.error("--sizes and --repeat must be positive")
    init_logging("bench", quiet=True)
    summary = trio.run(run, args)
    print_table(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
