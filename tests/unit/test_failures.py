"""The crash-loop rule: the same error ``limit`` times fails the job; a flaky worker is excluded."""

from __future__ import annotations

from hypha.scheduler.failures import TaskFailures, Verdict


def test_the_same_error_on_any_workers_fails_the_job_at_the_limit() -> None:
    failures = TaskFailures(limit=3)
    assert failures.record("a", "exit 3: boom") is Verdict.REPLACE
    assert failures.record("b", "exit 3: boom") is Verdict.REPLACE
    assert failures.record("c", "exit 3: boom") is Verdict.FAIL_JOB
    assert failures.count("exit 3: boom") == 3


def test_a_worker_whose_tasks_keep_failing_differently_is_excluded() -> None:
    failures = TaskFailures(limit=2)
    assert failures.record("a", "exit 1: out of memory") is Verdict.REPLACE
    assert failures.record("a", "exit 2: disk full") is Verdict.EXCLUDE
    assert failures.record("b", "exit 3: other") is Verdict.REPLACE


def test_failures_explained_by_a_lost_parameter_server_are_forgiven() -> None:
    failures = TaskFailures(limit=2)
    assert failures.record("a", "exit 3: cannot reach the parameter server") is Verdict.REPLACE
    failures.forgive()
    assert failures.record("b", "exit 3: cannot reach the parameter server") is Verdict.REPLACE
    assert failures.count("exit 3: cannot reach the parameter server") == 1
