"""Benchmark: compute utilisation of trainers at speeds 1x, 2x and 4x, planner against fixed H.

A Hypha network (``hypha.testing.network``: gateway, data node, parameter server and three
trainer processes on 127.0.0.1) whose trainers are throttled 1x, 2x and 4x (a trainer with
throttle k sleeps k - 1 times each batch's compute time, so it runs k times slower). The same
job runs twice, each time on a fresh network, in one run:

- ``planner``: Hypha's sync planner decides each trainer's batches per round, so that all
  trainers reach the outer sync together.
- ``fixed_h``: ``fixed_inner_steps = H`` with H = samples_per_round / (3 x batch_size): every
  trainer runs H batches per round (plain DiLoCo), and the fast ones wait for the slow one.

Compute utilisation of a trainer = its compute seconds over the wall seconds of the steady
rounds. Round 0 is a warm-up (process start, first slice fetches, no speed estimates yet) and
is excluded: the wall span runs from the parameter server's round-0 line (the "global" metrics
line) to its last one, and compute seconds are the sum of ``batches x seconds_per_batch`` of
the trainer's rounds >= 1 (a throttled trainer's sleep counts as compute: it emulates a slower
device). Throttles are matched to trainers by their measured seconds per batch.

    python bench/heterogeneous.py [--rounds 4] [--samples-per-round 6400]

Writes ``bench/results/heterogeneous.json``; headline: the lowest compute utilisation of the
three trainers with the planner (goal >= 0.9), the fixed-H figure as the baseline.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import trio

from hypha.config.job import JobSpec
from hypha.data.prepare import prepare_builtin
from hypha.testing.benchmarks import machine, write_result
from hypha.testing.cluster import Pki
from hypha.testing.network import open_training_network, run_training_job, training_job

RESULTS = Path(__file__).resolve().parent / "results" / "heterogeneous.json"
DATASET = "bench-text"
THROTTLES = (1.0, 2.0, 4.0)
GOAL = 0.9
JOB_LIMIT_SECONDS = 240.0
OPTIONS = {"dim": 64, "num_layers": 2, "num_heads": 4, "seq_len": 64}


def job_spec(args: argparse.Namespace, tmp: Path, name: str, fixed_inner_steps: int | None) -> JobSpec:
    doc: dict[str, Any] = {
        "dataset": DATASET,
        "rounds": args.rounds,
        "samples_per_round": args.samples_per_round,
        "batch_size": args.batch_size,
        "encoding": "fp16",
        "report_every_seconds": args.report_every_seconds,
        "sync_horizon_seconds": args.sync_horizon_seconds,
        "eval_batches": 4,
        "model": {"kind": "builtin", "name": "gpt", "options": OPTIONS},
        "inner": {"lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.0, "schedule": "cosine"},
    }
    if fixed_inner_steps is not None:
        doc["fixed_inner_steps"] = fixed_inner_steps
    return training_job(tmp, name, doc, num_trainers=len(THROTTLES))


def utilisation(mode: str, lines: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Per-trainer compute utilisation over the steady rounds (>= 1) of one job."""
    global_lines = sorted((x for x in lines if x["worker"] == "global"), key=lambda x: x["round"])
    wall_seconds = global_lines[-1]["time"] - global_lines[0]["time"]
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        if line["worker"] != "global":
            by_worker[line["worker"]].append(line)
    trainers = []
    for worker, rows in by_worker.items():
        rows.sort(key=lambda x: x["round"])
        steady = [x for x in rows if x["round"] >= 1]
        compute = sum(x.get("batches", 0.0) * x.get("seconds_per_batch", 0.0) for x in steady)
        own_span = rows[-1]["time"] - rows[0]["time"]  # its round-0 line to its last line
        per_batch = [x["seconds_per_batch"] for x in steady if x.get("seconds_per_batch")]
        trainers.append(
            {
                "worker": worker,
                "seconds_per_batch": statistics.median(per_batch) if per_batch else None,
                "batches_per_round": [int(x.get("batches", 0)) for x in rows],
                "compute_seconds": compute,
                "wall_seconds": wall_seconds,
                "utilisation": compute / wall_seconds if wall_seconds > 0 else None,
                "utilisation_own_span": compute / own_span if own_span > 0 else None,
            }
        )
    # Throttles by measured speed: the fastest trainer is the 1x one.
    trainers.sort(key=lambda t: t["seconds_per_batch"] or 0.0)
    fastest = trainers[0]["seconds_per_batch"] or 1.0
    for trainer, throttle in zip(trainers, THROTTLES, strict=False):
        trainer["throttle"] = throttle
        trainer["measured_slowdown"] = (trainer["seconds_per_batch"] or 0.0) / fastest
    times = [x["time"] for x in global_lines]
    steady_samples = sum(x.get("samples", 0) for x in global_lines[1:])
    utils = [t["utilisation"] for t in trainers if t["utilisation"] is not None]
    return {
        "name": mode,
        "min_utilisation": min(utils) if utils else None,
        "mean_utilisation": statistics.fmean(utils) if utils else None,
        "round_seconds": [round(b - a, 3) for a, b in itertools.pairwise(times)],
        "steady_wall_seconds": wall_seconds,
        "steady_samples_per_second": steady_samples / wall_seconds if wall_seconds > 0 else None,
        "samples_per_round": [x.get("samples") for x in global_lines],
        "updates_per_round": [x.get("num_updates") for x in global_lines],
        "final_loss": global_lines[-1].get("loss"),
        "job_seconds": seconds,
        "trainers": trainers,
    }


async def run_jobs(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Run the planner job, then the fixed-H job, each on a fresh network.

    A fresh network per job: on a reused one the second job's allocation may pick another
    worker as parameter server (the first job's leases are still winding down), and the
    trainers would then not be the 1x, 2x and 4x ones.
    """
    pki = Pki.create(tmp / "pki")
    fixed_h = args.samples_per_round // (len(THROTTLES) * args.batch_size)
    out = []
    for mode, steps in (("planner", None), ("fixed_h", fixed_h)):
        work = tmp / mode
        work.mkdir()
        async with open_training_network(pki, work, tmp / DATASET, list(THROTTLES)) as addr:
            job = job_spec(args, work, mode, steps)
            started = time.perf_counter()
            with trio.fail_after(JOB_LIMIT_SECONDS):
                lines = await run_training_job(pki, addr, job, f"sched-{mode}")
        result = utilisation(mode, lines, time.perf_counter() - started)
        result["fixed_inner_steps"] = steps
        out.append(result)
        print(f"{mode}: min utilisation {result['min_utilisation']:.3f}", flush=True)
    return out


def build_summary(args: argparse.Namespace, runs: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    planner = next(r for r in runs if r["name"] == "planner")
    fixed = next(r for r in runs if r["name"] == "fixed_h")
    value, base = planner["min_utilisation"], fixed["min_utilisation"]
    return {
        "benchmark": "heterogeneous",
        "machine": machine(),
        "params": {
            "throttles": list(THROTTLES),
            "rounds": args.rounds,
            "samples_per_round": args.samples_per_round,
            "batch_size": args.batch_size,
            "fixed_inner_steps": fixed["fixed_inner_steps"],
            "report_every_seconds": args.report_every_seconds,
            "sync_horizon_seconds": args.sync_horizon_seconds,
            "model": {"name": "gpt", **OPTIONS},
            "encoding": "fp16",
            "utilisation": "compute seconds (sum of batches x seconds_per_batch, rounds >= 1) over the "
            "wall span from the round-0 to the last global metrics line; round 0 is warm-up",
            "topology": "gateway, data node, parameter server and 3 workers in this process, trainers "
            "as child processes (1 torch thread each), 127.0.0.1",
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "load_average_1min": round(os.getloadavg()[0], 2),
            "wall_seconds": round(wall, 1),
        },
        "results": runs,
        "headline": {
            "metric": "min_compute_utilisation_1x_2x_4x",
            "unit": "fraction",
            "value": value,
            "baseline": f"fixed H = {fixed['fixed_inner_steps']} batches per trainer per round",
            "baseline_value": base,
            "ratio": value / base if value and base else None,
            "goal": GOAL,
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'mode':<8} {'throttle':>8} {'s/batch':>8} {'batches/round':<24} {'util':>6} {'own':>6}")
    for run in summary["results"]:
        for t in run["trainers"]:
            batches = ",".join(str(b) for b in t["batches_per_round"])
            print(
                f"{run['name']:<8} {t['throttle']:>7.0f}x {t['seconds_per_batch']:>8.3f} {batches:<24} "
                f"{t['utilisation']:>6.3f} {t['utilisation_own_span']:>6.3f}"
            )
        print(
            f"{run['name']:<8} rounds {run['round_seconds']} s, {run['steady_samples_per_second']:.0f} "
            f"samples/s steady, final loss {run['final_loss']:.4f}"
        )
    h = summary["headline"]
    print(
        f"headline {h['metric']}: {h['value']:.3f} with the planner (goal >= {h['goal']}), "
        f"{h['baseline_value']:.3f} with fixed H, ratio {h['ratio']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--samples-per-round", type=int, default=6400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--report-every-seconds", type=float, default=0.25)
    parser.add_argument("--sync-horizon-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.rounds < 2 or args.samples_per_round < len(THROTTLES) * args.batch_size:
        parser.error("need --rounds >= 2 and at least one batch per trainer per round")
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hypha-bench-") as name:
        tmp = Path(name)
        prepare_builtin(tmp / DATASET, name=DATASET, max_samples=16384, seq_len=64, slice_samples=128)
        runs = trio.run(run_jobs, args, tmp)
    summary = build_summary(args, runs, time.perf_counter() - started)
    print_table(summary)
    write_result(args.out, summary)


if __name__ == "__main__":
    main()
