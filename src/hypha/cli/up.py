"""``hypha up``: the live view of a local network training one job.

Owns the terminal side of ``hypha.local``: preparing the dataset with a progress bar,
starting the network, drawing rounds, per-worker speed and inner steps, loss and bytes sent
from the job's ``status.json``, and printing where the results are at the end; and stopping
it all on SIGINT, SIGTERM or SIGHUP with one line and the shell's exit code (130, 143, 129).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from hypha.cli.runner import cancel_on_stop_signal, signal_exit_code
from hypha.errors import JobError, hypha_leaf
from hypha.local import (
    ChildNode,
    LocalPlan,
    ensure_dataset,
    logs_dir,
    read_status,
    run_single_process,
    start_processes,
    write_configs,
)


def _render(status: dict[str, Any] | None, plan: LocalPlan) -> Group | Table:
    if status is None:
        table = Table(title=f"hypha up: {plan.job.name}: allocating workers...")
        return table
    losses = status.get("global_loss") or []
    first = f"{losses[0][1]:.3f}" if losses else "-"
    last = f"{losses[-1][1]:.3f}" if losses else "-"
    title = (
        f"{status['job']}: round {status['round']}/{status['rounds']}   held-out loss {first} -> {last}"
        f"   {status['elapsed_seconds']:.0f} s"
    )
    table = Table(title=title)
    for column in ("worker", "role", "state", "round", "inner steps", "s/batch", "loss", "MB sent"):
        table.add_column(column, justify="right")
    ps = status.get("parameter_server")
    for peer, w in sorted(status.get("workers", {}).items()):
        spb = w.get("seconds_per_batch")
        loss = w.get("loss")
        table.add_row(
            peer[-8:],
            "parameter server" if peer == ps else "trainer",
            w.get("state", ""),
            str(w.get("round", "")),
            str(w.get("batches", 0)),
            f"{spb:.3f}" if spb else "-",
            f"{loss:.3f}" if loss is not None else "-",
            f"{w.get('bytes_sent', 0) / 1e6:.1f}",
        )
    return table


async def _watch(plan: LocalPlan, console: Console, done: trio.Event) -> None:
    with Live(_render(None, plan), console=console, refresh_per_second=4, transient=False) as live:
        while not done.is_set():
            live.update(_render(await trio.to_thread.run_sync(read_status, plan.out), plan))
            with trio.move_on_after(0.5):
                await done.wait()
        live.update(_render(await trio.to_thread.run_sync(read_status, plan.out), plan))
    if not console.is_terminal:
        console.print()  # a redirected Live leaves its last frame without a line end


@dataclass
class _Stop:
    """Why the run was stopped, if it was: the first stop signal and what it stopped."""

    nodes: list[ChildNode] = field(default_factory=list)
    signum: int | None = None
    num_running: int = 0


def _fresh_configs(plan: LocalPlan) -> dict[str, Path]:
    """The network's configs, with no ``status.json`` left from an earlier run (blocking)."""
    configs = write_configs(plan)
    (plan.out / "status.json").unlink(missing_ok=True)
    return configs


async def _run_network(
    plan: LocalPlan, console: Console, single_process: bool, live: bool, stop: _Stop
) -> int:
    """Prepare, start and watch the network until the job ends; the scheduler's exit code."""
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("preparing the built-in dataset (Python standard library sources)", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        await trio.to_thread.run_sync(ensure_dataset, plan.dataset_dir, progress)
    configs = await trio.to_thread.run_sync(_fresh_configs, plan)
    console.print(
        f"[bold]hypha up[/]: gateway, data node, {plan.num_trainers} trainers + 1 parameter server, "
        f"scheduler ({'one process' if single_process else 'one process per role'}); logs in {logs_dir(plan)}"
    )
    code = 0
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        if live:
            nursery.start_soon(_watch, plan, console, done)
        if single_process:
            await run_single_process(plan, configs)
        else:
            async with start_processes(plan, configs, started=stop.nodes) as scheduler:
                await scheduler.wait()
                code = scheduler.returncode or 0
        done.set()
    return code


def run_up(plan: LocalPlan, console: Console, *, single_process: bool, live: bool) -> int:
    """Run the local network; returns the exit code.

    SIGINT, SIGTERM and SIGHUP (a Ctrl-C, ``kill``, a closed terminal) all stop it the same
    way: the run is cancelled, every role process is stopped in order (scheduler first, so it
    can record how far the job got, then workers, data node, gateway; each with SIGTERM, then
    SIGKILL after its grace period, shielded from the cancellation), one line says so, and the
    exit code is 128 + the signal's number (130, 143, 129). The children run in their own
    sessions, so a terminal's Ctrl-C reaches only this process.
    """
    stop = _Stop()
    result: dict[str, int] = {}

    def on_signal(signum: int) -> None:
        stop.signum = signum
        stop.num_running = sum(1 for node in stop.nodes if node.process.poll() is None)

    async def network() -> None:
        result["code"] = await _run_network(plan, console, single_process, live, stop)

    try:
        trio.run(cancel_on_stop_signal, network, on_signal)
    except BaseExceptionGroup as group:
        leaf = hypha_leaf(group)  # only failures on purpose become a message; bugs propagate
        if leaf is None:
            raise
        raise leaf from group
    if stop.signum is not None:
        stopped = "" if single_process else f"; {stop.num_running} role processes stopped"
        console.print(
            f"hypha up: stopped by {signal.Signals(stop.signum).name}{stopped}; results so far in {plan.out}",
            highlight=False,
            markup=False,
        )
        return signal_exit_code(stop.signum)
    code = result.get("code", 0)
    if code != 0:
        raise JobError(f"the scheduler exited with {code}; see {logs_dir(plan) / 'scheduler.log'}")
    out = plan.out
    console.print(f"[bold green]done[/]: results in {out}/")
    for name in ("model.safetensors", "metrics.jsonl", "loss.png", "report.html"):
        path: Path = out / name
        console.print(f"  {path}  {'ok' if path.exists() else 'MISSING'}")
    return 0
