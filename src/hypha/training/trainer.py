"""The DiLoCo trainer: the default process executor a worker runs for a ``TrainTask``.

Owns the trainer process (``python -m hypha.training.trainer``): it reads the job over the
bridge, loads the global weights, runs inner AdamW steps on prefetched slices, reports
progress from a background thread (never one blocking round trip per step), and on the
scheduler's ``sync`` sends its pseudo-gradient and applies the weights the parameter server
pushes back. It does not average updates or step the outer optimizer (the parameter
server does) and never touches trio or the network: every request goes through
``Session`` on the worker's Unix socket. Exit codes: 0 done, 3 error, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final, NoReturn

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from hypha.errors import DataError, HyphaError, JobError
from hypha.protocol.bridge import (
    FetchedFile,
    InstructionBody,
    ProgressBody,
    ProgressReport,
    ReceivedFile,
    Reference,
    SliceRef,
    UpdateAppliedReport,
    UpdateSentReport,
    WeightsRef,
)
from hypha.protocol.codec import ProtocolError
from hypha.protocol.tasks import TrainTask
from hypha.training.compress import load_tensors_file, save_tensors_file
from hypha.training.diloco import cosine_lr, iter_batches, load_params, pseudo_gradient, snapshot
from hypha.training.models import batch_loss, build_hf_model, build_model
from hypha.training.session import BridgeError, Session

logger = logging.getLogger(__name__)

EXIT_ERROR: Final = 3
EXIT_TERMINATED: Final = 128 + signal.SIGTERM
THREADS_ENV: Final = "HYPHA_TORCH_THREADS"
THROTTLE_ENV: Final = "HYPHA_THROTTLE"
"""Set by a worker configured with ``throttle``: run this many times slower (test knob)."""
PREFETCH_DEPTH: Final = 2
FETCH_RETRY_SECONDS: Final = (0.05, 2.0)
"""First and largest backoff between fetches the worker could not serve yet."""
FETCH_WAIT_SECONDS: Final = 120.0
"""Give up (exit 3) once a slice or the weights were not ready for this long."""
_POLL_SECONDS: Final = 0.2
_CONTINUE: Final = InstructionBody(action="continue")


@dataclass
class _Stats:
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
        self._pending: dict[int, _Stats] = {}
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
            self._pending.setdefault(round, _Stats()).add(samples, seconds, loss)

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

    "Not yet" is an empty answer, a refusal that says no slice is available or the
    weights are not ready, or a failed transfer (502/503).

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
            detail = exc.detail.lower()
            not_yet = "no slice" in detail or "not ready" in detail or exc.error in ("no_slice", "not_ready")
            if not (not_yet or exc.status in (502, 503)):
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


def _batches(
    prefetcher: SlicePrefetcher, batch_size: int, seed: int, on_slice_done: Callable[[int], None]
) -> Iterator[dict[str, Tensor]]:
    """Mini-batches over the prefetched slices, forever, in an order fixed by the seed."""
    while True:
        item = prefetcher.get()
        yield from iter_batches(item.tensors, batch_size, seed=seed + 1_000_003 * item.epoch + item.index)
        on_slice_done(item.index)


def train(
    task: TrainTask,
    session: Session,
    model: nn.Module,
    reporter: ProgressReporter,
    inbox: WeightsInbox,
    batches: Iterator[dict[str, Tensor]],
    first_round: int = 0,
) -> int:
    """Run DiLoCo inner steps and outer syncs until the scheduler says ``done``.

    Args:
        task: the job document.
        session: the main thread's bridge session (updates, metrics, sync reports).
        model: the model, already holding the global weights, on its device.
        reporter: the started background progress reporter.
        inbox: the started receive subscription.
        batches: the inner mini-batches, {name: [B, ...]}.
        first_round: the round the loaded weights open (a sync may move it on).

    Returns:
        0, the exit code, once the job is done.
    """
    inner = task.inner
    global_params = snapshot(model)  # {name: [*shape]} fp32 CPU, theta_global
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=inner.lr, betas=(inner.beta1, inner.beta2), weight_decay=inner.weight_decay
    )  # kept across rounds: DiLoCo keeps the inner optimizer state
    step = 0  # inner steps over the whole run (the LR schedule spans rounds)
    throttle = max(task.throttle, float(os.environ.get(THROTTLE_ENV, "1") or 1))
    round_idx = first_round
    batches_left: int | None = None  # more batches before the sync; None while none ordered
    stats = _Stats()  # this round's batches
    residual: dict[str, Tensor] = {}  # encoding error carried into the next update
    while True:
        instruction = reporter.take_instruction() or _CONTINUE
        if batches_left is None and task.batches_per_round is not None:
            batches_left = task.batches_per_round  # fixed H: this round's sync is known now
        if instruction.action == "done":
            logger.info("job done after %d inner steps", step)
            return 0
        if instruction.action == "sync" and batches_left is None and instruction.round >= round_idx:
            lag = reporter.take_lag()  # batches already run since the report this answers
            round_idx, batches_left = instruction.round, max(0, instruction.batches - lag)
            logger.info("sync of round %d after %d more batches", round_idx, batches_left)
        if batches_left == 0:
            reporter.flush()  # every batch of the round is reported before its update
            delta = pseudo_gradient(global_params, model)  # {name: [*shape]} global - local, fp32 CPU
            delta = {n: d + residual.get(n, 0.0) for n, d in delta.items()}  # error feedback
            update_path = session.work_dir / f"update-{round_idx}.safetensors"
            meta = {"round": str(round_idx), "samples": str(stats.samples)}
            save_tensors_file(update_path, delta, task.encoding, metadata=meta)
            if task.encoding != "fp32":  # keep what the encoding rounded away for next round
                decoded, _ = load_tensors_file(update_path)  # {name: [*shape]} as the server decodes it
                residual = {n: delta[n] - decoded[n] for n in delta}
            session.send(
                update_path,
                target="parameter_server",
                purpose="update",
                round=round_idx,
                samples=stats.samples,
                encoding=task.encoding,
            )
            bytes_sent = update_path.stat().st_size
            update_path.unlink(missing_ok=True)
            sent = session.report_progress(UpdateSentReport(round=round_idx, samples=stats.samples))
            if sent.action == "done":
                return 0
            weights_path = inbox.wait_weights(round_idx)
            bytes_received = weights_path.stat().st_size
            received, meta = load_tensors_file(weights_path)  # {name: [*shape]} fp32 CPU
            if meta.get("kind") == "delta":  # the round's change: theta_r+1 = theta_r + delta
                new_params = {n: global_params[n] + received[n] for n in global_params}
            else:  # full weights
                new_params = received
            load_params(model, new_params)  # in place: AdamW still points at the same tensors
            global_params = new_params  # {name: [*shape]} theta_global of the next round
            weights_path.unlink(missing_ok=True)
            logger.info("applied the global weights of round %d", round_idx)
            extra = {"bytes_sent": float(bytes_sent), "bytes_received": float(bytes_received)}
            extra["param_digest"] = params_digest(snapshot(model))  # equal on every trainer after a sync
            session.report_metrics(round_idx, {**stats.metrics(), **extra})
            reporter.offer(session.report_progress(UpdateAppliedReport(round=round_idx)))
            round_idx, batches_left, stats = round_idx + 1, None, _Stats()
            continue
        batch = next(batches)  # {name: [B, ...]}
        lr = inner.lr
        if inner.schedule == "cosine":
            lr = cosine_lr(step, inner.total_steps, inner.warmup_steps, inner.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        loss = batch_loss(model, batch)  # [] mean loss of the batch
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # grads {name: [*shape]}
        optimizer.step()  # AdamW update of every parameter in place
        loss_value = float(loss.detach())  # [] -> float; waits for the device
        if throttle > 1.0:  # test knob: emulate a slower worker
            time.sleep((throttle - 1.0) * (time.perf_counter() - started))
        seconds = time.perf_counter() - started
        num_rows = next(iter(batch.values())).shape[0]  # B
        step += 1
        stats.add(num_rows, seconds, loss_value)
        reporter.record(round_idx, num_rows, seconds, loss_value)
        if batches_left is not None:
            batches_left -= 1


def params_digest(params: dict[str, Tensor]) -> float:
    """The first 48 bits of a sha256 over every parameter, as an exactly representable float."""
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].contiguous().numpy().tobytes())  # [*shape] fp32 bytes
    return float(int(digest.hexdigest()[:12], 16))


def _torch_threads() -> int:
    raw = os.environ.get(THREADS_ENV, "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
    return value


def _pick_device(task: TrainTask) -> torch.device:
    if task.device == "cuda" and not torch.cuda.is_available():
        raise JobError("the job asks for device 'cuda' but no CUDA device is available")
    use_cuda = task.device != "cpu" and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def _build(task: TrainTask, work_dir: Path) -> nn.Module:
    model = task.model
    if model.kind == "hf":
        if not model.path:
            raise ValueError("model kind 'hf' needs a path to a Hugging Face config directory")
        return build_hf_model(work_dir / model.path, seed=task.seed)  # absolute paths stay
    options = {k: int(v) if float(v).is_integer() else v for k, v in model.options.items()}
    return build_model(model.name, options, seed=task.seed)


def _load_global_weights(session: Session, model: nn.Module) -> int:
    """Load the current global weights into ``model``; return the round they open."""
    files = fetch_when_ready(session, WeightsRef(), threading.Event())
    if len(files) != 1:
        raise JobError(f"fetching the global weights gave {len(files)} files, expected 1")
    params, meta = load_tensors_file(session.local_path(files[0].path))  # {name: [*shape]} fp32
    load_params(model, params)  # cast and moved onto the model's device
    round = int(meta.get("round", "0"))  # the parameter server writes the round they open
    logger.info("loaded global weights %s of round %d (%s)", files[0].path, round, meta.get("encoding"))
    return round


def _run() -> int:
    try:
        session = Session.from_env()
    except RuntimeError as exc:
        raise JobError(str(exc)) from exc
    with session:
        task = session.job_config(TrainTask)
        torch.manual_seed(task.seed)
        torch.set_num_threads(_torch_threads())
        device = _pick_device(task)
        model = _build(task, session.work_dir).to(device)
        first_round = _load_global_weights(session, model)
        logger.info(
            "training %s on %s, %d parameters",
            task.model.name,
            device,
            sum(p.numel() for p in model.parameters()),
        )

        def fork() -> Session:
            return Session(session.socket_path, session.work_dir)

        reporter = ProgressReporter(fork(), task.report_every_seconds)
        prefetcher = SlicePrefetcher(fork())
        inbox = WeightsInbox(fork())
        for service in (inbox, prefetcher, reporter):
            service.start()
        try:
            batches = _batches(prefetcher, task.batch_size, task.seed, reporter.slice_done)
            return train(task, session, model, reporter, inbox, batches, first_round=first_round)
        finally:
            reporter.stop()
            prefetcher.stop()


class _Terminated(BaseException):
    """SIGTERM arrived: unwind through every ``finally`` and exit 143."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise _Terminated


def _init_logging() -> None:
    """Log ``hypha`` INFO lines to stdout, which the worker forwards; stderr is for errors."""
    hypha_logger = logging.getLogger("hypha")
    if hypha_logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    fmt = "%(asctime)s.%(msecs)03d %(levelname)-7s trainer %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    hypha_logger.addHandler(handler)
    hypha_logger.setLevel(logging.INFO)


_FATAL: Final[tuple[type[Exception], ...]] = (BridgeError, ProtocolError, HyphaError, ValueError, OSError)
_Handler = Callable[[int, FrameType | None], object] | int | None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer against the worker named by ``HYPHA_SOCKET`` and ``HYPHA_WORK_DIR``.

    Returns:
        The exit code: 0 when the job is done, 3 after an error (printed as one line on
        stderr), 143 after SIGTERM (handled only when called on the main thread).
    """
    argparse.ArgumentParser(
        prog="python -m hypha.training.trainer",
        description="Hypha DiLoCo trainer; started by a worker, configured through its job bridge.",
    ).parse_args(argv)
    _init_logging()
    previous: _Handler = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run()
    except _Terminated:
        logger.info("SIGTERM: stopped")
        return EXIT_TERMINATED
    except _FATAL as exc:
        logger.debug("trainer failed", exc_info=True)
        message = " ".join(str(exc).split())
        print(f"hypha trainer: {type(exc).__name__}: {message}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def exit_process(code: int) -> NoReturn:
    """Flush stdio and end the process at once with ``code``.

    Skips interpreter teardown: with torch loaded it takes about a second, and daemon
    threads still blocked in bridge requests may abort it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy, so loggers carry the real name.
    from hypha.training import trainer

    trainer.exit_process(trainer.main())
