"""A small in-memory :class:`~syncfed.service_api.FederationService`, for testing its consoles without a service.

It knows two workers and a few jobs, checks a job's text the way the real
service refuses one (an unknown key, a wrong type: one line naming the key),
and lets a test script a running job: each look at its log adds a line, and
after ``finish_after`` looks it is done.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from syncfed.exceptions import ConfigError, JobStateError, UnknownJob
from syncfed.service_api import FINISHED_STATES, JobRecord, WorkerRecord

#: The keys a fake job may have, and their types.
JOB_KEYS: dict[str, type] = {"name": str, "workers": list, "rounds": int, "model": str}


#: The weights every fake model file holds, by round.
def weights(round: int) -> dict[str, np.ndarray]:
    return {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3) * round}


class FakeService:
    """Jobs in a dict; models written to ``folder`` on request."""

    def __init__(self, folder: Path, *, finish_after: int = 3) -> None:
        self.folder = folder
        self.finish_after = finish_after
        self.records: dict[str, JobRecord] = {}
        self.lines: dict[str, list[str]] = {}
        self.looks: dict[str, int] = {}
        now = time.time()
        self.worker_records: list[WorkerRecord] = [
            WorkerRecord(
                id="alice",
                role="trainer",
                connected=True,
                connected_since=now - 60,
                last_seen=now - 1,
                version="protocol 7",
                rtt_ms=1.25,
                data="digits train: 449 examples, 10 classes",
                job=None,
            ),
            WorkerRecord(
                id="bob",
                role="trainer",
                connected=False,
                connected_since=None,
                last_seen=None,
                version="",
                rtt_ms=None,
                data="",
                job=None,
            ),
        ]

    def add(self, name: str, state: str, **fields: Any) -> JobRecord:
        """A job in ``state``, as if it had been submitted earlier."""
        record = JobRecord(
            id=f"job-{len(self.records) + 1}",
            name=name,
            state=state,  # type: ignore[typeddict-item]
            submitted_by="ops@hospital-a.org",
            submitted_at=time.time(),
            started_at=None if state == "queued" else time.time(),
            finished_at=time.time() if state in FINISHED_STATES else None,
            workers=["alice", "bob"],
            evaluator=None,
            round=0,
            rounds=3,
            reason=None,
            refusals={},
            result=None,
        )
        record.update(fields)  # type: ignore[typeddict-item]
        self.records[record["id"]] = record
        self.lines[record["id"]] = [f"{record['id']} submitted"]
        self.looks[record["id"]] = 0
        return record

    async def workers(self) -> list[WorkerRecord]:
        return list(self.worker_records)

    async def submit(self, job: str, *, by: str) -> JobRecord:
        try:
            settings = tomllib.loads(job)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"job: {exc}") from None
        for key, value in settings.items():
            if key not in JOB_KEYS:
                raise ConfigError(f"job: unknown key {key!r}")
            if not isinstance(value, JOB_KEYS[key]):
                raise ConfigError(f"job: key {key!r}: expected {JOB_KEYS[key].__name__}, not {value!r}")
        return self.add(settings.get("name", "job"), "queued", submitted_by=by, rounds=settings.get("rounds", 3))

    async def jobs(self) -> list[JobRecord]:
        return list(reversed(self.records.values()))

    async def job(self, job_id: str) -> JobRecord:
        if job_id not in self.records:
            raise UnknownJob(f"no job {job_id!r}")
        return self.records[job_id]

    async def abort(self, job_id: str, *, by: str) -> JobRecord:
        record = await self.job(job_id)
        if record["state"] in FINISHED_STATES:
            raise JobStateError(f"job {job_id} has finished ({record['state']}): nothing to abort")
        record.update(state="aborted", reason=f"aborted by {by}", finished_at=time.time())
        return record

    async def logs(self, job_id: str, *, since: int = 0) -> tuple[list[str], int]:
        record = await self.job(job_id)
        if record["state"] == "running":
            self.looks[job_id] += 1
            record["round"] = self.looks[job_id]
            self.lines[job_id].append(f"round {self.looks[job_id]} done")
            if self.looks[job_id] >= self.finish_after:
                record.update(state="done", finished_at=time.time(), result={"accuracy": 0.9667})
                self.lines[job_id].append("job done")
        lines = self.lines[job_id]
        return lines[since:], len(lines)

    async def metrics(self, job_id: str) -> list[dict[str, Any]]:
        record = await self.job(job_id)
        if record["name"] == "broken":
            raise RuntimeError("/secret/path/metrics.jsonl is corrupt")
        return [
            {"event": "round", "round": 1, "workers": ["alice", "bob"], "failed": {}, "seconds": 0.5},
            {"event": "eval", "round": 1, "model": "federated", "accuracy": 0.9, "loss": 0.3, "n": 360},
            {"event": "eval", "round": 1, "model": "alice", "accuracy": 0.8, "loss": 0.4, "n": 180},
        ]

    async def model(self, job_id: str, *, round: int | None = None) -> Path:
        record = await self.job(job_id)
        chosen = record["rounds"] if round is None else round
        if not 1 <= chosen <= record["rounds"]:
            raise JobStateError(f"job {job_id} kept no model of round {chosen}")
        path = self.folder / f"{job_id}-{chosen}.safetensors"
        save_file(weights(chosen), str(path))
        return path
