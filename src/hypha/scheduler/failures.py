"""Crash loops end: counting a job's failed trainer tasks by error and by worker.

Owns the rule that turns repeated failures into a decision. A trainer task that fails is
normally replaced (its worker is let go and the pool leases again); but a task that fails with
the same error ``limit`` times would fail forever, so the job fails with that error, and a
worker whose tasks failed ``limit`` times is not leased again for the job. Failures explained
by a lost parameter server are forgotten when it is replaced (``forgive``).
"""

from __future__ import annotations

import enum
from collections import Counter


class Verdict(enum.Enum):
    REPLACE = "replace"
    """Let the worker go; the pool leases again (it may lease the same worker)."""
    EXCLUDE = "exclude"
    """Let the worker go and never lease it again for this job."""
    FAIL_JOB = "fail_job"
    """The same error keeps coming back: the job fails with it."""


class TaskFailures:
    """Failed trainer tasks of one job.

    Args:
        limit: failures with one error (or on one worker) that end the retries.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._by_error: Counter[str] = Counter()
        self._by_worker: Counter[str] = Counter()

    def record(self, worker: str, error: str) -> Verdict:
        """A task on ``worker`` failed with ``error`` (its last line of output): what now."""
        self._by_error[error] += 1
        self._by_worker[worker] += 1
        if self._by_error[error] >= self._limit:
            return Verdict.FAIL_JOB
        if self._by_worker[worker] >= self._limit:
            return Verdict.EXCLUDE
        return Verdict.REPLACE

    def count(self, error: str) -> int:
        return self._by_error[error]

    def forgive(self) -> None:
        """Forget every failure so far (their cause, a lost parameter server, is gone)."""
        self._by_error.clear()
        self._by_worker.clear()
