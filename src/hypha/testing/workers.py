"""Many real workers in one process: ``python -m hypha.testing.workers``.

Owns hosting ``--count`` worker nodes in one trio run for benchmarks and scale tests, where
one process per worker would not fit on a small machine: each worker is a full
``run_worker`` node with its own certificate issued from the CA in ``--pki``, its own
listener, arbiter and lease ledger. Once all are up it writes one ready file
``{"peer_ids": [...], "count": N, "pid": ...}``; SIGTERM or SIGINT stop every worker
cleanly, and SIGUSR1/SIGUSR2 switch every arbiter's batch window (so one set of workers,
slow to start, serves two allocation policies). Like ``testing/peer.py`` it is a harness
entry point, not a role, so it calls ``trio.run`` itself. It holds no allocation logic.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from hypha.config.schema import WorkerConfig
from hypha.local.logs import init_logging
from hypha.local.pki import Pki
from hypha.testing.cluster import worker_config
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


def write_json(path: Path, doc: Mapping[str, object]) -> None:
    """Atomically write ``doc`` as JSON (readers poll for the file to exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def write_ready(path: Path, peer_ids: Sequence[str]) -> None:
    """Write the ready file: ``{"peer_ids": [...], "count": N, "pid": ...}``."""
    write_json(path, {"peer_ids": list(peer_ids), "count": len(peer_ids), "pid": os.getpid()})


def mode_file(ready_file: Path) -> Path:
    """Where a host reports the batch window its arbiters use after a switch."""
    return ready_file.with_name(ready_file.name + ".mode")


def set_batch_window(workers: Sequence[Worker], seconds: float) -> None:
    """Make every worker's arbiter batch adverts for ``seconds`` from its next batch on."""
    for worker in workers:
        worker.arbiter.set_batch_window(seconds)


async def run_workers(
    configs: Sequence[WorkerConfig],
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
            peer_ids = [w.node.peer_id for w in workers]
            await trio.to_thread.run_sync(write_ready, ready_file, peer_ids)
        logger.info("%d workers up", len(workers))
        task_status.started(workers)


def build_configs(args: argparse.Namespace) -> list[WorkerConfig]:
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
    configs = await trio.to_thread.run_sync(build_configs, args)  # key generation blocks
    windows = {
        signal.SIGUSR1: args.alt_batch_window_seconds,
        signal.SIGUSR2: configs[0].batch_window_seconds,
    }
    workers: list[Worker] = []
    async with trio.open_nursery() as nursery:
        # Signals are received from the start, so SIGTERM also stops a slow startup cleanly.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, *windows) as signals:

            async def start_all() -> None:
                workers.extend(
                    await nursery.start(
                        lambda task_status: run_workers(
                            configs, ready_file=args.ready_file, task_status=task_status
                        )
                    )
                )

            nursery.start_soon(start_all)
            async for signum in signals:
                if signum not in windows:
                    break
                seconds = windows[signal.Signals(signum)]
                if seconds is None or not workers:
                    logger.warning("batch window switch ignored (no window given or not up yet)")
                    continue
                set_batch_window(workers, seconds)
                doc = {"batch_window_seconds": seconds}
                await trio.to_thread.run_sync(write_json, mode_file(args.ready_file), doc)
        nursery.cancel_scope.cancel()


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
    parser.add_argument(
        "--alt-batch-window-seconds",
        type=float,
        default=None,
        help="On SIGUSR1 every arbiter batches for this long (SIGUSR2: back to the configured "
        "window); each switch is confirmed in READY_FILE.mode.",
    )
    parser.add_argument("--verbose", action="store_true", help="INFO logs instead of WARNING.")
    args = parser.parse_args(argv)
    if args.count <= 0:
        parser.error("--count: must be positive")
    if args.alt_batch_window_seconds is not None and args.alt_batch_window_seconds <= 0:
        parser.error("--alt-batch-window-seconds: must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    init_logging(f"workers-{args.prefix}", quiet=not args.verbose)
    trio.run(_main, args)


if __name__ == "__main__":
    main()
