"""Executors a worker runs: a child process (user code) or the in-worker aggregator."""
