"""The scheduler's persisted job state: one SQLite database (WAL) under ``state_dir``.

Owns writing a job's ``JobState.to_dict()`` whenever it changed (at most every
``SAVE_INTERVAL_SECONDS``, and once more when the job ends) and reading it back for
``hypha scheduler --resume``. Every call blocks (SQLite): the persister runs them in a
thread. A save commits with ``synchronous = FULL``: a killed scheduler loses at most the
changes of the last interval, never a half-written state.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import trio

from hypha.errors import ConfigError
from hypha.scheduler.state import JobState

logger = logging.getLogger(__name__)

SAVE_INTERVAL_SECONDS = 0.25
"""Most saves per second: a change within this time of the last save waits for the next."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    done INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated REAL NOT NULL
)
"""


class StateStore:
    """The job states of one scheduler, by job name.

    Raises:
        ConfigError: The database cannot be created or opened under ``state_dir``.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "scheduler.sqlite"
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state_dir: cannot keep the scheduler's state in {self.path}: {exc}") from exc

    def save(self, doc: dict[str, Any]) -> None:
        """Replace the saved state of the job ``doc`` describes (``JobState.to_dict()``)."""
        name = str(doc["spec"]["name"])
        self._db.execute(
            "INSERT INTO jobs (name, job_id, done, state, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET job_id = excluded.job_id, done = excluded.done, "
            "state = excluded.state, updated = excluded.updated",
            (name, doc["job_id"], int(bool(doc["done"])), json.dumps(doc), time.time()),
        )

    def load(self, name: str) -> dict[str, Any] | None:
        """The saved state of job ``name`` (None when there is none)."""
        row = self._db.execute("SELECT state FROM jobs WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        doc: dict[str, Any] = json.loads(row[0])
        return doc

    def close(self) -> None:
        self._db.close()


async def persist(state: JobState, store: StateStore) -> None:
    """Save ``state`` whenever it changes until cancelled; the last change is saved on the way out."""
    saved = -1
    try:
        while True:
            await state.wait_changed(saved)
            saved = state.version
            await trio.to_thread.run_sync(store.save, state.to_dict())
            await trio.sleep(SAVE_INTERVAL_SECONDS)  # a rate limit: changes meanwhile go in the next save
    finally:
        if state.version != saved:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(store.save, state.to_dict())
