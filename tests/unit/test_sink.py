"""The receiving end of bulk transfers: the checked temp file and the pipelined writer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from hypha.net.sink import FinalTransferError, HashingWriter, Sink


def test_writer_keeps_order_and_hash(tmp_path: Path) -> None:
    data = os.urandom(10 * 1000 + 7)
    sink = Sink.create(tmp_path / "out.bin")
    with HashingWriter(sink, 1000) as writer:
        for start in range(0, len(data), 1000):
            buffer = writer.buffer()
            piece = data[start : start + 1000]
            buffer[: len(piece)] = piece
            writer.submit(buffer, len(piece))
    sink.check(hashlib.sha256(data).hexdigest())
    sink.commit()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_write_error_reaches_the_network_thread(tmp_path: Path) -> None:
    sink = Sink.create(tmp_path / "out.bin")

    def broken(*chunks: object) -> None:
        raise FinalTransferError("disk full")

    sink.write = broken  # type: ignore[method-assign]

    def receive() -> None:
        with HashingWriter(sink, 16) as writer:
            for _ in range(100):  # more chunks than buffers: buffer() raises once it failed
                writer.submit(writer.buffer(), 16)

    with pytest.raises(FinalTransferError, match="disk full"):
        receive()
    sink.discard()
    assert list(tmp_path.iterdir()) == []


def test_an_error_while_receiving_is_not_masked(tmp_path: Path) -> None:
    sink = Sink.create(tmp_path / "out.bin")

    def receive() -> None:
        with HashingWriter(sink, 16) as writer:
            writer.submit(writer.buffer(), 16)
            raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        receive()
    sink.discard()
    assert list(tmp_path.iterdir()) == []
