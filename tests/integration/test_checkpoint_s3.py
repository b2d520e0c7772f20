"""Checkpoints on S3: the real store and s3fs against moto's S3 server on a free loopback port.

The interrupted upload is a real one: a child process writes a 24 MiB checkpoint in 5 MiB
multipart parts through a loopback proxy that stops forwarding after 8 MiB, so the child is
deterministically mid-upload (the multipart upload exists, its object does not) when the test
SIGKILLs it; the next write's prune aborts that upload. No sleeps: every wait is an event or
a process exit under a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from hypha.checkpoint import MANIFEST_NAME, CheckpointError, StoreOptions, open_store

REGION = "us-east-1"
PART_SIZE_BYTES = 5 * 1024 * 1024
DEADLINE_SECONDS = 60.0


@dataclass(frozen=True)
class S3:
    endpoint_url: str
    bucket: str
    client: object  # a boto3 S3 client

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def options(self, **changes: object) -> StoreOptions:
        return StoreOptions(endpoint_url=self.endpoint_url, region=REGION, **changes)  # type: ignore[arg-type]

    def keys(self, prefix: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)  # type: ignore[attr-defined]
        return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials from the standard variables, and nothing from this machine's AWS set-up."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def moto_endpoint(aws_environment: None) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, port chosen by the OS; stopped and reset even on failure."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield endpoint
    finally:
        # moto keeps its buckets in process-wide state: start every test from none.
        try:
            requests.post(f"{endpoint}/moto-api/reset", timeout=DEADLINE_SECONDS).raise_for_status()
        finally:
            server.stop()


@pytest.fixture
def s3(moto_endpoint: str) -> S3:
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    client.create_bucket(Bucket="hypha-ckpt")
    return S3(endpoint_url=moto_endpoint, bucket="hypha-ckpt", client=client)


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_round_trip_on_s3(s3: S3, compress: str) -> None:
    store = open_store(s3.url("jobs/job-1"), s3.options(compress=compress, part_size_bytes=PART_SIZE_BYTES))
    assert store.latest() is None
    small = store.write(round_=1, data=b"\x00" * 1000 + b"params", metadata={"job_id": "job-1"})
    # 12 MiB of incompressible bytes in 5 MiB parts: a multipart upload that completes.
    large_data = os.urandom(12 * 1024 * 1024)
    large = store.write(round_=2, data=large_data, metadata={"job_id": "job-1", "round": "2"})

    got = store.latest()
    assert got is not None
    assert got == (large, large_data, {"job_id": "job-1", "round": "2"})
    assert store.list() == [small, large]
    suffix = ".zst" if compress == "zstd" else ""
    assert s3.keys("jobs/job-1/") == sorted(
        f"jobs/job-1/{info.name}/{leaf}"
        for info in (small, large)
        for leaf in (MANIFEST_NAME, f"data.safetensors{suffix}")
    )
    # Another process (a restarted server) sees the same: no listing cache between them.
    reopened = open_store(s3.url("jobs/job-1/"), s3.options())
    assert reopened.list() == [small, large]


def test_only_the_last_n_are_kept_on_s3(s3: S3) -> None:
    store = open_store(s3.url("keep"), s3.options(keep_last_n=2))
    for round_ in range(1, 5):
        store.write(round_=round_, data=f"round {round_}".encode())
    assert [info.round for info in store.list()] == [3, 4]
    assert len(s3.keys("keep/")) == 4
    assert store.statistics().num_pruned == 2


def test_a_manifest_lying_about_the_sha_on_s3_falls_back(s3: S3) -> None:
    store = open_store(s3.url("lies"), s3.options())
    first = store.write(round_=1, data=b"one")
    second = store.write(round_=2, data=b"two")
    key = f"lies/{second.name}/{MANIFEST_NAME}"
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
    lying = body.replace(second.sha256.encode(), b"0" * 64)
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=lying)  # type: ignore[attr-defined]
    got = store.latest()
    assert got == (first, b"one", {})


class StallingProxy:
    """A loopback TCP proxy that forwards ``budget`` bytes upstream in all, then holds the rest.

    The client's requests then hang mid-body, as over a link that died, until ``close()``.
    ``stalled`` is set once the budget is spent.
    """

    def __init__(self, upstream: tuple[str, int], budget: int) -> None:
        self._upstream = upstream
        self._budget = budget
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.stalled = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream, True)
            self._spawn(self._pump, upstream, client, False)

    def _allowance(self, wanted: int) -> int:
        with self._lock:
            granted = min(wanted, self._budget)
            self._budget -= granted
            if self._budget == 0:
                self.stalled.set()
            return granted

    def _pump(self, source: socket.socket, sink: socket.socket, metered: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                granted = self._allowance(len(chunk)) if metered else len(chunk)
                sink.sendall(chunk[:granted])
                if granted < len(chunk):
                    self._closing.wait()  # hold the connection open, forwarding nothing more
                    return

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=DEADLINE_SECONDS)


CHILD = """
import os, sys
from hypha.checkpoint import StoreOptions, open_store
url, endpoint, part_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = open_store(url, StoreOptions(endpoint_url=endpoint, region="us-east-1", part_size_bytes=part_size))
store.write(round_=2, data=os.urandom(24 * 1024 * 1024), metadata={"writer": "child"})
print("the upload finished: the proxy did not stall it", flush=True)
"""


def test_an_upload_killed_halfway_leaves_the_previous_checkpoint(s3: S3, tmp_path: Path) -> None:
    store = open_store(s3.url("killed"), s3.options())
    first = store.write(round_=1, data=b"round one", metadata={"writer": "test"})

    host, port = s3.endpoint_url.removeprefix("http://").rsplit(":", 1)
    proxy = StallingProxy((host, int(port)), budget=8 * 1024 * 1024)
    log = tmp_path / "child.log"
    with open(log, "wb") as output:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                s3.url("killed"),
                f"http://127.0.0.1:{proxy.port}",
                str(PART_SIZE_BYTES),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        assert proxy.stalled.wait(DEADLINE_SECONDS), f"the child never got 8 MiB out: {log.read_text()}"
        assert child.poll() is None, f"the child exited: {log.read_text()}"
        uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix="killed/")  # type: ignore[attr-defined]
        in_progress = [u["Key"] for u in uploads.get("Uploads", [])]
        assert len(in_progress) == 1, in_progress
        assert in_progress[0].startswith("killed/ckpt-00000002-"), in_progress
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=DEADLINE_SECONDS) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=DEADLINE_SECONDS)
        proxy.close()

    # The upload is still open on the server, and nothing of round 2 is visible.
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix="killed/")  # type: ignore[attr-defined]
    assert [u["Key"] for u in uploads.get("Uploads", [])] == in_progress
    assert s3.keys("killed/") == [
        f"killed/{first.name}/data.safetensors",
        f"killed/{first.name}/{MANIFEST_NAME}",
    ]

    restarted = open_store(s3.url("killed"), s3.options())
    got = restarted.latest()
    assert got == (first, b"round one", {"writer": "test"})
    assert restarted.list() == [first]
    # The server retries round 2; that write's prune aborts the dead upload, freeing its parts.
    second = restarted.write(round_=2, data=b"round two, again")
    assert restarted.list() == [first, second]
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix="killed/")  # type: ignore[attr-defined]
    assert uploads.get("Uploads", []) == []
    assert restarted.statistics().num_uploads_aborted == 1


def test_a_missing_bucket_is_a_checkpoint_error(moto_endpoint: str) -> None:
    options = StoreOptions(endpoint_url=moto_endpoint, region=REGION)
    expected = "s3://no-such-bucket/jobs: cannot list it: bucket 'no-such-bucket' does not exist"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        open_store("s3://no-such-bucket/jobs", options)


def test_missing_credentials_are_a_checkpoint_error(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    with pytest.raises(CheckpointError, match="cannot list it: Unable to locate credentials"):
        open_store(s3.url("x"), s3.options())
