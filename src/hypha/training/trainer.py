"""The DiLoCo trainer: the default process executor a worker runs for a ``TrainTask``.

Owns the trainer process (``python -m hypha.training.trainer``): it reads the job over the
bridge, loads the global weights, runs inner AdamW steps on prefetched slices, reports
progress from a background thread (``background.py``: never one blocking round trip per
step), and on the
scheduler's ``sync`` sends its pseudo-gradient and applies the weights the parameter server
pushes back. It does not average updates or step the outer optimizer (the parameter
server does) and never touches trio or the network: every request goes through
``Session`` on the worker's Unix socket. Exit codes: 0 done, 3 error, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Final, NoReturn

import torch
from torch import Tensor, nn

from hypha.errors import HyphaError, JobError
from hypha.protocol.bridge import (
    InstructionBody,
    UpdateAppliedReport,
    UpdateSentReport,
    WeightsRef,
)
from hypha.protocol.codec import ProtocolError
from hypha.protocol.tasks import TrainTask
from hypha.training.background import (
    ProgressReporter,
    RoundStats,
    SlicePrefetcher,
    WeightsInbox,
    fetch_when_ready,
)
from hypha.training.compress import load_tensors_file, save_tensors_file
from hypha.training.diloco import cosine_lr, iter_batches, load_params, pseudo_gradient, snapshot
from hypha.training.models import batch_loss, build_task_model
from hypha.training.session import BridgeError, Session

logger = logging.getLogger(__name__)

EXIT_ERROR: Final = 3
EXIT_TERMINATED: Final = 128 + signal.SIGTERM
THREADS_ENV: Final = "HYPHA_TORCH_THREADS"
THROTTLE_ENV: Final = "HYPHA_THROTTLE"
"""Set by a worker configured with ``throttle``: run this many times slower (test knob)."""
_CONTINUE: Final = InstructionBody(action="continue")


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
    stats = RoundStats()  # this round's batches
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
            round_idx, batches_left, stats = round_idx + 1, None, RoundStats()
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
        model = build_task_model(task.model, task.seed, session.work_dir).to(device)
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
