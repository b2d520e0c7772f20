"""The executor's synchronous Session against a real bridge server on a Unix socket.

The server runs under trio in the test; every Session call runs in a worker thread through
``trio.to_thread.run_sync``, as an executor process would call it from its own thread.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
import trio

from hypha import errors
from hypha.bridge import Inbox, Subscription, serve_bridge
from hypha.protocol import bridge as b
from hypha.protocol.codec import ProtocolError
from hypha.training.session import BridgeError, Session

R = TypeVar("R")


class JobConfig(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    learning_rate: float


class FakeBackend:
    """A worker side that serves one slice, records sends and streams pushed files."""

    task_id = "task-s"

    def __init__(self) -> None:
        self.fail_with: Exception | None = None
        self.sent: list[tuple[b.SendRequest, Path]] = []
        self.metric_reports: list[b.MetricsBody] = []
        self.subscribed = trio.Event()
        self.inbox = Inbox()

    def job_document(self) -> bytes:
        return b'{"job_id": "j9", "learning_rate": 0.5}'

    async def fetch(self, ref: b.Reference, work_dir: Path) -> list[b.FetchedFile]:
        if self.fail_with is not None:
            raise self.fail_with
        (work_dir / "slice-0").write_bytes(b"\x01\x02\x03")
        return [b.FetchedFile(path="slice-0", size=3, sha256="ab" * 32, index=0, dataset="d")]

    async def send(self, request: b.SendRequest, path: Path) -> list[str]:
        self.sent.append((request, path))
        return list(request.peers) or ["ps"]

    def subscribe_received(self) -> AbstractContextManager[Subscription]:
        self.subscribed.set()
        return self.inbox.subscribe()

    async def progress(self, body: b.ProgressBody) -> b.InstructionBody:
        return b.InstructionBody(action="sync", batches=7, round=body.round)

    async def metrics(self, body: b.MetricsBody) -> None:
        self.metric_reports.append(body)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hs-", dir="/tmp") as name:
        yield Path(name)


class Harness:
    def __init__(self, backend: FakeBackend, session: Session) -> None:
        self.backend = backend
        self.session = session

    async def call(self, fn: Callable[[], R]) -> R:
        return await trio.to_thread.run_sync(fn)


@pytest.fixture
async def harness(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[Harness]:
    backend = FakeBackend()
    work_dir = short_dir / "work"
    work_dir.mkdir(mode=0o700)
    socket_path = short_dir / "bridge.sock"
    await nursery.start(partial(serve_bridge, backend, socket_path, work_dir, keepalive_seconds=0.05))
    env = {"HYPHA_SOCKET": str(socket_path), "HYPHA_WORK_DIR": str(work_dir)}
    with Session.from_env(env) as session:
        yield Harness(backend, session)


def received(n: int) -> b.ReceivedFile:
    return b.ReceivedFile(
        path=f"incoming/{n}", size=n, sha256="0" * 64, from_peer="p", purpose="weights", round=n
    )


def test_from_env_names_missing_variables() -> None:
    with pytest.raises(RuntimeError, match="HYPHA_SOCKET and HYPHA_WORK_DIR"):
        Session.from_env({})
    with pytest.raises(RuntimeError, match="HYPHA_WORK_DIR"):
        Session.from_env({"HYPHA_SOCKET": "/tmp/x.sock"})


async def test_health_job_and_config(harness: Harness) -> None:
    s = harness.session
    assert await harness.call(s.health) == b.HealthBody(ok=True, task_id="task-s")
    assert await harness.call(s.job) == FakeBackend().job_document()
    config = await harness.call(lambda: s.job_config(JobConfig))
    assert config == JobConfig(job_id="j9", learning_rate=0.5)
    with pytest.raises(ProtocolError):
        await harness.call(lambda: s.job_config(b.HealthBody))


async def test_fetch_places_file_in_work_dir(harness: Harness) -> None:
    s = harness.session
    (fetched,) = await harness.call(lambda: s.fetch(b.SliceRef(dataset="d")))
    assert (fetched.path, fetched.index, fetched.dataset) == ("slice-0", 0, "d")
    assert s.local_path(fetched.path).read_bytes() == b"\x01\x02\x03"


async def test_send_relative_and_absolute_paths(harness: Harness) -> None:
    s = harness.session
    (s.work_dir / "update.bin").write_bytes(b"u")
    delivered = await harness.call(
        lambda: s.send("update.bin", peers=["p1"], purpose="update", round=3, samples=10)
    )
    assert delivered == ["p1"]
    delivered = await harness.call(
        lambda: s.send(s.work_dir / "update.bin", target="parameter_server", encoding="fp16")
    )
    assert delivered == ["ps"]
    (first, _), (second, _) = harness.backend.sent
    assert (first.purpose, first.round, first.samples) == ("update", 3, 10)
    assert (second.target, second.encoding, second.path) == (
        "parameter_server",
        "fp16",
        "update.bin",
    )
    with pytest.raises(ValueError, match="not inside the work dir"):
        s.send("/etc/passwd", peers=["p1"])


async def test_errors_carry_status_and_code(harness: Harness) -> None:
    s = harness.session
    with pytest.raises(BridgeError) as refused:
        await harness.call(lambda: s.send("../escape", peers=["p1"]))
    assert (refused.value.status, refused.value.error) == (400, "invalid_request")
    harness.backend.fail_with = errors.TransferError("checksum mismatch")
    with pytest.raises(BridgeError) as failed:
        await harness.call(lambda: s.fetch(b.WeightsRef()))
    assert (failed.value.status, failed.value.error) == (502, "transfer_error")
    assert "checksum mismatch" in failed.value.detail


async def test_progress_and_metrics(harness: Harness) -> None:
    s = harness.session
    report = b.ProgressReport(batches=4, samples=128, seconds=0.5, loss=1.0, round=2)
    instruction = await harness.call(lambda: s.report_progress(report))
    assert instruction == b.InstructionBody(action="sync", batches=7, round=2)
    await harness.call(lambda: s.report_metrics(2, {"loss": 1.0}))
    assert harness.backend.metric_reports == [b.MetricsBody(round=2, values={"loss": 1.0})]


async def test_receive_yields_pushed_files(harness: Harness) -> None:
    s = harness.session
    async with trio.open_nursery() as nursery:
        result: list[list[b.ReceivedFile]] = []

        async def consume() -> None:
            result.append(await harness.call(lambda: list(islice(s.receive(), 3))))

        nursery.start_soon(consume)
        await harness.backend.subscribed.wait()
        for n in range(3):
            harness.backend.inbox.deliver(received(n))
    assert result == [[received(n) for n in range(3)]]


async def test_receive_ends_on_timeout_and_on_stream_end(harness: Harness) -> None:
    s = harness.session
    assert await harness.call(lambda: list(s.receive(timeout=0.2))) == []
    harness.backend.inbox.deliver(received(1))
    harness.backend.inbox.close()
    assert await harness.call(lambda: list(s.receive())) == [received(1)]


async def test_unreachable_bridge_is_a_bridge_error(short_dir: Path) -> None:
    with (
        Session(short_dir / "missing.sock", short_dir) as s,
        pytest.raises(BridgeError) as unreachable,
    ):
        await trio.to_thread.run_sync(s.health)
    assert unreachable.value.status == 0
