"""``hypha up``: the live view of a local network training one job.

Owns the terminal side of ``hypha.local``: preparing the dataset with a progress bar,
starting the network, drawing rounds, per-worker speed and inner steps, loss and bytes sent
from the job's ``status.json``, and printing where the results are at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from hypha.errors import JobError, hypha_leaf
from hypha.local import (
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


def run_up(plan: LocalPlan, console: Console, *, single_process: bool, live: bool) -> int:
    """Run the local network; returns the exit code."""
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("preparing the built-in dataset (Python standard library sources)", total=None)
        ensure_dataset(plan.dataset_dir, lambda done, total: bar.update(task, completed=done, total=total))
    configs = write_configs(plan)
    (plan.out / "status.json").unlink(missing_ok=True)
    console.print(
        f"[bold]hypha up[/]: gateway, data node, {plan.num_trainers} trainers + 1 parameter server, "
        f"scheduler ({'one process' if single_process else 'one process per role'}); logs in {logs_dir(plan)}"
    )
    result: dict[str, int] = {}

    async def main() -> None:
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            if live:
                nursery.start_soon(_watch, plan, console, done)
            if single_process:
                await run_single_process(plan, configs)
            else:
                async with start_processes(plan, configs) as scheduler:
                    await scheduler.wait()
                    result["code"] = scheduler.returncode or 0
            done.set()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        leaf = hypha_leaf(group)  # only failures on purpose become a message; bugs propagate
        if leaf is None:
            raise
        raise leaf from group
    code = result.get("code", 0)
    if code != 0:
        raise JobError(f"the scheduler exited with {code}; see {logs_dir(plan) / 'scheduler.log'}")
    out = plan.out
    console.print(f"[bold green]done[/]: results in {out}/")
    for name in ("model.safetensors", "metrics.jsonl", "loss.png", "report.html"):
        path: Path = out / name
        console.print(f"  {path}  {'ok' if path.exists() else 'MISSING'}")
    return 0
