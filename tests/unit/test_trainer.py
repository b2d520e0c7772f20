"""The real trainer process against a real bridge server with a fake worker behind it.

The fake serves a tiny GPT job, weights written with the job's seed, and slices of random
token ids; it orders a sync after a couple of progress reports, averages the one update it
gets (the mean of one delta is that delta), pushes the new weights back and ends the job
after two rounds.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import msgspec
import pytest
import torch
import trio
from safetensors.torch import save_file
from torch import Tensor

from hypha import errors
from hypha.bridge import Inbox, Subscription, serve_bridge
from hypha.protocol import bridge as b
from hypha.protocol.messages import Purpose
from hypha.protocol.tasks import InnerDoc, ModelDoc, TrainTask
from hypha.training import build_model, load_tensors_file, save_tensors_file, snapshot

GPT_OPTIONS = {"dim": 32.0, "num_layers": 1.0, "num_heads": 2.0, "seq_len": 16.0}
SEED = 7
BATCH_SIZE = 4
ROWS_PER_SLICE = 24
BATCHES_PER_SLICE = ROWS_PER_SLICE // BATCH_SIZE
CONTINUE = b.InstructionBody(action="continue")
MARKER = "ln_f.bias"


def make_task(model_name: str = "gpt") -> TrainTask:
    return TrainTask(
        job_id="job-t",
        model=ModelDoc(name=model_name, options=GPT_OPTIONS),
        dataset="toy",
        batch_size=BATCH_SIZE,
        seed=SEED,
        inner=InnerDoc(lr=1e-3, warmup_steps=2, total_steps=200),
        device="cpu",
    )


def gpt_params() -> dict[str, Tensor]:
    options = {k: int(v) for k, v in GPT_OPTIONS.items()}
    return snapshot(build_model("gpt", options, seed=SEED))


@dataclass
class Update:
    request: b.SendRequest
    tensors: dict[str, Tensor]
    metadata: dict[str, str]


@dataclass
class FakeWorker:
    """The worker side of one task: job, weights, slices, a scheduler and a parameter server."""

    task: TrainTask
    work_dir: Path
    sync_batches: tuple[int, ...] = (3, 0)
    """Batches ordered by the sync of each round; the job is done after the last one."""
    task_id: str = "task-t"
    global_params: dict[str, Tensor] = field(default_factory=gpt_params)
    reports: list[b.ProgressBody] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)
    metrics_reports: list[b.MetricsBody] = field(default_factory=list)
    num_slice_fetches: int = 0
    num_weights_fetches: int = 0
    round: int = 0
    reports_this_round: int = 0
    first_report: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.inbox = Inbox()

    def job_document(self) -> bytes:
        return msgspec.json.encode(self.task)

    async def fetch(self, ref: b.Reference, work_dir: Path) -> list[b.FetchedFile]:
        if isinstance(ref, b.WeightsRef):
            self.num_weights_fetches += 1
            if self.num_weights_fetches == 1:  # the parameter server has not published yet
                raise errors.NotReadyError("weights are not ready yet")
            meta = {"round": "0"}
            size = save_tensors_file(work_dir / "weights.safetensors", self.global_params, "fp16", meta)
            return [b.FetchedFile(path="weights.safetensors", size=size, sha256="0" * 64)]
        assert isinstance(ref, b.SliceRef)
        n = self.num_slice_fetches
        self.num_slice_fetches += 1
        # No slice yet, said both ways a worker says it: the trainer backs off and retries.
        if n == 0:
            raise errors.NotReadyError("no slice available right now: all assigned")
        if n == 1:
            return []
        generator = torch.Generator().manual_seed(n)
        ids = torch.randint(0, 256, (ROWS_PER_SLICE, 16), generator=generator)  # [N, T]
        name = f"slices/toy-{n % 3:05d}.safetensors"  # the same path again every epoch
        (work_dir / "slices").mkdir(exist_ok=True)
        save_file({"input_ids": ids}, str(work_dir / name))
        size = (work_dir / name).stat().st_size
        return [
            b.FetchedFile(path=name, size=size, sha256="0" * 64, index=n % 3, dataset="toy", epoch=n // 3)
        ]

    async def send(self, request: b.SendRequest, path: Path) -> list[str]:
        tensors, metadata = load_tensors_file(path)
        self.updates.append(Update(request, tensors, metadata))
        # One trainer: the sample-weighted mean of the deltas is its delta (outer lr 1).
        self.global_params = {k: v - tensors[k] for k, v in self.global_params.items()}
        # A marker only loaded weights carry: a trainer that kept its own would send ~ -1.
        self.global_params[MARKER] = self.global_params[MARKER] + 1.0  # [D]
        (self.work_dir / "incoming").mkdir(exist_ok=True)
        name = f"incoming/weights-{request.round}.safetensors"
        save_tensors_file(self.work_dir / name, self.global_params, "fp32")
        # Files the trainer must skip: another purpose, and weights of another round.
        strays: tuple[tuple[Purpose, int], ...] = (("file", request.round), ("weights", request.round + 9))
        for purpose, round in strays:
            self.inbox.deliver(self._received(name, purpose, round))
        self.inbox.deliver(self._received(name, "weights", request.round))
        return ["ps"]

    def _received(self, path: str, purpose: Purpose, round: int) -> b.ReceivedFile:
        return b.ReceivedFile(
            path=path, size=1, sha256="0" * 64, from_peer="ps", purpose=purpose, round=round
        )

    def subscribe_received(self) -> AbstractContextManager[Subscription]:
        return self.inbox.subscribe()

    async def progress(self, body: b.ProgressBody) -> b.InstructionBody:
        self.reports.append(body)
        if isinstance(body, b.ProgressReport):
            self.first_report.set()
            self.reports_this_round += 1
            if self.reports_this_round == 2 and self.round < len(self.sync_batches):
                return b.InstructionBody(
                    action="sync", batches=self.sync_batches[self.round], round=self.round
                )
        if isinstance(body, b.UpdateAppliedReport):
            self.round, self.reports_this_round = body.round + 1, 0
            if self.round == len(self.sync_batches):
                return b.InstructionBody(action="done")
        return CONTINUE

    async def metrics(self, body: b.MetricsBody) -> None:
        self.metrics_reports.append(body)


@dataclass
class Harness:
    fake: FakeWorker
    env: dict[str, str]
    log_dir: Path

    def command(self) -> list[str]:
        return [sys.executable, "-m", "hypha.training.trainer"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ht-", dir="/tmp") as name:
        yield Path(name)


async def start_bridge(nursery: trio.Nursery, short_dir: Path, task: TrainTask) -> Harness:
    work_dir = short_dir / "work"
    work_dir.mkdir(mode=0o700)
    (work_dir / "job.json").write_bytes(msgspec.json.encode(task))
    fake = FakeWorker(task, work_dir)
    socket_path = short_dir / "bridge.sock"
    await nursery.start(partial(serve_bridge, fake, socket_path, work_dir, keepalive_seconds=0.5))
    env = {
        **os.environ,
        "HYPHA_SOCKET": str(socket_path),
        "HYPHA_WORK_DIR": str(work_dir),
        "HYPHA_JOB": str(work_dir / "job.json"),
        "HYPHA_TORCH_THREADS": "1",
    }
    return Harness(fake, env, short_dir)


@pytest.fixture
async def harness(nursery: trio.Nursery, short_dir: Path) -> Harness:
    return await start_bridge(nursery, short_dir, make_task())


async def run_trainer(harness: Harness) -> tuple[int, str]:
    """Run the trainer to its end; return its exit code and stderr."""
    with trio.fail_after(60):
        done = await trio.run_process(
            harness.command(), env=harness.env, capture_stdout=True, capture_stderr=True, check=False
        )
    return done.returncode, done.stderr.decode()


async def test_two_rounds_of_diloco(harness: Harness) -> None:
    code, stderr = await run_trainer(harness)
    assert code == 0, stderr
    fake = harness.fake
    shapes = {name: tuple(t.shape) for name, t in gpt_params().items()}
    assert [u.request.round for u in fake.updates] == [0, 1]
    progress = [r for r in fake.reports if isinstance(r, b.ProgressReport)]
    for round, update in enumerate(fake.updates):
        request = update.request
        assert (request.target, request.purpose, request.encoding) == ("parameter_server", "update", "fp32")
        of_round = [r for r in progress if r.round == round]
        num_batches = sum(r.batches for r in of_round)
        assert request.samples == sum(r.samples for r in of_round) == BATCH_SIZE * num_batches > 0
        assert update.metadata["round"] == str(round)
        assert update.metadata["samples"] == str(request.samples)
        assert {name: tuple(t.shape) for name, t in update.tensors.items()} == shapes
        assert any(bool(t.abs().sum() > 0) for t in update.tensors.values())
    # Round 1 started from the pushed weights: its delta is a few AdamW steps, not the marker.
    assert float(fake.updates[1].tensors[MARKER].abs().max()) < 0.5
    # The sync came in answer to the second report of round 0 and asked for 3 more batches:
    # exactly 3 ran after that report, however many ran while the answer was on its way.
    after_sync = sum(r.batches for r in progress if r.round == 0) - progress[0].batches - progress[1].batches
    assert after_sync == 3
    assert [r for r in fake.reports if isinstance(r, b.UpdateSentReport)] == [
        b.UpdateSentReport(round=u.request.round, samples=u.request.samples) for u in fake.updates
    ]
    assert [r for r in fake.reports if isinstance(r, b.UpdateAppliedReport)] == [
        b.UpdateAppliedReport(round=0),
        b.UpdateAppliedReport(round=1),
    ]
    assert [m.round for m in fake.metrics_reports] == [0, 1]
    for metrics, update in zip(fake.metrics_reports, fake.updates, strict=True):
        assert math.isfinite(metrics.values["loss"])
        assert metrics.values["samples"] == update.request.samples
        assert metrics.values["seconds_per_batch"] > 0
    # Progress goes out in batches, not one report per step.
    total_batches = sum(r.batches for r in progress)
    assert len(progress) < total_batches
    # Fully consumed slices are reported in order; slice files are deleted once loaded.
    done = [i for r in progress for i in r.slices_done]
    assert len(done) in ((total_batches - 1) // BATCHES_PER_SLICE, total_batches // BATCHES_PER_SLICE)
    assert done == [n % 3 for n in range(2, 2 + len(done))]
    assert len(list((fake.work_dir / "slices").iterdir())) <= 1  # one fetched as the trainer exited


async def test_unknown_model_is_a_one_line_error(nursery: trio.Nursery, short_dir: Path) -> None:
    harness = await start_bridge(nursery, short_dir, make_task(model_name="nope"))
    code, stderr = await run_trainer(harness)
    assert code == 3
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "unknown model 'nope'" in lines[0]
    assert harness.fake.updates == []


async def test_sigterm_stops_the_trainer_promptly(nursery: trio.Nursery, harness: Harness) -> None:
    harness.fake.sync_batches = ()  # never sync: the trainer would run until told otherwise
    stderr_path = harness.log_dir / "trainer.err"
    with stderr_path.open("wb") as stderr:
        process = await nursery.start(
            partial(
                trio.run_process,
                harness.command(),
                env=harness.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                check=False,
            )
        )
        with trio.fail_after(60):
            await harness.fake.first_report.wait()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr_path.read_text()
    assert "Traceback" not in stderr_path.read_text()
