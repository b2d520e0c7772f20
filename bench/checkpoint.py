"""Benchmark: parameter-server checkpoints, write throughput and the pause they cost a round.

One parameter server's state, in one run: the built-in GPT (by default dim 512, 8 layers,
25.4 M parameters) in an ``OuterMaths``, after one outer step on synthetic updates (so the
fp16 broadcast's error-feedback residual exists): weights + outer momentum + residual, 305 MB.

- ``write``: ``OuterMaths.checkpoint_bytes`` + ``CheckpointStore.write`` to a local store in a
  temp dir (encode, sha256, temp file, fsync, rename, manifest, prune), against the baseline
  ``raw_sequential``: the same bytes written to the same filesystem (open, write, fsync,
  close). ``--repeat`` times each, alternating order, each write after a pause
  (``SETTLE_SECONDS``); median MB/s (MB = 10^6 bytes of the uncompressed checkpoint).
  ``write_zstd`` (compress = "zstd") is an extra row, with no baseline.
- ``pause``: real parameter-server rounds in one ``trio.run``: the outer step on N = 3
  synthetic updates, the weight publish (``write_weights``), ``Checkpointer.take`` (every
  round, background writes in a nursery) and the broadcast delta (``write_delta``), as
  ``executors/aggregate.py`` does them, without evaluation. The pause is the Checkpointer's
  ``pause_seconds`` per checkpoint (the in-memory snapshot). Round time = the server's own
  work (step + weights + delta, measured, mean over rounds) + a nominal trainer compute time:
  H inner steps of the same model, H = 32 (the demo's 1536 samples per round / (3 trainers x
  batch 16)), on one batch of 16 x 64 tokens, forward + backward + AdamW with 1 torch thread
  like a trainer: the median of ``--timed-steps`` timed steps times H (timing all 32 would
  take a minute). Rounds here run back to back, without that trainer time, so ``take`` may
  wait for the previous background write; that wait is reported (``take_wait_seconds``)
  but not counted as pause: in a real round the write (about 2 s) ends long before the next.

    python bench/checkpoint.py [--repeat 3] [--rounds 4] [--inner-steps 32] [--timed-steps 3]

Writes ``bench/results/checkpoint.json``; headline: the pause fraction of a round (goal at
most 0.05). There is no other implementation to compare with, so the goal is the baseline:
baseline_value 0.05 and ratio = 0.05 / value (above 1: the goal is met).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import trio

from hypha.checkpoint import CheckpointStore, StoreOptions, open_store
from hypha.protocol.tasks import AggregateTask, CheckpointDoc, InnerDoc, ModelDoc, OuterDoc
from hypha.testing.benchmarks import machine, write_result
from hypha.training.compress import save_tensors_file
from hypha.training.models import batch_loss, build_task_model
from hypha.worker.executors.aggregate_maths import TORCH, OuterMaths, Update
from hypha.worker.executors.checkpoints import Checkpointer

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint.json"
JOB_ID = "bench-checkpoint"
GOAL = 0.05
NUM_UPDATES = 3
BATCH_SIZE = 16
ENCODING = "fp16"  # the demo's: the broadcast's residual is then non-zero
WALL_LIMIT_SECONDS = 300.0
"""Bound on the whole run; a slower machine stops with an error rather than running on."""
ROUNDS_LIMIT_SECONDS = 180.0
SETTLE_SECONDS = 2.0
"""Pause before each timed write. On this VM (Firecracker, free page reporting) a file written
right after memory was freed reuses warm pages and runs several times faster than one written
later (``bench/bulk_transfer.py``); the pause gives every write the same, cold, start."""


def check_time(started: float, what: str) -> None:
    if time.perf_counter() - started > WALL_LIMIT_SECONDS:
        raise RuntimeError(f"over {WALL_LIMIT_SECONDS:.0f} s before {what}: lower --repeat or --rounds")


def model_doc(args: argparse.Namespace) -> ModelDoc:
    return ModelDoc(options={"dim": args.dim, "num_layers": args.num_layers, "num_heads": 8, "seq_len": 64})


def make_maths(args: argparse.Namespace, tmp: Path) -> tuple[OuterMaths, list[Update]]:
    """The server's torch side after one outer step, and the synthetic updates it steps on."""
    doc = AggregateTask(
        job_id=JOB_ID,
        model=model_doc(args),
        seed=0,
        outer=OuterDoc(),
        rounds=args.rounds,
        encoding=ENCODING,
    )
    maths = OuterMaths(doc, tmp)
    generator = torch.Generator().manual_seed(0)
    updates = []
    for i in range(NUM_UPDATES):  # pseudo-gradients of trainers' size and encoding
        tensors = {n: torch.randn(p.shape, generator=generator) * 1e-3 for n, p in maths.params.items()}
        path = tmp / f"update-{i}.safetensors"
        save_tensors_file(path, tensors, ENCODING, {"round": "0", "samples": "512"})
        updates.append(Update(sender=f"trainer-{i}", samples=512, path=path))
    maths.step(updates)  # round 0: momentum and residual exist from here on
    return maths, updates


def raw_write(path: Path, data: bytes) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def store_write(
    store: CheckpointStore, snapshot: dict[str, torch.Tensor], round_: int
) -> tuple[float, float, int]:
    """Seconds of encoding and of storing one checkpoint, and its stored size."""
    start = time.perf_counter()
    data = OuterMaths.checkpoint_bytes(snapshot, round_, JOB_ID)
    encoded = time.perf_counter()
    info = store.write(round_, data, {"job_id": JOB_ID})
    return encoded - start, time.perf_counter() - encoded, info.compressed_size


def write_row(name: str, num_bytes: int, seconds: list[float], stored: int | None) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "name": name,
        "metric": "MB/s",
        "value": num_bytes / 1e6 / median,
        "bytes": num_bytes,
        "stored_bytes": stored if stored is not None else num_bytes,
        "median_seconds": median,
        "seconds": [round(s, 4) for s in seconds],
    }


def measure_writes(
    args: argparse.Namespace, maths: OuterMaths, tmp: Path, started: float
) -> list[dict[str, Any]]:
    """Checkpoint writes (plain and zstd) against raw sequential writes of the same bytes."""
    snapshot = maths.snapshot()
    data = OuterMaths.checkpoint_bytes(snapshot, 0, JOB_ID)
    plain = open_store(str(tmp / "store-plain"), StoreOptions(keep_last_n=2))
    zstd = open_store(str(tmp / "store-zstd"), StoreOptions(keep_last_n=2, compress="zstd"))
    times: dict[str, list[float]] = {"raw_sequential": [], "write": [], "write_zstd": []}
    parts: dict[str, list[float]] = {"encode": [], "store_write": [], "sha256": []}
    zstd_size = 0
    for rep in range(args.repeat):
        check_time(started, f"write repetition {rep}")
        order = ["raw_sequential", "write", "write_zstd"]
        for mode in order if rep % 2 == 0 else order[::-1]:
            time.sleep(args.settle_seconds)  # every write starts cold (see SETTLE_SECONDS)
            if mode == "raw_sequential":
                times[mode].append(raw_write(tmp / "raw.bin", data))
            elif mode == "write":
                encode, write, _ = store_write(plain, snapshot, rep + 1)
                times[mode].append(encode + write)
                parts["encode"].append(encode)
                parts["store_write"].append(write)
            else:
                encode, write, zstd_size = store_write(zstd, snapshot, rep + 1)
                times[mode].append(encode + write)
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()  # part of store.write: what the manifest records
        parts["sha256"].append(time.perf_counter() - start)
        print(
            f"write repetition {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
            flush=True,
        )
    rows = [
        write_row("raw_sequential", len(data), times["raw_sequential"], None),
        write_row("write", len(data), times["write"], None),
        write_row("write_zstd", len(data), times["write_zstd"], zstd_size),
    ]
    rows.append(
        {
            "name": "write_vs_raw",
            "metric": "ratio",
            "write_mbps": rows[1]["value"],
            "raw_sequential_mbps": rows[0]["value"],
            "value": rows[1]["value"] / rows[0]["value"],
            "median_seconds": {k: statistics.median(v) for k, v in parts.items()},
            "breakdown": "encode = checkpoint_bytes (safetensors), store_write = store.write (sha256, "
            "temp file, fsync, rename, manifest, prune), sha256 = hashlib alone, outside the timings",
        }
    )
    return rows


def measure_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of one inner step (forward, backward, AdamW) with 1 torch thread, and H of them."""
    inner = InnerDoc()
    model = build_task_model(model_doc(args), 0, Path())  # the server's initial weights (same seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=inner.lr, betas=(inner.beta1, inner.beta2), weight_decay=inner.weight_decay
    )
    batch = {"input_ids": torch.randint(0, 256, (BATCH_SIZE, 64), generator=torch.Generator().manual_seed(1))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a trainer (one core each)
    seconds = []
    try:
        for _ in range(1 + args.timed_steps):  # the first is a warm-up
            start = time.perf_counter()
            loss = batch_loss(model, batch)  # [] mean loss of the batch
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            float(loss.detach())
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)  # the parameter server runs with the default
    step = statistics.median(seconds[1:])
    return {
        "name": "trainer_compute",
        "metric": "s",
        "value": step * args.inner_steps,
        "inner_steps": args.inner_steps,
        "seconds_per_step": step,
        "step_seconds": [round(s, 4) for s in seconds[1:]],
        "warmup_seconds": round(seconds[0], 4),
        "batch": [BATCH_SIZE, 64],
        "torch_threads": 1,
    }


async def run_rounds(
    args: argparse.Namespace, maths: OuterMaths, updates: list[Update], tmp: Path
) -> dict[str, Any]:
    """Parameter-server rounds with a checkpoint each round; per-round timings and statistics."""
    doc = CheckpointDoc(store=str(tmp / "store-rounds"), every_rounds=1, keep_last_n=2)
    checkpoints = Checkpointer(doc, JOB_ID, args.rounds)
    await checkpoints.open()
    rounds = []
    with trio.fail_after(ROUNDS_LIMIT_SECONDS):
        async with trio.open_nursery() as nursery:
            for number in range(1, args.rounds + 1):
                t0 = trio.current_time()
                await trio.to_thread.run_sync(maths.step, updates, limiter=TORCH)
                t1 = trio.current_time()
                path = tmp / f"weights-{number:05d}.safetensors"
                await trio.to_thread.run_sync(maths.write_weights, path, number, limiter=TORCH)
                t2 = trio.current_time()
                paused = checkpoints.statistics().pause_seconds
                await checkpoints.take(maths, number, nursery)
                t3 = trio.current_time()
                pause = checkpoints.statistics().pause_seconds - paused
                delta = tmp / f"delta-{number:05d}.safetensors"
                await trio.to_thread.run_sync(maths.write_delta, delta, number, limiter=TORCH)
                t4 = trio.current_time()
                path.unlink()
                delta.unlink()
                rounds.append(
                    {
                        "round": number,
                        "step_seconds": t1 - t0,
                        "weights_seconds": t2 - t1,
                        "delta_seconds": t4 - t3,
                        "ps_work_seconds": (t1 - t0) + (t2 - t1) + (t4 - t3),
                        "pause_seconds": pause,
                        "take_wait_seconds": t3 - t2 - pause,
                    }
                )
                print(
                    f"round {number}: ps work {rounds[-1]['ps_work_seconds']:.2f} s, pause {pause:.3f} s",
                    flush=True,
                )
            await checkpoints.drain()
    stats = checkpoints.statistics()
    if stats.num_written != args.rounds or stats.num_failed:
        raise RuntimeError(
            f"{stats.num_written} of {args.rounds} checkpoints written, {stats.num_failed} failed"
        )
    return {"rounds": rounds, "statistics": stats}


def pause_row(args: argparse.Namespace, measured: dict[str, Any], trainer: dict[str, Any]) -> dict[str, Any]:
    stats = measured["statistics"]
    rounds = measured["rounds"]
    ps_work = statistics.fmean(r["ps_work_seconds"] for r in rounds)
    round_seconds = ps_work + trainer["value"]
    pause = stats.pause_seconds / stats.num_written
    return {
        "name": "pause",
        "metric": "fraction of round time",
        "value": pause / round_seconds,
        "pause_seconds_per_checkpoint": pause,
        "max_pause_seconds": max(r["pause_seconds"] for r in rounds),
        "ps_work_seconds_per_round": ps_work,
        "trainer_compute_seconds": trainer["value"],
        "round_seconds": round_seconds,
        "pause_fraction_of_ps_work": pause / ps_work,
        "write_seconds_per_checkpoint": stats.write_seconds / stats.num_written,
        "take_wait_seconds_per_checkpoint": statistics.fmean(r["take_wait_seconds"] for r in rounds),
        "num_checkpoints": stats.num_written,
        "checkpoint_bytes": stats.bytes_written // stats.num_written,
        "rounds": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rounds],
    }


def build_summary(
    args: argparse.Namespace, rows: list[dict[str, Any]], num_params: int, wall: float
) -> dict[str, Any]:
    pause = next(r for r in rows if r["name"] == "pause")
    value = pause["value"]
    return {
        "benchmark": "checkpoint",
        "machine": machine(),
        "params": {
            "model": {
                "name": "gpt",
                "dim": args.dim,
                "num_layers": args.num_layers,
                "num_heads": 8,
                "seq_len": 64,
            },
            "num_parameters": num_params,
            "checkpoint_mb": pause["checkpoint_bytes"] / 1e6,
            "checkpoint": "weights + outer momentum + error-feedback residual, fp32 safetensors",
            "encoding": ENCODING,
            "num_updates_per_round": NUM_UPDATES,
            "repeat": args.repeat,
            "settle_seconds": args.settle_seconds,
            "rounds": args.rounds,
            "inner_steps": args.inner_steps,
            "inner_steps_choice": "the demo's 1536 samples per round / (3 trainers x batch 16) = 32",
            "timed_steps": args.timed_steps,
            "round_time": "parameter server work (outer step + write_weights + write_delta, mean over "
            "rounds) + nominal trainer compute (median inner step x inner_steps)",
            "store": "local directory in a temp dir (same filesystem as the raw writes)",
            "mb": "10^6 bytes of the uncompressed checkpoint",
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_threads_parameter_server": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "wall_seconds": round(wall, 1),
        },
        "results": rows,
        "headline": {
            "metric": "checkpoint_pause_fraction",
            "unit": "fraction of round time",
            "value": value,
            "baseline": "goal: paused at most 5% of a round",
            "baseline_value": GOAL,
            "ratio": GOAL / value if value else None,
            "goal": GOAL,
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    rows = {r["name"]: r for r in summary["results"]}
    print(f"{'write':<16} {'MB/s':>8} {'median s':>9} {'stored MB':>10}  seconds")
    for name in ("raw_sequential", "write", "write_zstd"):
        r = rows[name]
        print(
            f"{name:<16} {r['value']:>8.0f} {r['median_seconds']:>9.3f} {r['stored_bytes'] / 1e6:>10.1f}  "
            f"{r['seconds']}"
        )
    ratio = rows["write_vs_raw"]
    parts = ", ".join(f"{k} {v:.3f} s" for k, v in ratio["median_seconds"].items())
    print(f"write / raw_sequential: {ratio['value']:.2f} (median {parts}; sha256 is inside store_write)")
    t = rows["trainer_compute"]
    step, steps = t["seconds_per_step"], t["inner_steps"]
    print(f"trainer compute: {step:.3f} s/step x {steps} = {t['value']:.1f} s per round")
    p = rows["pause"]
    header = ("round", "step s", "weights s", "delta s", "ps work s", "pause s", "wait s")
    keys = ("step_seconds", "weights_seconds", "delta_seconds", "ps_work_seconds")
    keys += ("pause_seconds", "take_wait_seconds")
    print(" ".join(f"{h:>9}" for h in header))
    for r in p["rounds"]:
        print(f"{r['round']:>9} " + " ".join(f"{r[k]:>9.3f}" for k in keys))
    print(
        f"pause {p['pause_seconds_per_checkpoint']:.3f} s per checkpoint; round {p['round_seconds']:.1f} s "
        f"= ps work {p['ps_work_seconds_per_round']:.2f} + trainers {p['trainer_compute_seconds']:.1f}"
    )
    print(
        f"background write {p['write_seconds_per_checkpoint']:.2f} s per checkpoint; "
        f"pause over ps work alone {p['pause_fraction_of_ps_work']:.3f}"
    )
    h = summary["headline"]
    print(
        f"headline {h['metric']}: {h['value']:.4f} of a round (goal <= {h['goal']}), "
        f"ratio goal / value {h['ratio']:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=32)
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--settle-seconds", type=float, default=SETTLE_SECONDS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 1 <= args.repeat <= 10 or not 3 <= args.rounds <= 20 or not 1 <= args.timed_steps <= 10:
        parser.error("need 1 <= --repeat <= 10, 3 <= --rounds <= 20 and 1 <= --timed-steps <= 10")
    if not 0 <= args.settle_seconds <= 10:
        parser.error("need 0 <= --settle-seconds <= 10")
    if args.inner_steps < 1 or args.dim % 8 or args.num_layers < 1:
        parser.error("need --inner-steps >= 1, --dim a multiple of 8 (8 heads) and --num-layers >= 1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hypha-bench-") as name:
        tmp = Path(name)
        maths, updates = make_maths(args, tmp)
        num_params = sum(p.numel() for p in maths.params.values())
        print(f"model: {num_params / 1e6:.1f} M parameters", flush=True)
        rows = measure_writes(args, maths, tmp, started)
        check_time(started, "the trainer step")
        trainer = measure_trainer(args)
        check_time(started, "the rounds")
        measured = trio.run(run_rounds, args, maths, updates, tmp)
    rows += [trainer, pause_row(args, measured, trainer)]
    summary = build_summary(args, rows, num_params, time.perf_counter() - started)
    print_table(summary)
    write_result(args.out, summary)


if __name__ == "__main__":
    main()
