"""The job service's jobs on disk: one SQLite file (``jobs.sqlite3``) that outlives the service.

Each job keeps the TOML text it was submitted as, so a restarted service reads
it again the way it was checked; its state, times, progress and outcome are
updated as it runs. A job the file says is running when the service starts
was cut off by a kill: the service resumes it from its checkpoint
(:mod:`.service`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..exceptions import JobStateError, UnknownJob
from ..registry import Database
from ..service_api import FINISHED_STATES, JobRecord, whole_number

__all__ = ["JOBS_FILE", "JobStore"]

JOBS_FILE: Final = "jobs.sqlite3"
SCHEMA_VERSION: Final = 1
_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    job TEXT NOT NULL,
    submitted_by TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    workers TEXT NOT NULL,
    evaluator TEXT,
    round INTEGER NOT NULL DEFAULT 0,
    rounds INTEGER NOT NULL,
    reason TEXT,
    refusals TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    run_id TEXT
)
"""
#: Columns :meth:`JobStore.update` may set, and those held as JSON.
_UPDATABLE: Final = frozenset({"state", "started_at", "finished_at", "round", "reason", "refusals", "result", "run_id"})
_JSON: Final = frozenset({"workers", "refusals", "result"})


class JobStore:
    """The jobs of one service, in ``folder/jobs.sqlite3``; every call opens its own connection.

    Raises:
        CheckpointError: if the file cannot be opened, or has another schema version.
    """

    def __init__(self, folder: Path, *, timeout: float = 10.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._db = Database(folder / JOBS_FILE, timeout, schema=_SCHEMA, version=SCHEMA_VERSION, what="job store")

    def add(self, *, name: str, job: str, by: str, workers: list[str], evaluator: str | None, rounds: int) -> JobRecord:
        """Queue a new job; returns its record."""
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "INSERT INTO jobs (name, state, job, submitted_by, submitted_at, workers, evaluator, rounds)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (name, job, by, time.time(), json.dumps(workers), evaluator, rounds),
            )
            job_id = cursor.lastrowid
        return self.get(str(job_id))

    def get(self, job_id: str) -> JobRecord:
        """Raises UnknownJob."""
        return _record(self._row(job_id))

    def text(self, job_id: str) -> str:
        """The TOML the job was submitted as. Raises UnknownJob."""
        return str(self._row(job_id)["job"])

    def run_id(self, job_id: str) -> str | None:
        """The job's run in the model registry, once it started. Raises UnknownJob."""
        value = self._row(job_id)["run_id"]
        return None if value is None else str(value)

    def all(self) -> list[JobRecord]:
        """Every job, newest first."""
        with self._db.transaction(write=False) as connection:
            connection.row_factory = sqlite3.Row
            rows = connection.execute("SELECT * FROM jobs ORDER BY id DESC").fetchall()
        return [_record(row) for row in rows]

    def in_state(self, state: str) -> list[JobRecord]:
        """The jobs in ``state``, oldest first: the queue's order."""
        with self._db.transaction(write=False) as connection:
            connection.row_factory = sqlite3.Row
            rows = connection.execute("SELECT * FROM jobs WHERE state = ? ORDER BY id", (state,)).fetchall()
        return [_record(row) for row in rows]

    def unfinished(self, job: str) -> JobRecord | None:
        """The oldest queued or running job submitted as the text ``job``, if any: ``serve --queue`` skips it."""
        with self._db.transaction(write=False) as connection:
            connection.row_factory = sqlite3.Row
            row = connection.execute(
                "SELECT * FROM jobs WHERE job = ? AND state IN ('queued', 'running') ORDER BY id LIMIT 1", (job,)
            ).fetchone()
        return None if row is None else _record(row)

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set some of a job's columns (``refusals`` and ``result`` as dicts). Raises UnknownJob."""
        unknown = sorted(set(fields) - _UPDATABLE)
        assert not unknown, f"not updatable: {unknown}"
        names = sorted(fields)
        values = [json.dumps(fields[name]) if name in _JSON else fields[name] for name in names]
        with self._db.transaction() as connection:
            assignments = ", ".join(f"{name} = ?" for name in names)
            cursor = connection.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, _key(job_id)))
            if cursor.rowcount == 0:
                raise UnknownJob(f"no job {job_id!r}")
        return self.get(job_id)

    def finish(self, job_id: str, state: str, *, reason: str | None = None, **fields: Any) -> JobRecord:
        """End a job that has not ended: ``state`` is done, failed or aborted.

        Raises:
            UnknownJob: no such job.
            JobStateError: it has ended already.
        """
        assert state in FINISHED_STATES
        current = self.get(job_id)
        if current["state"] in FINISHED_STATES:
            raise JobStateError(f"job {job_id} has {current['state']} already")
        return self.update(job_id, state=state, reason=reason, finished_at=time.time(), **fields)

    def _row(self, job_id: str) -> Mapping[str, Any]:
        with self._db.transaction(write=False) as connection:
            connection.row_factory = sqlite3.Row
            row = connection.execute("SELECT * FROM jobs WHERE id = ?", (_key(job_id),)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id!r}")
        return dict(row)


def _key(job_id: str) -> int:
    """A job id as the table's key. Raises UnknownJob for one that cannot be any job's, "01" for job 1 included."""
    key = whole_number(job_id)
    if key is None:
        raise UnknownJob(f"no job {job_id[:64]!r}")
    return key


def _record(row: Mapping[str, Any]) -> JobRecord:
    return JobRecord(
        id=str(row["id"]),
        name=row["name"],
        state=row["state"],
        submitted_by=row["submitted_by"],
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        workers=json.loads(row["workers"]),
        evaluator=row["evaluator"],
        round=row["round"],
        rounds=row["rounds"],
        reason=row["reason"],
        refusals=json.loads(row["refusals"]),
        result=json.loads(row["result"]) if row["result"] is not None else None,
    )
