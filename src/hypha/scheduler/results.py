"""What a job leaves behind: metrics, status, loss curve, report, final model path.

Owns the job's output directory: ``metrics.jsonl`` (one JSON object per line with at least
``round``, ``worker`` and ``loss``; the parameter server's evaluation uses worker "global"),
``status.json`` (the live state ``hypha up`` draws), and at the end ``loss.png`` and
``report.html`` (loss per round and a per-worker timeline of compute and synchronisation),
and ``events.jsonl`` (what happened to each worker: sync planned, update sent and applied,
lost, finished). The final ``model.safetensors`` is written here by the job driver. It reads
the job through a ``JobSnapshot``, never the driver; every file write and the plot run in a
worker thread, off the event loop, one at a time and in order.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from hypha.config.job import JobSpec
from hypha.protocol import messages as m
from hypha.scheduler.state import JobSnapshot

logger = logging.getLogger(__name__)


@dataclass
class WorkerTrack:
    batches: int = 0
    samples: int = 0
    compute_seconds: float = 0.0
    loss: float | None = None
    round: int = 0
    state: str = "starting"
    since: float = 0.0
    segments: list[tuple[float, float, str]] = field(default_factory=list)
    bytes_sent: float = 0.0
    finished: bool = False

    def switch(self, state: str, now: float) -> None:
        if self.state in ("compute", "sync") and now > self.since:
            self.segments.append((self.since, now, self.state))
        self.state = state
        self.since = now


class JobRecorder:
    """Collects a job's metrics and writes its artifacts."""

    def __init__(self, out: Path, job: JobSpec, job_id: str) -> None:
        self.out = out
        self.job = job
        self.job_id = job_id
        self.metrics_path = out / "metrics.jsonl"
        self.events_path = out / "events.jsonl"
        self.model_path = out / "model.safetensors"
        self._io = trio.Lock()
        self.workers: dict[str, WorkerTrack] = {}
        self.global_loss: list[tuple[int, float]] = []
        self.started = trio.current_time()
        self.started_unix = time.time()
        self.final_loss: float | None = None

    async def start(self, *, resume: bool = False) -> None:
        """Create the output directory and start empty metric and event files.

        ``resume``: the job goes on after a restart: the files so far are kept and appended to.
        """

        def create() -> None:
            self.out.mkdir(parents=True, exist_ok=True)
            for path in (self.metrics_path, self.events_path):
                if not (resume and path.exists()):
                    path.write_text("")

        await self._off_loop(create)

    async def _off_loop(self, work: Any) -> None:
        # One write at a time, in the order asked (trio's Lock is fair).
        async with self._io:
            await trio.to_thread.run_sync(work)

    def _track(self, worker: str) -> WorkerTrack:
        return self.workers.setdefault(worker, WorkerTrack(since=trio.current_time()))

    async def _append(self, path: Path, doc: dict[str, Any]) -> None:
        line = json.dumps(doc) + "\n"

        def append() -> None:
            with path.open("a") as f:
                f.write(line)

        await self._off_loop(append)

    def batches(self, worker: str, event: m.BatchesDone, now: float) -> None:
        track = self._track(worker)
        if track.state != "compute":
            track.switch("compute", now - event.seconds)
        track.batches += event.batches
        track.samples += event.samples
        track.compute_seconds += event.seconds
        track.round = event.round
        if event.loss is not None:
            track.loss = event.loss

    async def event(self, worker: str, kind: str, round_: int, **values: Any) -> None:
        """Record what happened to ``worker`` (``events.jsonl``) and move its timeline."""
        track = self._track(worker)
        now = trio.current_time()
        doc = {"round": round_, "worker": worker, "event": kind, "time": self._elapsed(), **values}
        await self._append(self.events_path, doc)
        if kind == "update_sent":
            track.switch("sync", now)
        elif kind == "update_applied":
            track.switch("waiting", now)
        elif kind in ("lost", "finished"):
            track.switch(kind, now)
            track.finished = kind == "finished"

    def has_finished(self, worker: str) -> bool:
        return self._track(worker).finished

    def _elapsed(self) -> float:
        return round(time.time() - self.started_unix, 3)

    async def metrics(self, worker: str, round_: int, values: dict[str, float]) -> None:
        track = self._track(worker)
        track.bytes_sent += values.get("bytes_sent", 0.0)
        await self._append(
            self.metrics_path, {"round": round_, "worker": worker, "time": self._elapsed(), **values}
        )

    async def global_round(self, closed: m.RoundClosed) -> None:
        doc: dict[str, Any] = {
            "round": closed.round,
            "worker": "global",
            "loss": closed.loss,
            "samples": closed.samples,
            "num_updates": closed.num_updates,
            "time": self._elapsed(),
        }
        await self._append(self.metrics_path, doc)
        if closed.loss is not None:
            self.global_loss.append((closed.round, closed.loss))
            self.final_loss = closed.loss

    def status(self, job: JobSnapshot) -> dict[str, Any]:
        now = trio.current_time()
        workers = {}
        for peer, track in self.workers.items():
            workers[peer] = {
                "batches": track.batches,
                "samples": track.samples,
                "seconds_per_batch": track.compute_seconds / track.batches if track.batches else None,
                "loss": track.loss,
                "state": track.state,
                "round": track.round,
                "bytes_sent": track.bytes_sent,
            }
        return {
            "job": self.job.name,
            "job_id": self.job_id,
            "round": job.finished_rounds,
            "rounds": self.job.rounds,
            "elapsed_seconds": now - self.started,
            "global_loss": self.global_loss,
            "trainers": list(job.trainers),
            "parameter_server": job.parameter_server,
            "workers": workers,
            "done": job.done,
            "epoch": job.epoch,
            "skipped_slices": job.num_skipped_slices,
            "state": "failed" if job.error else "done" if job.done else "running",
            "error": job.error,
            "checkpoint": job.checkpoint,
        }

    async def write_status(self, job: JobSnapshot) -> None:
        """Replace ``status.json`` atomically with the job's state now."""
        text = json.dumps(self.status(job))

        def write() -> None:
            tmp = self.out / "status.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / "status.json")

        await self._off_loop(write)

    async def finish(self, job: JobSnapshot) -> None:
        """The last status, the loss plot and the report."""
        now = trio.current_time()
        for track in self.workers.values():
            track.switch("done", now)
        await self.write_status(job)
        end = max([s[1] for t in self.workers.values() for s in t.segments] + [now])
        # The threads get copies: progress reports may still change the live ones.
        global_loss = list(self.global_loss)
        workers = {w: dataclasses.replace(t, segments=list(t.segments)) for w, t in self.workers.items()}
        await self._off_loop(lambda: self._plot(global_loss))
        await self._off_loop(lambda: self._report(end, workers, global_loss))
        logger.info("results in %s", self.out)

    def _plot(self, global_loss: list[tuple[int, float]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        per_worker: dict[str, list[tuple[int, float]]] = {}
        for line in self.metrics_path.read_text().splitlines():
            doc = json.loads(line)
            if doc.get("worker") != "global" and doc.get("loss") is not None:
                per_worker.setdefault(doc["worker"], []).append((doc["round"], doc["loss"]))
        for worker, points in sorted(per_worker.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], alpha=0.5, label=f"trainer {worker[-6:]}")
        if global_loss:
            ax.plot(
                [p[0] for p in global_loss],
                [p[1] for p in global_loss],
                "k-o",
                label="global (held out)",
            )
        ax.set_xlabel("round")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.job.name}: loss per round")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)

    def _report(
        self, end: float, workers: dict[str, WorkerTrack], global_loss: list[tuple[int, float]]
    ) -> None:
        start = self.started
        width = 900.0
        scale = width / max(1e-9, end - start)
        rows = []
        for i, (peer, track) in enumerate(sorted(workers.items())):
            y = 30 + i * 28
            rows.append(f'<text x="0" y="{y + 14}" font-size="11">{html.escape(peer[-8:])}</text>')
            for s, e, kind in track.segments:
                color = {"compute": "#3a7", "sync": "#e94"}.get(kind, "#999")
                rows.append(
                    f'<rect x="{90 + (s - start) * scale:.1f}" y="{y}" width="{max(1.0, (e - s) * scale):.1f}" '
                    f'height="18" fill="{color}"><title>{kind} {e - s:.2f}s</title></rect>'
                )
        height = 40 + 28 * len(workers)
        timeline = f'<svg width="{width + 100}" height="{height}">{"".join(rows)}</svg>'
        table = "".join(
            f"<tr><td>{html.escape(p[-12:])}</td><td>{t.batches}</td><td>{t.samples}</td>"
            f"<td>{(t.compute_seconds / t.batches if t.batches else 0):.3f}</td><td>{t.loss}</td></tr>"
            for p, t in sorted(workers.items())
        )
        losses = "".join(f"<tr><td>{r}</td><td>{loss:.4f}</td></tr>" for r, loss in global_loss)
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(self.job.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:right}}</style></head><body>
<h1>Hypha job {html.escape(self.job.name)}</h1>
<p>{self.job.rounds} rounds, {self.job.samples_per_round} samples per round, encoding {self.job.encoding},
final held-out loss {self.final_loss}</p>
<h2>Loss per round</h2><img src="loss.png" alt="loss curve">
<table><tr><th>round</th><th>global loss</th></tr>{losses}</table>
<h2>Timeline</h2><p>green: compute, orange: synchronisation (update sent until new weights applied)</p>
{timeline}
<h2>Workers</h2><table><tr><th>worker</th><th>batches</th><th>samples</th><th>s/batch</th><th>last loss</th></tr>
{table}</table></body></html>"""
        (self.out / "report.html").write_text(page)
