"""The job driver: dispatches work to pool members and runs DiLoCo rounds.

Placeholder until the training issue lands: it waits for the pools and then holds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from hypha.config.job import JobSpec

if TYPE_CHECKING:
    from hypha.scheduler.node import SchedulerParts


async def run_job(parts: SchedulerParts, job: JobSpec) -> None:
    await trio.sleep_forever()
