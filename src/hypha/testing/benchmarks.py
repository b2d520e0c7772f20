"""What every benchmark in ``bench/`` shares: the machine description and the result file.

Owns the ``machine`` string recorded in ``bench/results/*.json`` and writing a result
document; each benchmark owns its own measurements, baseline and table.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> str:
    """Platform, CPU model and core count, e.g. ``Linux-6.1-x86_64 / AMD EPYC / 2 cores``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{platform.platform()} / {cpu} / {os.cpu_count()} cores"


def write_result(path: Path, summary: dict[str, Any]) -> None:
    """Write a benchmark's result document (indented JSON with a trailing newline) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path}")
