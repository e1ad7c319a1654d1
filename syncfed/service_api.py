"""What a running federation service answers: the contract between the service and its consoles.

``python -m syncfed serve`` keeps workers connected and runs jobs
(:mod:`syncfed.coordinator.service`); the admin API and the dashboard
(:mod:`syncfed.net`) show and change it only through
:class:`FederationService`, so each side is tested without the other. Records
are plain JSON-ready dicts (times are Unix seconds), which is what the HTTP
API sends and ``--json`` prints.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypedDict

__all__ = [
    "ADMIN_ROLES",
    "JOB_STATES",
    "FINISHED_STATES",
    "READ_ACTIONS",
    "WRITE_ACTIONS",
    "FederationService",
    "JobRecord",
    "WorkerRecord",
    "allowed",
    "whole_number",
]

#: The roles an admin certificate names in its organizational unit (``provision``'s ``[[admins]]``).
ADMIN_ROLES: Final = ("project-admin", "viewer")

#: What any admin may do, and what only a project admin may.
READ_ACTIONS: Final = frozenset({"workers", "jobs", "status", "logs", "metrics", "download"})
WRITE_ACTIONS: Final = frozenset({"submit", "abort"})

JobState = Literal["queued", "running", "done", "failed", "aborted"]
JOB_STATES: Final = ("queued", "running", "done", "failed", "aborted")
FINISHED_STATES: Final = frozenset({"done", "failed", "aborted"})


#: A whole number as the API takes it (a job id, ``since``, ``round``): ASCII digits in their one canonical form, at
#: most 18 of them (an SQLite integer). ``str.isdigit`` would let in "01" (job 1 under another name), "١" and "²".
_WHOLE_NUMBER: Final = re.compile(r"0|[1-9][0-9]{0,17}")


def whole_number(text: str) -> int | None:
    """``text`` as a whole number, or ``None`` when it is not one in canonical form (so ``str(n) == text``)."""
    return int(text) if _WHOLE_NUMBER.fullmatch(text) else None


def allowed(role: str, action: str) -> bool:
    """Whether an admin of ``role`` may take ``action``; an unknown role or action may do nothing."""
    if role not in ADMIN_ROLES:
        return False
    return action in READ_ACTIONS or (action in WRITE_ACTIONS and role == "project-admin")


class WorkerRecord(TypedDict):
    """A worker the service knows: connected now or once."""

    id: str
    role: str  # "trainer" or "evaluator", as its hello said; "" before it first connected
    connected: bool
    connected_since: float | None  # this connection's start; None while not connected
    last_seen: float | None  # the last message or ping answered; None if never connected
    version: str  # the protocol version its hello announced, e.g. "protocol 7" (hello has no syncfed version)
    rtt_ms: float | None  # the last ping's round trip
    data: str  # one-line summary of what it holds, e.g. "digits train: 449 examples, 10 classes"
    job: str | None  # the running job it serves, if any


class JobRecord(TypedDict):
    """A job and where it stands."""

    id: str
    name: str
    state: JobState
    submitted_by: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    workers: list[str]  # the trainers it asked for
    evaluator: str | None
    round: int  # the last completed round (or version, in async mode); 0 before the first
    rounds: int
    reason: str | None  # why it failed or was aborted, one line
    refusals: dict[str, str]  # site -> the reason its policy refused the job
    result: dict[str, Any] | None  # the final headline figures, e.g. {"accuracy": 0.9667}


class FederationService(Protocol):
    """The service as its consoles see it. Every method may raise :class:`~syncfed.exceptions.SyncfedError`."""

    async def workers(self) -> list[WorkerRecord]:
        """Every worker the service knows, sorted by id."""
        ...

    async def submit(self, job: str, *, by: str) -> JobRecord:
        """Queue the job a TOML text describes.

        Raises:
            ConfigError: an unknown key, a wrong type, a worker that is not connected; one line.
        """
        ...

    async def jobs(self) -> list[JobRecord]:
        """Every job, newest first."""
        ...

    async def job(self, job_id: str) -> JobRecord:
        """One job. Raises UnknownJob."""
        ...

    async def abort(self, job_id: str, *, by: str) -> JobRecord:
        """Stop a queued or running job. Raises UnknownJob, or JobStateError if it has finished."""
        ...

    async def logs(self, job_id: str, *, since: int = 0) -> tuple[list[str], int]:
        """The job's log lines from line ``since`` on, and the line to ask from next. Raises UnknownJob."""
        ...

    async def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """The job's metrics events, as its metrics file has them (one per line). Raises UnknownJob."""
        ...

    async def model(self, job_id: str, *, round: int | None = None) -> Path:
        """A safetensors file of the job's model: the last one, or that of ``round``.

        Raises:
            UnknownJob: no such job.
            JobStateError: no model of that round was kept.
        """
        ...
