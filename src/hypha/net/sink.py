"""The receiving end of a bulk transfer: a checked temp file, and a pipelined writer.

Owns where pulled bytes go: ``Sink`` is a temp file next to the destination (a recycled
spare from ``spares.py`` when there is one) that hashes everything written to it and is
moved into place only after the sha256 matched; ``HashingWriter`` hashes and writes in a
thread of its own so that the network thread can decrypt the next chunk meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import secrets
import threading
from pathlib import Path
from types import TracebackType

from hypha.errors import TransferError
from hypha.net.spares import SpareFiles
from hypha.protocol import messages as m

NUM_BUFFERS = 3
"""Chunks in flight between the network thread and the writer: one filling, two queued."""


class FinalTransferError(TransferError):
    """Retrying cannot help: the sender refused, or the destination cannot be written."""


class Sink:
    """A temp file next to ``dest`` that hashes what is written; ``commit`` moves it in place.

    The temp file is a recycled spare when one is available (overwritten from the start and
    truncated at ``commit``), else a new file. Every method but ``verdict`` and ``check``
    does file I/O and runs in a worker thread.
    """

    def __init__(self, dest: Path, tmp: Path, spares: SpareFiles | None, reused: bool) -> None:
        self.dest, self.tmp = dest, tmp
        self.reused = reused
        self._spares = spares
        self.file = open(tmp, "r+b" if reused else "wb")  # noqa: SIM115 - closed by commit or discard
        self.hash = hashlib.sha256()
        self._checked = False

    @classmethod
    def create(cls, dest: Path, size: int = 0, spares: SpareFiles | None = None) -> Sink:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
            reused = spares is not None and spares.take(size, tmp)
            return cls(dest, tmp, spares, reused)
        except OSError as exc:
            raise FinalTransferError(f"cannot write to {dest.parent}: {exc}") from exc

    def write(self, *chunks: bytes | memoryview) -> None:
        try:
            for chunk in chunks:
                self.hash.update(chunk)
                self.file.write(chunk)
        except OSError as exc:
            raise FinalTransferError(f"cannot write {self.tmp}: {exc}") from exc

    def verdict(self, offer: m.TensorOffer) -> m.TransferDone:
        """The confirmation for the sender: did the bytes arrive intact?"""
        ok = self.hash.hexdigest() == offer.sha256
        return m.TransferDone(transfer_id=offer.transfer_id, ok=ok, detail="" if ok else "sha256 mismatch")

    def check(self, sha256: str) -> None:
        if self.hash.hexdigest() != sha256:
            raise TransferError(f"sha256 mismatch: expected {sha256}, received {self.hash.hexdigest()}")
        self._checked = True

    def commit(self) -> None:
        assert self._checked, "commit before check"
        try:
            self.file.truncate()  # a longer spare ends where the transfer did
            self.file.close()
            os.replace(self.tmp, self.dest)
        except OSError as exc:
            raise FinalTransferError(f"cannot store {self.dest}: {exc}") from exc

    def discard(self) -> None:
        self.file.close()
        if self._spares is not None:
            self._spares.give(self.tmp)  # ignores a committed (moved) temp file
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


class HashingWriter:
    """Hashes and writes chunks into a ``Sink`` from a thread, in order.

    The caller fills a ``buffer()`` and hands it back with ``submit(buffer, length)``;
    leaving the ``with`` block waits until every chunk is written and re-raises the
    writer's error, if any. Leaving it with an exception stops the writer without writing
    what is still queued.
    """

    def __init__(self, sink: Sink, buffer_bytes: int) -> None:
        self._sink = sink
        self._free: queue.Queue[memoryview] = queue.Queue()
        for _ in range(NUM_BUFFERS):
            self._free.put(memoryview(bytearray(buffer_bytes)))
        self._full: queue.Queue[tuple[memoryview, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hypha-bulk-writer", daemon=True)

    def __enter__(self) -> HashingWriter:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self._error is None:
            self._error = exc  # the writer skips what is still queued
        self._full.put(None)
        self._thread.join()
        if exc is None and self._error is not None:
            raise self._error

    def buffer(self) -> memoryview:
        """A free buffer to fill (waits while all are queued); raises the writer's error."""
        while True:
            if self._error is not None:
                raise self._error
            with contextlib.suppress(queue.Empty):
                return self._free.get(timeout=0.5)

    def submit(self, buffer: memoryview, length: int) -> None:
        """Queue the first ``length`` bytes of ``buffer`` to be hashed and written."""
        self._full.put((buffer, length))

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, length = item
            if self._error is None:
                try:
                    self._sink.write(buffer[:length])
                except BaseException as exc:  # handed to the network thread
                    self._error = exc
            self._free.put(buffer)
