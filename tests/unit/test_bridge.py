"""The job bridge server on a real Unix socket, driven by httpx, with a fake worker backend."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from hypha import errors
from hypha.bridge import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    SSE_KEEPALIVE_SECONDS,
    BridgeBackend,
    Inbox,
    Subscription,
    resolve_in,
    serve_bridge,
)
from hypha.protocol import bridge as b

JOB = b'{"job_id": "j1", "config": {"lr": 0.001}}'


class FakeBackend:
    """A worker side that writes small files and records what the executor asked for."""

    def __init__(self, task_id: str = "task-1") -> None:
        self.task_id = task_id
        self.fail_with: BaseException | None = None
        self.bad_path = False
        self.hold = False
        self.fetch_started = trio.Event()
        self.fetch_cancelled = trio.Event()
        self.sent: list[tuple[b.SendRequest, Path]] = []
        self.reports: list[b.ProgressBody] = []
        self.metric_reports: list[b.MetricsBody] = []
        self.subscribed = trio.Event()
        self.inbox = Inbox()

    def job_document(self) -> bytes:
        return JOB

    async def fetch(self, ref: b.Reference, work_dir: Path) -> list[b.FetchedFile]:
        if self.fail_with is not None:
            raise self.fail_with
        if self.bad_path:
            return [b.FetchedFile(path="../outside", size=0, sha256="")]
        if self.hold:
            self.fetch_started.set()
            try:
                await trio.sleep_forever()
            finally:
                self.fetch_cancelled.set()
        if isinstance(ref, b.SliceRef):
            name = "slices/3.safetensors"
        elif isinstance(ref, b.WeightsRef):
            name = f"weights/{ref.round}.safetensors"
        elif isinstance(ref, b.PeerFileRef):
            name = f"files/{ref.name}"
        else:
            name = "files/uri.bin"
        data = f"{self.task_id}:{name}".encode()
        (work_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (work_dir / name).write_bytes(data)
        fetched = b.FetchedFile(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        if isinstance(ref, b.SliceRef):
            fetched = msgspec.structs.replace(fetched, index=3, dataset=ref.dataset, epoch=1)
        return [fetched]

    async def send(self, request: b.SendRequest, path: Path) -> list[str]:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append((request, path))
        return list(request.peers) or [f"{request.target}-peer"]

    def subscribe_received(self) -> AbstractContextManager[Subscription]:
        self.subscribed.set()
        return self.inbox.subscribe()

    async def progress(self, body: b.ProgressBody) -> b.InstructionBody:
        self.reports.append(body)
        if isinstance(body, b.UpdateAppliedReport):
            return b.InstructionBody(action="done")
        return b.InstructionBody(action="sync", batches=5, round=body.round)

    async def metrics(self, body: b.MetricsBody) -> None:
        self.metric_reports.append(body)


def received(task: str, n: int = 0) -> b.ReceivedFile:
    return b.ReceivedFile(
        path=f"incoming/{task}-{n}", size=n, sha256="0" * 64, from_peer="peer-x", purpose="update"
    )


@dataclass
class Bridge:
    backend: FakeBackend
    client: httpx.AsyncClient
    work_dir: Path
    socket_path: Path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths must stay under 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="hb-", dir="/tmp") as name:
        yield Path(name)


async def open_bridge(
    nursery: trio.Nursery,
    root: Path,
    backend: FakeBackend,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    keepalive_seconds: float = SSE_KEEPALIVE_SECONDS,
) -> tuple[Path, Path]:
    work_dir = root / backend.task_id
    work_dir.mkdir(mode=0o700)
    socket_path = root / f"{backend.task_id}.sock"
    serve = partial(
        serve_bridge,
        backend,
        socket_path,
        work_dir,
        max_body_bytes=max_body_bytes,
        keepalive_seconds=keepalive_seconds,
    )
    started = await nursery.start(serve)
    assert started == socket_path
    return socket_path, work_dir


def client_for(socket_path: Path) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    return httpx.AsyncClient(transport=transport, base_url="http://hypha", timeout=10)


@pytest.fixture
async def bridge(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[Bridge]:
    backend = FakeBackend()
    socket_path, work_dir = await open_bridge(
        nursery, short_dir, backend, max_body_bytes=4096, keepalive_seconds=0.05
    )
    async with client_for(socket_path) as client:
        yield Bridge(backend, client, work_dir, socket_path)


async def assert_refused(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    body = msgspec.json.decode(response.content, type=b.ErrorBody)
    assert body.error == error
    assert body.detail


async def assert_healthy(bridge: Bridge) -> None:
    response = await bridge.client.get("/health")
    assert response.status_code == 200
    assert msgspec.json.decode(response.content, type=b.HealthBody).ok


# --- routes ---------------------------------------------------------------------------------


async def test_health_and_job(bridge: Bridge) -> None:
    health = await bridge.client.get("/health")
    assert msgspec.json.decode(health.content, type=b.HealthBody) == b.HealthBody(ok=True, task_id="task-1")
    job = await bridge.client.get("/job")
    assert job.status_code == 200
    assert job.content == JOB
    assert job.headers["content-type"] == "application/json"


async def test_openapi_lists_every_route(bridge: Bridge) -> None:
    document = (await bridge.client.get("/openapi.json")).json()
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {
        "/job",
        "/resources/fetch",
        "/resources/send",
        "/resources/receive",
        "/progress",
        "/metrics",
        "/health",
        "/openapi.json",
    }
    schemas = document["components"]["schemas"]
    assert {"FetchRequest", "SendRequest", "ReceivedFile", "ErrorBody"} <= set(schemas)


@pytest.mark.parametrize(
    ("ref", "path"),
    [
        (b.SliceRef(dataset="mnist"), "slices/3.safetensors"),
        (b.WeightsRef(round=2), "weights/2.safetensors"),
        (b.PeerFileRef(peer="p1", name="vocab.json"), "files/vocab.json"),
        (b.UriRef(uri="https://example.org/x"), "files/uri.bin"),
    ],
)
async def test_fetch_each_reference(bridge: Bridge, ref: b.Reference, path: str) -> None:
    response = await bridge.client.post(
        "/resources/fetch", content=msgspec.json.encode(b.FetchRequest(ref=ref))
    )
    assert response.status_code == 200, response.text
    (fetched,) = msgspec.json.decode(response.content, type=b.FetchResponse).files
    assert fetched.path == path
    data = (bridge.work_dir / path).read_bytes()
    assert fetched.size == len(data)
    assert fetched.sha256 == hashlib.sha256(data).hexdigest()
    if isinstance(ref, b.SliceRef):
        assert (fetched.index, fetched.dataset, fetched.epoch) == (3, "mnist", 1)


async def test_send_to_peers_and_roles(bridge: Bridge) -> None:
    (bridge.work_dir / "out").mkdir()
    (bridge.work_dir / "out" / "update.bin").write_bytes(b"delta")
    request = b.SendRequest(path="out/update.bin", peers=["a", "b"], purpose="update", round=4)
    response = await bridge.client.post("/resources/send", content=msgspec.json.encode(request))
    assert response.status_code == 200, response.text
    assert msgspec.json.decode(response.content, type=b.SendResponse).delivered == ["a", "b"]
    to_ps = b.SendRequest(path="out/update.bin", target="parameter_server", samples=64)
    response = await bridge.client.post("/resources/send", content=msgspec.json.encode(to_ps))
    assert response.json() == {"delivered": ["parameter_server-peer"]}
    assert [(r, p) for r, p in bridge.backend.sent] == [
        (request, bridge.work_dir.resolve() / "out" / "update.bin"),
        (to_ps, bridge.work_dir.resolve() / "out" / "update.bin"),
    ]


async def test_progress_and_metrics(bridge: Bridge) -> None:
    reports: list[b.ProgressBody] = [
        b.ProgressReport(batches=10, samples=320, seconds=1.5, loss=0.25, round=2),
        b.UpdateSentReport(round=2, samples=320),
        b.UpdateAppliedReport(round=2),
    ]
    instructions = []
    for report in reports:
        response = await bridge.client.post("/progress", content=msgspec.json.encode(report))
        assert response.status_code == 200, response.text
        instructions.append(msgspec.json.decode(response.content, type=b.InstructionBody))
    assert instructions[0] == b.InstructionBody(action="sync", batches=5, round=2)
    assert instructions[2].action == "done"
    assert bridge.backend.reports == reports
    metrics = b.MetricsBody(round=2, values={"loss": 0.25, "accuracy": 0.9})
    response = await bridge.client.post("/metrics", content=msgspec.json.encode(metrics))
    assert response.status_code == 204
    assert bridge.backend.metric_reports == [metrics]


# --- receive (server-sent events) ----------------------------------------------------------


async def next_event(lines: AsyncIterator[str]) -> b.ReceivedFile:
    """Skip comments and blank lines; decode the next ``data:`` line."""
    async for line in lines:
        if line.startswith("data: "):
            return msgspec.json.decode(line[6:], type=b.ReceivedFile)
    raise AssertionError("stream ended")


async def test_receive_streams_files_and_keepalives(bridge: Bridge) -> None:
    early = received("task-1", 0)
    bridge.backend.inbox.deliver(early)  # nobody subscribed yet: queued for the first subscriber
    async with bridge.client.stream("GET", "/resources/receive") as response:
        assert response.headers["content-type"] == "text/event-stream"
        lines = response.aiter_lines()
        assert await next_event(lines) == early
        late = received("task-1", 1)
        bridge.backend.inbox.deliver(late)
        assert await next_event(lines) == late
        async for line in lines:  # idle: keepalive comments every keepalive_seconds
            if line == ": keepalive":
                break
        bridge.backend.inbox.close()
        assert [line async for line in lines if line.startswith("data:")] == []
    await assert_healthy(bridge)


async def test_receive_unsubscribes_when_client_hangs_up(bridge: Bridge) -> None:
    async with bridge.client.stream("GET", "/resources/receive") as response:
        assert response.status_code == 200
        assert bridge.backend.inbox.num_subscribers == 1
    with trio.fail_after(5):
        while bridge.backend.inbox.num_subscribers:
            await trio.sleep(0.01)
    await assert_healthy(bridge)


async def test_two_bridges_keep_their_files_apart(nursery: trio.Nursery, short_dir: Path) -> None:
    backends = [FakeBackend("task-a"), FakeBackend("task-b")]
    sockets = [(await open_bridge(nursery, short_dir, be))[0] for be in backends]
    async with (
        client_for(sockets[0]) as client_a,
        client_for(sockets[1]) as client_b,
        client_a.stream("GET", "/resources/receive") as stream_a,
        client_b.stream("GET", "/resources/receive") as stream_b,
    ):
        for n in range(3):
            backends[0].inbox.deliver(received("task-a", n))
            backends[1].inbox.deliver(received("task-b", n))
        lines_a, lines_b = stream_a.aiter_lines(), stream_b.aiter_lines()
        got_a = [await next_event(lines_a) for _ in range(3)]
        got_b = [await next_event(lines_b) for _ in range(3)]
    assert got_a == [received("task-a", n) for n in range(3)]
    assert got_b == [received("task-b", n) for n in range(3)]


async def test_receive_with_idle_ends_and_keeps_later_files(bridge: Bridge) -> None:
    async with bridge.client.stream("GET", "/resources/receive", params={"idle": "0.2"}) as response:
        assert response.status_code == 200
        assert [line async for line in response.aiter_lines() if line.startswith("data:")] == []
    # Delivered the moment the idle stream ended: the next stream gets it.
    late = received("task-1", 7)
    bridge.backend.inbox.deliver(late)
    async with bridge.client.stream("GET", "/resources/receive", params={"idle": "0.2"}) as response:
        assert await next_event(response.aiter_lines()) == late
    assert bridge.backend.inbox.pending == []


@pytest.mark.parametrize("query", ["idle=0", "idle=-1", "idle=nan", "idle=inf", "idle=x", "wait=1"])
async def test_receive_refuses_bad_idle(bridge: Bridge, query: str) -> None:
    response = await bridge.client.get(f"/resources/receive?{query}")
    await assert_refused(response, 400, "invalid_request")
    assert bridge.backend.inbox.num_subscribers == 0
    await assert_healthy(bridge)


# --- hardening ------------------------------------------------------------------------------


async def test_socket_is_private_and_removed_on_exit(short_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        socket_path, _ = await open_bridge(nursery, short_dir, FakeBackend())
        mode = os.stat(socket_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        nursery.cancel_scope.cancel()
    assert not socket_path.exists()


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "escape/passwd", ""])
async def test_send_refuses_paths_outside_work_dir(bridge: Bridge, path: str) -> None:
    (bridge.work_dir / "escape").symlink_to("/etc")
    request = json.dumps({"path": path, "peers": ["a"]})
    response = await bridge.client.post("/resources/send", content=request)
    await assert_refused(response, 400, "invalid_request")
    assert bridge.backend.sent == []
    await assert_healthy(bridge)


async def test_send_refuses_missing_file_and_bad_targets(bridge: Bridge) -> None:
    (bridge.work_dir / "f").write_bytes(b"x")
    for body in [
        {"path": "nope", "peers": ["a"]},
        {"path": "f"},  # target peers without peers
        {"path": "f", "target": "trainers", "peers": ["a"]},
        {"path": "f", "peers": ["a"], "encoding": "bf17"},
    ]:
        response = await bridge.client.post("/resources/send", content=json.dumps(body))
        await assert_refused(response, 400, "invalid_request")
    await assert_healthy(bridge)


@pytest.mark.parametrize("route", ["/resources/fetch", "/resources/send", "/progress", "/metrics"])
@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"ref": {"type": "ftp"}}'])
async def test_malformed_bodies_are_400(bridge: Bridge, route: str, body: bytes) -> None:
    await assert_refused(await bridge.client.post(route, content=body), 400, "invalid_request")
    await assert_healthy(bridge)


async def test_unknown_reference_type_is_400(bridge: Bridge) -> None:
    body = {"ref": {"type": "huggingface", "repository": "x/y"}}
    response = await bridge.client.post("/resources/fetch", content=json.dumps(body))
    await assert_refused(response, 400, "invalid_request")
    assert "huggingface" in response.json()["detail"]


async def test_oversized_body_is_413(bridge: Bridge) -> None:
    body = b'{"ref": {"type": "uri", "uri": "' + b"x" * 100_000 + b'"}}'
    response = await bridge.client.post("/resources/fetch", content=body)
    await assert_refused(response, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # chunked, no content-length
        for _ in range(50):
            yield b"y" * 1000

    response = await bridge.client.post("/progress", content=chunks())
    await assert_refused(response, 413, "payload_too_large")
    await assert_healthy(bridge)


async def test_unknown_route_and_wrong_method(bridge: Bridge) -> None:
    await assert_refused(await bridge.client.get("/nope"), 404, "not_found")
    response = await bridge.client.get("/progress")
    await assert_refused(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    await assert_refused(await bridge.client.post("/health"), 405, "method_not_allowed")
    await assert_healthy(bridge)


@pytest.mark.parametrize(
    ("exc", "status", "error"),
    [
        (errors.NetworkError("peer gone"), 502, "network_error"),
        (errors.PeerUnreachableError("no route"), 502, "network_error"),
        (errors.TransferError("sha256 mismatch"), 502, "transfer_error"),
        (errors.DataError("slice 9 out of range"), 400, "data_error"),
        (errors.NotReadyError("no slice available right now"), 503, "not_ready"),
        (ValueError("uri scheme not allowed"), 400, "invalid_request"),
        (errors.LeaseError("lease expired"), 409, "conflict"),
        (OSError(28, "No space left on device"), 500, "io_error"),
        (RuntimeError("bug"), 500, "internal_error"),
    ],
)
async def test_backend_errors_map_to_status(bridge: Bridge, exc: Exception, status: int, error: str) -> None:
    bridge.backend.fail_with = exc
    request = msgspec.json.encode(b.FetchRequest(ref=b.SliceRef()))
    await assert_refused(await bridge.client.post("/resources/fetch", content=request), status, error)
    await assert_healthy(bridge)


async def test_backend_path_outside_work_dir_is_500(bridge: Bridge) -> None:
    bridge.backend.bad_path = True
    request = msgspec.json.encode(b.FetchRequest(ref=b.SliceRef()))
    response = await bridge.client.post("/resources/fetch", content=request)
    await assert_refused(response, 500, "internal_error")


async def test_hanging_up_cancels_the_backend_call(bridge: Bridge) -> None:
    bridge.backend.hold = True
    request = msgspec.json.encode(b.FetchRequest(ref=b.SliceRef()))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(bridge.client.post, "/resources/fetch", content=request))
            await bridge.backend.fetch_started.wait()
            nursery.cancel_scope.cancel()  # the executor gives up: its connection closes
        await bridge.backend.fetch_cancelled.wait()
    bridge.backend.hold = False
    await assert_healthy(bridge)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("a" * 5000, "too long"),
        ("a" * 300, "longer than 255 bytes"),
        ("a/" * 40 + "x", "41 components"),
        ("x\x01y", "control characters"),
        ("x\x7fy", "control characters"),
        ("a/\n/b", "control characters"),
        ("x\x00y", "NUL byte"),
        ("\udc80.bin", "malformed"),  # a lone surrogate: msgspec refuses the JSON
        (b"\xff\xfe.bin", "malformed"),  # bytes that are not UTF-8
        ("loop/x", "cannot be resolved"),
    ],
)
async def test_odd_paths_are_400_never_500(
    nursery: trio.Nursery,
    short_dir: Path,
    caplog: pytest.LogCaptureFixture,
    path: str | bytes,
    reason: str,
) -> None:
    # The default body limit, so that a 5000-character path reaches the path rule (it was a 500).
    socket_path, work_dir = await open_bridge(nursery, short_dir, FakeBackend())
    (work_dir / "loop").symlink_to("loop")
    async with client_for(socket_path) as client:
        if isinstance(path, bytes):
            request = b'{"path": "' + path + b'", "peers": ["a"]}'
        else:
            request = json.dumps({"path": path, "peers": ["a"]}).encode()
        response = await client.post("/resources/send", content=request)
        await assert_refused(response, 400, "invalid_request")
        assert reason in response.json()["detail"]
        assert len(response.json()["detail"]) < 200  # the start of the path, not all of it
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback
        assert (await client.get("/health")).status_code == 200


async def raw_exchange(socket_path: Path, head: bytes) -> int:
    """Send one raw request head; return the answer's status (the server closes after it)."""
    stream = await trio.open_unix_socket(str(socket_path))
    async with stream:
        await stream.send_all(head)
        answer = b""
        with trio.fail_after(10):
            while b"\r\n" not in answer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                answer += chunk
    return int(answer.split(b" ", 2)[1])


async def test_odd_request_paths_and_heads_are_4xx(bridge: Bridge) -> None:
    close = b"Host: hypha\r\nConnection: close\r\n\r\n"
    # Too long for any route, or with control characters: 400 from the app, no traceback.
    assert await raw_exchange(bridge.socket_path, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n" + close) == 400
    assert await raw_exchange(bridge.socket_path, b"GET /a%01b HTTP/1.1\r\n" + close) == 400
    assert await raw_exchange(bridge.socket_path, b"GET /a%ff%fe HTTP/1.1\r\n" + close) == 404
    # Past MAX_HEAD_BYTES the server itself refuses the head (431), before any route runs.
    huge_line = b"GET /" + b"a" * (MAX_HEAD_BYTES + 1) + b" HTTP/1.1\r\n" + close
    assert 400 <= await raw_exchange(bridge.socket_path, huge_line) < 500
    huge_header = b"GET /health HTTP/1.1\r\nX-Big: " + b"y" * (MAX_HEAD_BYTES + 1) + b"\r\n" + close
    assert await raw_exchange(bridge.socket_path, huge_header) == 431
    await assert_healthy(bridge)


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
async def test_socket_directory_must_be_private(short_dir: Path, mode: int) -> None:
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="must be private")):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_bridge, FakeBackend(), shared / "b.sock", short_dir)
    assert not (shared / "b.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory to another user")
async def test_socket_directory_of_another_user_is_refused(short_dir: Path) -> None:
    theirs = short_dir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="belongs to uid 65534")):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_bridge, FakeBackend(), theirs / "b.sock", short_dir)


# --- resolve_in -----------------------------------------------------------------------------


def test_resolve_in_follows_symlinks_inside_only(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "inside").symlink_to(tmp_path / "data")
    (tmp_path / "outside").symlink_to(tmp_path.parent)
    assert resolve_in(tmp_path, "inside/x") == (tmp_path / "data" / "x").resolve()
    assert resolve_in(tmp_path, "./data/./y") == (tmp_path / "data" / "y").resolve()
    for bad in ["outside/x", "/abs", "..", "a/../b", "x\x00y", ""]:
        with pytest.raises(ValueError, match="path"):
            resolve_in(tmp_path, bad)


_parts = st.sampled_from(["a", "b", ".", "..", "", "c.txt", "..."])


@given(st.lists(_parts, max_size=6), st.booleans())
def test_resolve_in_never_escapes(parts: list[str], absolute: bool) -> None:
    root = Path(tempfile.gettempdir()).resolve() / "hypha-resolve-root"
    rel = ("/" if absolute else "") + "/".join(parts)
    try:
        resolved = resolve_in(root, rel)
    except ValueError:
        return
    assert resolved.is_relative_to(root)
    assert not absolute
    assert ".." not in parts


@given(st.text(max_size=300) | st.text(alphabet="ab/\x00\n.", max_size=2000))
def test_resolve_in_refuses_with_value_error_only(rel: str) -> None:
    root = Path(tempfile.gettempdir()).resolve() / "hypha-resolve-root"
    try:
        resolved = resolve_in(root, rel)
    except ValueError as exc:
        message = str(exc)
    else:
        assert resolved.is_relative_to(root)
        return
    assert len(message) < 200  # the start of the path at most


def test_fake_backend_satisfies_the_protocol() -> None:
    backend: BridgeBackend = FakeBackend()
    assert backend.task_id == "task-1"
