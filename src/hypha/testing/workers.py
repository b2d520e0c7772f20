"""Many real workers in one process: ``python -m hypha.testing.workers``.

Owns hosting ``--count`` worker nodes in one trio run for benchmarks and scale tests, where
one process per worker would not fit on a small machine: each worker is a full
``run_worker`` node with its own certificate issued from the CA in ``--pki``, its own
listener, arbiter and lease ledger. Once all are up it writes one ready file
``{"peer_ids": [...], "count": N, "pid": ...}``; SIGTERM or SIGINT stop every worker
cleanly. Like ``testing/peer.py`` it is a harness entry point, not a role, so it calls
``trio.run`` itself. It holds no allocation logic: that is ``worker/``'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from hypha.cli.logs import init_logging
from hypha.testing.cluster import Pki, worker_config
from hypha.worker import Worker, run_worker

logger = logging.getLogger(__name__)


def parse_prices(text: str | None, num_workers: int) -> list[float]:
    """Prices for ``num_workers`` workers from ``"a,b,..."``, cycled; 1.0 each if absent.

    Raises:
        ValueError: empty entries, non-numbers or negative prices.
    """
    if not text:
        return [1.0] * num_workers
    prices = [float(p) for p in text.split(",")]
    if any(p < 0 for p in prices):
        raise ValueError(f"--prices: negative price in {text!r}")
    return [prices[i % len(prices)] for i in range(num_workers)]


def write_ready(path: Path, peer_ids: Sequence[str]) -> None:
    """Atomically write the ready JSON (readers poll for the file to exist)."""
    doc = {"peer_ids": list(peer_ids), "count": len(peer_ids), "pid": os.getpid()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


async def run_workers(
    configs: Sequence[Any],
    *,
    ready_file: Path | None = None,
    task_status: trio.TaskStatus[list[Worker]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start one worker per config (one after another), report them, run until cancelled.

    Args:
        configs: ``WorkerConfig`` per worker (for example from ``cluster.worker_config``).
        ready_file: written once every worker is up.

    Cancellation: cancelling the caller's scope stops every worker node.
    """
    workers: list[Worker] = []
    async with trio.open_nursery() as nursery:
        # One at a time: each new node's DHT bootstrap dials the peers already up, and
        # starting them all at once makes those dials collide (several times slower).
        for config in configs:
            workers.append(
                await nursery.start(lambda task_status, c=config: run_worker(c, task_status=task_status))
            )
        if ready_file is not None:
            write_ready(ready_file, [w.node.peer_id for w in workers])
        logger.info("%d workers up", len(workers))
        task_status.started(workers)


def build_configs(args: argparse.Namespace) -> list[Any]:
    """One ``WorkerConfig`` per worker, each with fresh credentials from the CA."""
    pki = Pki(args.pki)
    prices = parse_prices(args.prices, args.count)
    extra: dict[str, Any] = {}
    if args.batch_window_seconds is not None:
        extra["batch_window_seconds"] = args.batch_window_seconds
    if args.offer_window_seconds is not None:
        extra["offer_window_seconds"] = args.offer_window_seconds
    return [
        worker_config(pki, f"{args.prefix}{i}", args.gateway, args.work_dir, price=price, **extra)
        for i, price in enumerate(prices)
    ]


async def _main(args: argparse.Namespace) -> None:
    configs = build_configs(args)
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        await nursery.start(lambda task_status: run_workers(configs, ready_file=args.ready_file, task_status=task_status))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pki", type=Path, required=True, help="Directory of the development CA.")
    parser.add_argument("--gateway", required=True, help="Gateway multiaddr with /p2p/<peer id>.")
    parser.add_argument("--count", type=int, required=True, help="Number of workers to host.")
    parser.add_argument("--prefix", default="w", help="Worker names are PREFIX0, PREFIX1, ...")
    parser.add_argument("--work-dir", type=Path, required=True, help="Parent of the work dirs.")
    parser.add_argument("--ready-file", type=Path, required=True, help="Written once all are up.")
    parser.add_argument("--prices", default=None, help="Comma-separated asking prices, cycled.")
    parser.add_argument("--batch-window-seconds", type=float, default=None)
    parser.add_argument("--offer-window-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    if args.count <= 0:
        parser.error("--count: must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    init_logging(f"workers-{args.prefix}", quiet=True)
    trio.run(_main, args)


if __name__ == "__main__":
    main()
