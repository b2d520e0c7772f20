"""Worker role."""

from hypha.worker.node import Worker, run_worker

__all__ = ["Worker", "run_worker"]
