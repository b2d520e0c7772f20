"""The trainer process's background threads: progress reports, slice prefetch, weights inbox.

Owns the trainer's side of the bridge that runs beside the training loop: ``ProgressReporter``
sends batched progress (never one round trip per step) and hands the scheduler's
instructions back through a slot; ``SlicePrefetcher`` fetches and loads slices ahead of the
loop; ``WeightsInbox`` waits for the parameter server's weights of a round. Threads, not
trio: the trainer never runs an event loop. ``trainer.py`` owns the loop itself.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from safetensors.torch import load_file
from torch import Tensor

from hypha.errors import DataError
from hypha.protocol.bridge import (
    FetchedFile,
    InstructionBody,
    ProgressBody,
    ProgressReport,
    ReceivedFile,
    Reference,
    SliceRef,
)
from hypha.training.session import BridgeError, Session

logger = logging.getLogger(__name__)

PREFETCH_DEPTH: Final = 2
FETCH_RETRY_SECONDS: Final = (0.05, 2.0)
"""First and largest backoff between fetches the worker could not serve yet."""
FETCH_WAIT_SECONDS: Final = 120.0
"""Give up (exit 3) once a slice or the weights were not ready for this long."""
_POLL_SECONDS: Final = 0.2


@dataclass
class RoundStats:
    """Inner batches accumulated since a report (or over one round)."""

    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0

    def add(self, samples: int, seconds: float, loss: float) -> None:
        self.batches, self.samples = self.batches + 1, self.samples + samples
        self.seconds, self.loss_sum = self.seconds + seconds, self.loss_sum + loss

    def mean_loss(self) -> float | None:
        mean = self.loss_sum / self.batches if self.batches else math.nan
        return mean if math.isfinite(mean) else None

    def metrics(self) -> dict[str, float]:
        values = {"samples": float(self.samples), "batches": float(self.batches)}
        if self.batches:
            values["seconds_per_batch"] = self.seconds / self.batches
        loss = self.mean_loss()
        if loss is not None:
            values["loss"] = loss
        return values


class ProgressReporter:
    """Sends batched ``ProgressReport``s from a thread; hands instructions back in a slot.

    The training loop calls ``record`` after each step and ``slice_done`` after each slice
    (updates under a lock) and ``take_instruction`` between steps. The slot keeps the latest
    ``sync`` or ``done`` (``done`` is never overwritten; ``continue`` carries nothing). A
    failed report is latched and raised by the next ``take_instruction``.
    """

    def __init__(self, session: Session, interval_seconds: float) -> None:
        self._session = session
        self._interval_seconds = max(interval_seconds, 0.01)
        self._lock = threading.Lock()
        self._post_lock = threading.Lock()
        self._pending: dict[int, RoundStats] = {}
        self._slices_done: list[int] = []
        self._instruction: InstructionBody | None = None
        self._num_recorded = 0  # batches recorded since start
        self._num_at_report = 0  # batches recorded when the report that got the held instruction was sent
        self._instruction_at = 0  # _num_at_report of the report that got the held instruction
        self._error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hypha-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def record(self, round: int, samples: int, seconds: float, loss: float) -> None:
        with self._lock:
            self._num_recorded += 1
            self._pending.setdefault(round, RoundStats()).add(samples, seconds, loss)

    def slice_done(self, index: int) -> None:
        """Mark the slice ``index`` fully consumed (the next report carries it)."""
        with self._lock:
            self._slices_done.append(index)

    def offer(self, instruction: InstructionBody) -> None:
        """Put ``instruction`` in the slot (any thread)."""
        with self._lock:
            held = self._instruction
            if instruction.action != "continue" and (held is None or held.action != "done"):
                self._instruction = instruction
                # "Sync after N" counts from the report it answers, not from its arrival.
                self._instruction_at = self._num_at_report

    def take_instruction(self) -> InstructionBody | None:
        """Return and clear the slot.

        Raises:
            BridgeError: a background report failed.
        """
        with self._lock:
            if self._error is not None:
                raise self._error
            instruction, self._instruction = self._instruction, None
            return instruction

    def take_lag(self) -> int:
        """Batches run since the report that got the last instruction.

        Call it from the training loop right after ``take_instruction``: a batch that was
        still running when the instruction arrived counts too.
        """
        with self._lock:
            return self._num_recorded - self._instruction_at

    def flush(self) -> None:
        """Report every pending batch now (waits for a report in flight)."""
        with self._post_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
                slices_done, self._slices_done = self._slices_done, []
                self._num_at_report = self._num_recorded
            if not pending and slices_done:
                # Waiting for data: the scheduler must still learn these slices are used,
                # or it can never start the next epoch.
                empty = ProgressReport(batches=0, samples=0, seconds=0.0, slices_done=slices_done)
                self.offer(self._session.report_progress(empty))
            for round, stats in sorted(pending.items()):
                report: ProgressBody = ProgressReport(
                    batches=stats.batches,
                    samples=stats.samples,
                    seconds=stats.seconds,
                    loss=stats.mean_loss(),
                    round=round,
                    slices_done=slices_done if round == max(pending) else [],
                )
                self.offer(self._session.report_progress(report))

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval_seconds):
                self.flush()
        except Exception as exc:  # latched: the training loop raises it and exits
            with self._lock:
                self._error = exc
        finally:
            self._session.close()


@dataclass(frozen=True)
class _Slice:
    tensors: dict[str, Tensor]
    index: int
    epoch: int


class SlicePrefetcher:
    """Fetches and loads slices in a thread, ``depth`` ahead of the training loop.

    A slice file is deleted as soon as its tensors are in memory: the worker may place
    the same slice at the same path again in a later epoch.
    """

    def __init__(self, session: Session, depth: int = PREFETCH_DEPTH) -> None:
        self._session = session
        self._queue: queue.Queue[_Slice | Exception] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hypha-prefetch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def get(self) -> _Slice:
        """Block until the next slice is loaded.

        Raises:
            BridgeError, DataError, OSError: the prefetch thread failed.
        """
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for item in self._fetch():
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=_POLL_SECONDS)
                            break
                        except queue.Full:
                            continue
        except Exception as exc:  # handed to the training loop, which exits with it
            self._queue.put(exc)
        finally:
            self._session.close()

    def _fetch(self) -> list[_Slice]:
        out = []
        for file in fetch_when_ready(self._session, SliceRef(), self._stop):
            path = self._session.local_path(file.path)
            try:
                tensors = load_file(path)  # {name: [N, ...]}
            except Exception as exc:  # safetensors raises its own error types
                raise DataError(f"slice {file.path} is not readable safetensors: {exc}") from exc
            path.unlink(missing_ok=True)
            out.append(_Slice(tensors, file.index or 0, file.epoch or 0))
        return out


def fetch_when_ready(session: Session, ref: Reference, stop: threading.Event) -> list[FetchedFile]:
    """Fetch ``ref``, retrying with backoff while the worker has nothing to give yet.

    "Not yet" is an empty answer, the worker's ``not_ready`` refusal (no slice free right
    now, weights of the round not out yet) or a failed transfer (502/503).

    Returns:
        The files; an empty list only when ``stop`` was set.

    Raises:
        DataError: still nothing after ``FETCH_WAIT_SECONDS``.
        BridgeError: any other refusal.
    """
    delay_seconds, waited_seconds = FETCH_RETRY_SECONDS[0], 0.0
    while True:
        try:
            files = session.fetch(ref)
        except BridgeError as exc:
            if not (exc.error == "not_ready" or exc.status in (502, 503)):
                raise
            logger.info("%s not available yet (%s); retrying", type(ref).__name__, exc)
            files = []
        if files:
            return files
        if waited_seconds >= FETCH_WAIT_SECONDS:
            raise DataError(f"the worker had no {type(ref).__name__} to give for {waited_seconds:.0f} s")
        if stop.wait(delay_seconds):
            return []
        waited_seconds += delay_seconds
        delay_seconds = min(2 * delay_seconds, FETCH_RETRY_SECONDS[1])


class WeightsInbox:
    """Keeps one receive subscription open in a thread and queues every pushed file."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._queue: queue.Queue[ReceivedFile | Exception] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hypha-receive", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for received in self._session.receive():
                self._queue.put(received)
            self._queue.put(BridgeError(0, "stream_closed", "the worker ended the receive stream"))
        except Exception as exc:  # handed to the training loop, which exits with it
            self._queue.put(exc)

    def wait_weights(self, round: int) -> Path:
        """Block until the new global weights of ``round`` arrive; return their path."""
        while True:
            item = self._queue.get()
            if isinstance(item, Exception):
                raise item
            if item.purpose == "weights" and item.round == round:
                return self._session.local_path(item.path)
            logger.info("ignoring %s file of round %d from %s", item.purpose, item.round, item.from_peer)
