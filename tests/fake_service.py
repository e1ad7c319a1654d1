"""A stand-in :class:`~syncfed.service_api.FederationService` whose running job grows while a dashboard watches.

Its workers and its running job look like the digits demo's (alice, bob and
charlie train on digit groups, testing evaluates) with central DP: each
:meth:`FakeService.grow` writes one more round's metrics events in the
coordinator's format, with seeded, plausible figures. It records which
methods were called, so a test can tell that a console only read.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

from syncfed.exceptions import JobStateError, PermissionDenied, UnknownJob
from syncfed.service_api import JobRecord, WorkerRecord

__all__ = ["TRAINERS", "FakeService"]

TRAINERS = ("alice", "bob", "charlie")


class FakeService:
    """A service with four connected workers, one that has left, a finished job and a running one."""

    def __init__(self, *, rounds: int = 40, seed: int = 0) -> None:
        self.calls: list[str] = []
        self.now = now = time.time()  # the dashboard shows ages against its own clock
        self._rng = random.Random(seed)
        self._events: list[dict[str, Any]] = []
        self._workers: dict[str, WorkerRecord] = {}
        for index, name in enumerate((*TRAINERS, "testing")):
            self._workers[name] = {
                "id": name,
                "role": "evaluator" if name == "testing" else "trainer",
                "connected": True,
                "connected_since": now - 3600 + index,
                "last_seen": now - 1,
                "version": "protocol 7",
                "rtt_ms": 1.2 + index / 2,
                "data": "digits test: 360 examples, 10 classes"
                if name == "testing"
                else f"digits train: {449 + index} examples, digits {('0-3', '4-6', '7-9')[index]}",
                "job": "2",
            }
        self._workers["dana"] = {
            "id": "dana",
            "role": "trainer",
            "connected": False,
            "connected_since": None,
            "last_seen": now - 600,
            "version": "protocol 7",
            "rtt_ms": None,
            "data": "digits train: 300 examples, digits 0-9",
            "job": None,
        }
        common = {"submitted_by": "ada", "evaluator": "testing", "refusals": {}, "workers": list(TRAINERS)}
        self._jobs: list[JobRecord] = [
            {
                **common,  # type: ignore[typeddict-item]
                "id": "2",
                "name": "digits-dp",
                "state": "running",
                "submitted_at": now - 120,
                "started_at": now - 118,
                "finished_at": None,
                "round": 0,
                "rounds": rounds,
                "reason": None,
                "result": None,
            },
            {
                **common,  # type: ignore[typeddict-item]
                "id": "1",
                "name": "digits",
                "state": "done",
                "submitted_at": now - 3000,
                "started_at": now - 2990,
                "finished_at": now - 2950,
                "round": 40,
                "rounds": 40,
                "reason": None,
                "result": {"accuracy": 0.9667},
            },
        ]

    @property
    def running(self) -> JobRecord:
        return self._jobs[0]

    def grow(self, rounds: int = 1) -> None:
        """The running job finishes ``rounds`` more rounds: their events, its progress, the workers' pings."""
        for _ in range(rounds):
            number = self.running["round"] + 1
            progress = 1 - math.exp(-number / 6)
            self._events.append(
                {
                    "event": "round",
                    "round": number,
                    "workers": list(TRAINERS),
                    "failed": {},
                    "seconds": round(0.55 + 0.25 * self._rng.random() + (1.9 if number == 1 else 0), 4),
                    "lr": 0.1,
                    "strategy": "fedavg",
                    "privacy": {"dp": "central", "epsilon": round(0.42 * math.sqrt(number), 4), "delta": 1e-5},
                }
            )
            for site, ceiling in zip(TRAINERS, (0.86, 0.83, 0.88), strict=True):
                own = 0.30 + (ceiling - 0.30) * progress + self._rng.uniform(-0.025, 0.025)
                self._events.append({"event": "eval", "round": number, "model": site, "accuracy": own, "n": 360})
            federated = 0.47 + (0.965 - 0.47) * progress + self._rng.uniform(-0.01, 0.01)
            self._events.append({"event": "eval", "round": number, "model": "federated", "accuracy": federated})
            self.running["round"] = number
            self.now += 1.0
            for worker in self._workers.values():
                if worker["connected"]:
                    worker["last_seen"] = self.now - self._rng.uniform(0, 1)
                    worker["rtt_ms"] = round(1.0 + self._rng.uniform(0, 2), 2)

    def connect(self, name: str) -> None:
        """Worker ``name`` (dana) comes back."""
        worker = self._workers[name]
        worker |= {"connected": True, "connected_since": self.now, "last_seen": self.now, "rtt_ms": 2.5}

    async def workers(self) -> list[WorkerRecord]:
        self.calls.append("workers")
        return [dict(worker) for _, worker in sorted(self._workers.items())]  # type: ignore[misc]

    async def jobs(self) -> list[JobRecord]:
        self.calls.append("jobs")
        return [dict(job) for job in self._jobs]  # type: ignore[misc]

    async def job(self, job_id: str) -> JobRecord:
        self.calls.append("job")
        return next(dict(job) for job in self._jobs if job["id"] == self._known(job_id))  # type: ignore[return-value]

    async def metrics(self, job_id: str) -> list[dict[str, Any]]:
        self.calls.append("metrics")
        return list(self._events) if self._known(job_id) == "2" else []

    async def logs(self, job_id: str, *, since: int = 0) -> tuple[list[str], int]:
        self.calls.append("logs")
        self._known(job_id)
        return [], since

    async def submit(self, job: str, *, by: str) -> JobRecord:
        self.calls.append("submit")
        raise PermissionDenied(f"{by} may not submit to a fake service")

    async def abort(self, job_id: str, *, by: str) -> JobRecord:
        self.calls.append("abort")
        raise JobStateError(f"job {self._known(job_id)} cannot be aborted in a fake service")

    async def model(self, job_id: str, *, round: int | None = None) -> Path:
        self.calls.append("model")
        raise JobStateError(f"job {self._known(job_id)} kept no model")

    def _known(self, job_id: str) -> str:
        if job_id not in {job["id"] for job in self._jobs}:
            raise UnknownJob(f"no job {job_id!r}")
        return job_id
