"""Benchmark of allocation: seconds from the WorkerRequest to all leases granted, and memory.

Starts a real gateway (``python -m hypha gateway``) and real workers hosted ten to a process
(``python -m hypha.testing.workers``), and runs the scheduler's ``Allocator`` in this process.
Per size it warms the gossip mesh with one untimed allocation of one worker, then, per
repetition and policy, times ``Allocator.allocate`` (which publishes the WorkerRequest at
once) until every lease is granted. Like a pool, a round that returns short is followed at
once by another for the missing workers (at most ``MAX_ROUNDS``). Leases are confirmed with
one renewal each (untimed) and released before the next measurement.

Policies share one set of workers (starting 50 takes minutes here: every worker's DHT
bootstrap dials every other); the hosts switch their arbiters' batch window on a signal:
  ours      Hypha's defaults: workers batch adverts for 50 ms, the scheduler re-publishes
            every 0.4 s and returns once it holds enough offers and none arrived for 0.15 s.
  baseline  the original Hypha's timing (hypha-space/hypha: arbiter.rs WINDOW_WAIT 200 ms,
            allocator.rs GreedyOfferAggregator): workers batch for 200 ms, the scheduler
            publishes once and returns the moment it holds ``count`` offers at or under its
            bid (our allocator with settle 0 s and no re-publish). Not reproduced: the
            original also cuts its deadline to 100 ms before the earliest offer's expiry.
Both use the same offer deadline per round (below the workers' 5 s offer window).

Memory per tracked worker: a fresh scheduler node leases every worker and keeps the leases
renewed (``Allocator.keep`` tasks, as a pool does); tracemalloc and RSS deltas are divided by
the number of leases held. Reported for the largest size at which allocation completed.

    python bench/allocation.py [--sizes 10,50] [--repeat 3]

Writes ``bench/results/allocation.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import trio

from hypha.cli.logs import init_logging
from hypha.errors import HyphaError
from hypha.net.host import Node
from hypha.protocol import messages as m
from hypha.resources import Resources
from hypha.scheduler.allocator import Allocator, Grant, Price, WorkerSpec
from hypha.testing.benchmarks import machine, write_result
from hypha.testing.cluster import ChildNode, Pki, open_test_node, spawn_node, wait_until, write_toml

RESULTS = Path(__file__).resolve().parent / "results" / "allocation.json"
WORKERS_PER_PROCESS = 10
DEADLINE_SECONDS = 3.0
MAX_ROUNDS = 3
CONFIRM_SECONDS = 3.0
LEASE_SECONDS = 30.0
MEMORY_LEASE_SECONDS = 6.0
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
    signal: signal.Signals
    description: str


OURS = Policy(
    "ours",
    0.05,
    0.15,
    0.4,
    signal.SIGUSR2,
    "batch 50 ms; re-publish every 0.4 s; return once enough offers and 0.15 s without a new one",
)
BASELINE = Policy(
    "baseline",
    0.2,
    0.0,
    DEADLINE_SECONDS,
    signal.SIGUSR1,
    "original Hypha: batch 200 ms; publish once; return at the count-th offer <= bid",
)


@dataclass
class Sample:
    seconds: float
    num_granted: int
    num_confirmed: int
    num_rounds: int


async def host_workers(
    pki: Pki,
    gateway: str,
    root: Path,
    name: str,
    count: int,
    verbose: bool,
    *,
    task_status: trio.TaskStatus[ChildNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one worker host process until cancelled."""
    args = ["--pki", str(pki.root), "--gateway", gateway, "--count", str(count)]
    args += ["--prefix", f"{name}-w", "--work-dir", str(root / "work"), "--prices", "1.0"]
    args += ["--batch-window-seconds", str(OURS.batch_window_seconds)]
    args += ["--alt-batch-window-seconds", str(BASELINE.batch_window_seconds)]
    args += ["--verbose"] if verbose else []
    async with spawn_node(
        args, root, name, module="hypha.testing.workers", ready_timeout_seconds=240
    ) as child:
        task_status.started(child)
        await trio.sleep_forever()


@asynccontextmanager
async def open_workers(
    pki: Pki, gateway: str, root: Path, tag: str, num_workers: int, verbose: bool
) -> AsyncIterator[list[ChildNode]]:
    """Host ``num_workers`` workers, ten to a process (started together)."""
    hosts: list[ChildNode] = []
    async with trio.open_nursery() as nursery:

        async def start(name: str, count: int) -> None:
            hosts.append(await nursery.start(host_workers, pki, gateway, root, name, count, verbose))

        async with trio.open_nursery() as starting:
            for first in range(0, num_workers, WORKERS_PER_PROCESS):
                count = min(WORKERS_PER_PROCESS, num_workers - first)
                starting.start_soon(start, f"{tag}-h{first // WORKERS_PER_PROCESS}", count)
        yield hosts
        nursery.cancel_scope.cancel()


async def switch_policy(hosts: list[ChildNode], root: Path, policy: Policy) -> None:
    """Set every host's batch window for ``policy`` and wait for each to confirm."""
    for host in hosts:
        (root / f"{host.log_path.stem}.ready.json.mode").unlink(missing_ok=True)
        host.process.send_signal(policy.signal)

    def confirmed() -> bool:
        for host in hosts:
            path = root / f"{host.log_path.stem}.ready.json.mode"
            if not path.exists():
                return False
            if json.loads(path.read_text())["batch_window_seconds"] != policy.batch_window_seconds:
                return False
        return True

    with trio.fail_after(10):
        await wait_until(confirmed)


async def release_all(allocator: Allocator, grants: list[Grant]) -> None:
    async with trio.open_nursery() as nursery:
        for grant in grants:
            nursery.start_soon(allocator.release, grant)


async def confirm(node: Node, grants: list[Grant]) -> int:
    """How many grants the workers really hold (one renewal each)."""
    held = 0

    async def renew(grant: Grant) -> None:
        nonlocal held
        try:
            with trio.fail_after(CONFIRM_SECONDS):
                reply = await node.request(grant.worker, m.RenewLeaseRequest(lease_id=grant.lease_id), m.Msg)
        except (HyphaError, trio.TooSlowError):
            return
        held += isinstance(reply, m.LeaseRenewed)

    async with trio.open_nursery() as nursery:
        for grant in grants:
            nursery.start_soon(renew, grant)
    return held


async def allocate_all(allocator: Allocator, count: int) -> tuple[float, list[Grant], int]:
    """Time allocating ``count`` workers, re-advertising for missing ones like a pool."""
    grants: list[Grant] = []
    num_rounds = 0
    start = time.perf_counter()
    with trio.fail_after(MAX_ROUNDS * (DEADLINE_SECONDS + 5)):
        while len(grants) < count and num_rounds < MAX_ROUNDS:
            num_rounds += 1
            exclude = frozenset(g.worker for g in grants)
            grants += await allocator.allocate(SPEC, PRICE, count - len(grants), exclude=exclude)
    return time.perf_counter() - start, grants, num_rounds


_ALLOCATORS: dict[str, Allocator] = {}


def make_allocator(node: Node, policy: Policy, lease_seconds: float = LEASE_SECONDS) -> Allocator:
    """The node's one allocator (a node serves offers to one), set to ``policy``."""
    allocator = _ALLOCATORS.get(node.peer_id)
    if allocator is None:
        allocator = Allocator(node, lease_seconds=lease_seconds, offer_deadline_seconds=DEADLINE_SECONDS)
        _ALLOCATORS[node.peer_id] = allocator
    allocator.set_policy(
        settle_seconds=policy.settle_seconds,
        republish_seconds=policy.republish_seconds,
        lease_seconds=lease_seconds,
    )
    return allocator


async def time_policies(
    pki: Pki, gateway: str, root: Path, hosts: list[ChildNode], num_workers: int, repeat: int
) -> dict[str, list[Sample]]:
    """Warm up once, then time ``repeat`` allocations of every worker per policy, interleaved."""
    samples: dict[str, list[Sample]] = {OURS.name: [], BASELINE.name: []}
    async with open_test_node(pki, f"sched-{num_workers}", "scheduler", gateways=[gateway]) as node:
        await switch_policy(hosts, root, OURS)
        allocator = make_allocator(node, OURS)
        _, warm, _ = await allocate_all(allocator, 1)
        if not warm:
            print(f"    warm-up: no lease from {num_workers} workers in {MAX_ROUNDS} rounds", flush=True)
        await release_all(allocator, warm)
        await trio.sleep(2 * PAUSE_SECONDS)
        for _ in range(repeat):
            for policy in (OURS, BASELINE):
                await switch_policy(hosts, root, policy)
                # A node has one offer handler: the newest allocator takes the route over.
                allocator = make_allocator(node, policy)
                seconds, grants, num_rounds = await allocate_all(allocator, num_workers)
                held = await confirm(node, grants)
                sample = Sample(seconds, len(grants), held, num_rounds)
                print(f"    {policy.name:<8} {num_workers:>3} workers: {sample}", flush=True)
                samples[policy.name].append(sample)
                await release_all(allocator, grants)
                await trio.sleep(PAUSE_SECONDS)
        await switch_policy(hosts, root, OURS)
    return samples


async def hold_leases(pki: Pki, gateway: str, num_workers: int, name: str, traced: bool) -> dict[str, float]:
    """Lease every worker from a fresh scheduler node and keep the leases renewed.

    Returns bytes before, while holding (after one renewal round) and after releasing, and
    how many leases were held; the fresh node starts connected to the gateway. RSS counts
    from before the allocation (so it includes each worker's connection). tracemalloc slows
    the process several times over, too much to allocate 50 workers in time, so it starts
    after the allocation and counts what keeping the leases costs (grant, keep task, renewals).
    """
    process = psutil.Process()

    def measure() -> float:
        gc.collect()
        return float(tracemalloc.get_traced_memory()[0] if traced else process.memory_info().rss)

    async with open_test_node(pki, name, "scheduler", gateways=[gateway]) as node:
        allocator = make_allocator(node, OURS, MEMORY_LEASE_SECONDS)
        before = 0.0 if traced else measure()
        _, grants, _ = await allocate_all(allocator, num_workers)
        if traced:
            tracemalloc.start()
            before = measure()
        try:
            async with trio.open_nursery() as keepers:
                for grant in grants:
                    keepers.start_soon(allocator.keep, grant)
                with trio.move_on_after(MEMORY_LEASE_SECONDS * 3):

                    def settled() -> bool:
                        stats = allocator.statistics()
                        return stats.num_renewals + stats.num_lost >= len(grants)

                    await wait_until(settled)
                holding = measure()
                num_held = len(grants) - allocator.statistics().num_lost
                keepers.cancel_scope.cancel()
            await release_all(allocator, grants)
            after = measure()
        finally:
            if traced:
                tracemalloc.stop()
    return {"before": before, "holding": holding, "after": after, "num_held": float(num_held)}


def timing_row(policy: str, num_workers: int, samples: list[Sample]) -> dict[str, Any]:
    complete = [s.seconds for s in samples if s.num_granted == num_workers]
    return {
        "name": f"{policy}_{num_workers}_workers",
        "policy": policy,
        "num_workers": num_workers,
        "metric": "seconds_to_all_leases",
        "value": statistics.median(complete) if complete else None,
        "min": min(complete) if complete else None,
        "max": max(complete) if complete else None,
        "num_complete": len(complete),
        "samples": [vars(s) for s in samples],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hba-", dir="/tmp") as name:
        root = args.keep_dir or Path(name)
        root.mkdir(parents=True, exist_ok=True)
        pki = Pki.create(root / "pki")
        gw_keys = pki.config_keys(pki.node("gw", "gateway"))
        gw_config = write_toml(root / "gw.toml", {**gw_keys, "listen_addresses": ["/ip4/127.0.0.1/tcp/0"]})
        async with spawn_node(["gateway", "--config", str(gw_config)], root, "gw") as gw:
            for size in args.sizes:
                started = time.perf_counter()
                async with open_workers(pki, gw.address, root, f"n{size}", size, args.verbose) as hosts:
                    print(f"  {size} workers up in {time.perf_counter() - started:.1f} s", flush=True)
                    samples = await time_policies(pki, gw.address, root, hosts, size, args.repeat)
                    results += [timing_row(p, size, s) for p, s in samples.items()]
                    # Memory at every size where allocation works (the largest one is reported).
                    if any(s.num_granted == size for runs in samples.values() for s in runs):
                        rss = await hold_leases(pki, gw.address, size, f"mem-rss-{size}", traced=False)
                        traced = await hold_leases(pki, gw.address, size, f"mem-tm-{size}", traced=True)
                        memory = {"num_workers": size, "traced": traced, "rss": rss}
    return summarize(args, results, memory)


def memory_rows(memory: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, source, field, what in (
        ("rss_bytes_per_worker", "rss", "before", "RSS: lease, keep task and the worker's connection"),
        (
            "traced_lease_bytes_per_worker",
            "traced",
            "after",
            "tracemalloc: freed by releasing the lease (grant, keep task, renewal state)",
        ),
    ):
        raw = memory[source]
        held = raw["num_held"]
        rows.append(
            {
                "name": key,
                "num_workers": memory["num_workers"],
                "num_leases_held": int(held),
                "metric": "bytes_per_tracked_worker",
                "value": (raw["holding"] - raw[field]) / held if held else None,
                "what": what,
                "raw": raw,
            }
        )
    return rows


def summarize(
    args: argparse.Namespace, results: list[dict[str, Any]], memory: dict[str, Any]
) -> dict[str, Any]:
    size = max(args.sizes)
    ours = next(r for r in results if r["policy"] == OURS.name and r["num_workers"] == size)
    base = next(r for r in results if r["policy"] == BASELINE.name and r["num_workers"] == size)
    if memory:
        results += memory_rows(memory)
    ratio = base["value"] / ours["value"] if ours["value"] and base["value"] else None
    return {
        "benchmark": "allocation",
        "machine": machine(),
        "params": {
            "sizes": args.sizes,
            "repeat": args.repeat,
            "statistic": "median over repetitions in which every lease was granted (value null if none)",
            "workers_per_process": WORKERS_PER_PROCESS,
            "offer_deadline_seconds": DEADLINE_SECONDS,
            "max_rounds": MAX_ROUNDS,
            "worker_offer_window_seconds": 5.0,
            "lease_seconds": LEASE_SECONDS,
            "memory_lease_seconds": MEMORY_LEASE_SECONDS,
            "memory": "scheduler process, largest size that allocated: RSS from before the allocation "
            "while holding every lease; tracemalloc from after it (see hold_leases)",
            "pause_between_measurements_seconds": PAUSE_SECONDS,
            "ours": OURS.description,
            "baseline": BASELINE.description,
            "timed": "first Allocator.allocate call (publishes the WorkerRequest) until every lease is "
            "granted, re-advertising at once for missing workers",
            "topology": "gateway and worker hosts are child processes, the scheduler runs in the bench "
            "process, all on 127.0.0.1",
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
            "ratio": ratio,
            "goal": 1.0,
        },
    }


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return format(value, spec) if value is not None else "-".rjust(width)


def print_table(summary: dict[str, Any]) -> None:
    rows = [r for r in summary["results"] if r["metric"] == "seconds_to_all_leases"]
    memory_row = next((r for r in summary["results"] if r["name"] == "rss_bytes_per_worker"), None)
    sizes = summary["params"]["sizes"]
    print(
        f"{'workers':>7} {'ours med':>9} {'min':>7} {'max':>7} {'ok':>5} {'base med':>9} {'ok':>5} "
        f"{'ratio':>6} {'B/worker':>9}"
    )
    for size in sizes:
        ours = next(r for r in rows if r["policy"] == OURS.name and r["num_workers"] == size)
        base = next(r for r in rows if r["policy"] == BASELINE.name and r["num_workers"] == size)
        ratio = base["value"] / ours["value"] if ours["value"] and base["value"] else None
        memory = memory_row["value"] if memory_row and memory_row["num_workers"] == size else None
        print(
            f"{size:>7} {_fmt(ours['value'], '9.3f')} "
            f"{_fmt(ours['min'], '7.3f')} {_fmt(ours['max'], '7.3f')} "
            f"{ours['num_complete']:>3}/{len(ours['samples'])} {_fmt(base['value'], '9.3f')} "
            f"{base['num_complete']:>3}/{len(base['samples'])} {_fmt(ratio, '6.2f')} {_fmt(memory, '9.0f')}"
        )
    print(f"ours:     {summary['params']['ours']}")
    print(f"baseline: {summary['params']['baseline']}")
    for r in summary["results"]:
        if r["metric"] == "bytes_per_tracked_worker":
            print(
                f"{r['name']}: {_fmt(r['value'], '.0f')} B over {r['num_leases_held']} leases ({r['what']})"
            )
    h = summary["headline"]
    print(
        f"{h['metric']}: {_fmt(h['value'], '.3f')} s (goal <= {h['goal']} s), ratio {_fmt(h['ratio'], '.2f')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-dir", type=Path, default=None, help="Keep configs and node logs here.")
    parser.add_argument("--verbose", action="store_true", help="Workers log at INFO (see --keep-dir).")
    args = parser.parse_args()
    if args.repeat <= 0 or not args.sizes or min(args.sizes) <= 0:
        parser.error("--sizes and --repeat must be positive")
    init_logging("bench", quiet=True)
    summary = trio.run(run, args)
    print_table(summary)
    write_result(args.out, summary)


if __name__ == "__main__":
    main()
