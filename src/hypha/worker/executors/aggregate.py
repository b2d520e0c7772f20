"""The aggregate executor: the DiLoCo parameter server running inside the worker.

Placeholder until the training issue lands: it reports that no aggregate runtime exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hypha.errors import JobError

if TYPE_CHECKING:
    from hypha.net.host import Node
    from hypha.worker.jobs import Task


async def run_aggregate(node: Node, task: Task, services: Any) -> None:
    raise JobError("aggregate executor is not available in this build")
