"""The job service: a coordinator that stays up, keeps its workers' connections, and runs jobs from a queue.

Usage::

    service = Service(ServiceSettings(state=Path("state"), listen="0.0.0.0:8765", workers=("alice", "testing"),
                                      worker_tokens=Path("tokens.txt")), flags=syncfed.cli.serve.JOB_FLAGS)
    await service.start()
    record = await service.submit(Path("job.toml").read_text(), by="ada")
    ...
    await service.close()

The rooms: :mod:`.worker_table` (the workers and their links), :mod:`.job_store`
(the jobs in SQLite), :mod:`.job_file` (what a job may say), :mod:`.job_run`
(one job's coordinator and files). Jobs start first in, first out, each
once all its workers are connected and none serves another job, so jobs on
disjoint workers run at once, each a task of this event loop. A job still
"running" in the store when the service starts was cut off (a kill, a
stop): it resumes from its checkpoint once its workers are back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MAX_MESSAGE_SIZE, DIAL_IN, CoordinatorConfig
from ..exceptions import ConfigError, JobStateError, SyncfedError
from ..registry import ModelRegistry
from ..service_api import JobRecord, WorkerRecord
from .job_file import JobFile, JobFlags, read_job
from .job_run import LOG, METRICS, MODEL, JobRun, append_log, run_config
from .job_store import JobStore
from .pool import dial_in_listener, worker_links
from .worker_table import WorkerTable

__all__ = ["Service", "ServiceSettings"]

logger = logging.getLogger("syncfed.service")


@dataclass(frozen=True)
class ServiceSettings:
    """Where the service keeps its state, where its workers dial, and how they prove who they are."""

    state: Path  # jobs.sqlite3, registry/, jobs/<id>/
    listen: str  # HOST:PORT the workers dial
    workers: tuple[str, ...]  # the ids let in: trainers and evaluators
    # Security (as run_websocket_client.py --listen's)
    worker_tokens: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure_listen: bool = False
    # Limits
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_pending_connections: int = 64
    # Timeouts
    connect_timeout: float = 30.0  # a worker's hello
    handshake_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    poll_interval: float = 0.2  # how often idle workers are checked, and the queue when nothing else wakes it
    # What a job may make the service import (strategy, task, model): built-in names and these import paths
    allow_imports: tuple[str, ...] = ()

    def listener_config(self) -> CoordinatorConfig:
        """The settings of the listener and the links, as a coordinator's: checked as ``--listen``'s are.

        Raises:
            ConfigError: no workers, or a listener that would let in unproven workers without ``insecure_listen``.
        """
        if not self.workers:
            raise ConfigError("the service needs the ids of the workers it lets in: give --workers")
        return CoordinatorConfig(
            workers=dict.fromkeys(self.workers, DIAL_IN),
            evaluator={},
            **self.job_settings(),
            max_message_size=self.max_message_size,
            connect_timeout=self.connect_timeout,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_pending_connections=self.max_pending_connections,
            handshake_timeout=self.handshake_timeout,
        )

    def job_settings(self) -> dict[str, Any]:
        """What every job's run takes from the service: its listener and the workers' credentials."""
        names = ("listen", "worker_tokens", "tls_cert", "tls_key", "tls_ca", "insecure_listen")
        return {name: getattr(self, name) for name in names}


class Service:
    """A :class:`~syncfed.service_api.FederationService`; see the module docstring."""

    def __init__(self, settings: ServiceSettings, *, flags: JobFlags, report: Callable[[str], None] = print) -> None:
        """``flags`` reads job files (the CLI's coordinator flags); ``report`` gets the service's own lines (workers
        joining and leaving, jobs starting and ending).

        Raises:
            ConfigError: if the settings are not a valid listener, or a token or TLS file cannot be read.
            CheckpointError: if the job store cannot be opened.
        """
        self.settings = settings
        self.flags = flags
        self.report = report
        config = settings.listener_config()
        links = worker_links(config)
        listener = dial_in_listener(config, links, report=report)
        assert listener is not None
        self.table = WorkerTable(
            links,  # type: ignore[arg-type]  # every link of a dial-in config is a DialInLink
            listener,
            report=report,
            on_change=self._wake_up,
            hello_timeout=settings.connect_timeout,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            poll_interval=settings.poll_interval,
        )
        self.store = JobStore(settings.state)
        self.registry = settings.state / "registry"
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        #: Jobs the store says were running when the service started: they resume from their checkpoints.
        self._cut_off = {record["id"] for record in self.store.in_state("running")}

    async def start(self) -> str:
        """Listen for the workers and start scheduling; return the address the workers dial."""
        uri = await self.table.open()
        self.report(f"Listening for workers on {uri}")
        for job_id in sorted(self._cut_off, key=int):
            self._log(job_id, "The service restarted: the job resumes from its checkpoint once its workers are back")
        self._scheduler = asyncio.create_task(self._schedule())
        return uri

    async def close(self) -> None:
        """Stop scheduling and the running jobs (still "running" in the store, so a restart resumes them)."""
        tasks = [task for task in (self._scheduler, *self._running.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.table.close()

    # FederationService

    async def workers(self) -> list[WorkerRecord]:
        return self.table.records()

    async def submit(self, job: str, *, by: str) -> JobRecord:
        parsed = self.check(job)
        offline = [name for name in self._needs(parsed) if not self.table.ready(name)]
        if offline:
            raise ConfigError(f"job file: worker {offline[0]} is not connected")
        return self.queue(job, parsed, by=by)

    def queue(self, job: str, parsed: JobFile, *, by: str) -> JobRecord:
        """Queue a checked job, connected workers or not: ``serve --queue`` does so before they dial in."""
        record = self.store.add(
            name=parsed.name,
            job=job,
            by=by,
            workers=list(parsed.workers),
            evaluator=parsed.evaluator,
            rounds=parsed.rounds,
        )
        self._log(record["id"], f"Queued by {by}: {parsed.name}, {parsed.rounds} rounds")
        self._wake_up()
        return record

    async def jobs(self) -> list[JobRecord]:
        return self.store.all()

    async def job(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    async def abort(self, job_id: str, *, by: str) -> JobRecord:
        record = self.store.finish(job_id, "aborted", reason=f"aborted by {by}")
        job_id = record["id"]  # the store's own form of the id, which keys the running tasks
        self._cut_off.discard(job_id)
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._log(job_id, f"Aborted by {by}")
        return record

    async def logs(self, job_id: str, *, since: int = 0) -> tuple[list[str], int]:
        path = self._folder(self.store.get(job_id)["id"]) / LOG
        lines = await asyncio.to_thread(_whole_lines, path)
        return lines[max(since, 0) :], len(lines)

    async def metrics(self, job_id: str) -> list[dict[str, Any]]:
        path = self._folder(self.store.get(job_id)["id"]) / METRICS
        lines = await asyncio.to_thread(_whole_lines, path)
        return [json.loads(line) for line in lines if line.strip()]

    async def model(self, job_id: str, *, round: int | None = None) -> Path:
        record = self.store.get(job_id)
        if round is None:
            path = self._folder(job_id) / MODEL
            if not path.exists():
                raise JobStateError(f"job {job_id} has no final model: it is {record['state']}")
            return path
        run_id = self.store.run_id(job_id)
        versions = ModelRegistry(self.registry).versions(run_id) if run_id is not None else []
        for version in versions:
            if version.round == round:
                return version.path
        kept = ", ".join(str(version.round) for version in versions) or "none"
        raise JobStateError(f"job {job_id} kept no model of round {round} (rounds kept: {kept})")

    # Scheduling

    def check(self, job: str) -> JobFile:
        """A job file's text, checked against this service's workers, and its run built as its launch would
        build it, so that every error shows now. Raises ConfigError: it is invalid (one line)."""
        settings = self.settings
        parsed = read_job(
            job, known=settings.workers, folder=settings.state, flags=self.flags, allow_imports=settings.allow_imports
        )
        run_config(parsed, self._folder("new"), service=settings.job_settings(), registry=self.registry, resume=False)
        return parsed

    @staticmethod
    def _needs(job: JobFile) -> list[str]:
        return [*job.workers, *([job.evaluator] if job.evaluator is not None else [])]

    def _wake_up(self) -> None:
        self._wake.set()

    async def _schedule(self) -> None:
        while True:
            try:
                self._start_ready()
            except Exception as exc:  # a disk or database error: this pass is lost, the next one may do better
                logger.exception("scheduling failed")
                self.report(f"Scheduling failed, trying again: {type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval * 25):
                    await self._wake.wait()
            self._wake.clear()

    def _start_ready(self) -> None:
        """Start each waiting job whose workers are all connected and free, first in first out.

        A job that must wait holds its workers back from later jobs, so that no job waits for ever; a later
        job on other workers starts beside it.
        """
        waiting = [record for record in self.store.in_state("running") if record["id"] not in self._running]
        waiting += self.store.in_state("queued")
        held: set[str] = set()
        for record in waiting:
            needs = [*record["workers"], *([record["evaluator"]] if record["evaluator"] is not None else [])]
            gone = [name for name in needs if name not in self.table.links]
            if gone:  # the service was restarted without them: the job cannot run here
                self._cut_off.discard(record["id"])
                self._fail(record["id"], f"worker {gone[0]} is not one of the service's any more")
                continue
            free = all(self.table.ready(name) and name not in self.table.lent for name in needs)
            if free and not held & set(needs):
                self._launch(record)
            held.update(needs)

    def _launch(self, record: JobRecord) -> None:
        job_id = record["id"]
        resume = job_id in self._cut_off
        self._cut_off.discard(job_id)
        try:
            parsed = self.check(self.store.text(job_id))
        except ConfigError as exc:  # it was checked at submission: this service's workers changed since
            self._fail(job_id, str(exc))
            return
        except Exception as exc:  # an allowed import that breaks, say: this job fails, the queue behind it goes on
            logger.exception("job %s cannot start", job_id)
            self._fail(job_id, f"cannot start: {type(exc).__name__}: {exc}")
            return
        started = record["started_at"] or time.time()
        self.store.update(job_id, state="running", started_at=started)
        links = self.table.lend(self._needs(parsed), job_id)
        self.report(f"Job {job_id} ({parsed.name}) {'resumes' if resume else 'starts'} on {', '.join(links)}")
        self._running[job_id] = asyncio.create_task(self._run(job_id, parsed, links, resume=resume))

    async def _run(self, job_id: str, job: JobFile, links: dict[str, Any], *, resume: bool) -> None:
        try:
            run = JobRun(
                job_id,
                job,
                self.store,
                self._folder(job_id),
                links=links,
                registry=self.registry,
                service=self.settings.job_settings(),
                resume=resume,
            )
            result = await run.run()
        except SyncfedError as exc:
            self._fail(job_id, str(exc))
        except asyncio.CancelledError:
            raise  # aborted (the store says so already) or the service stopping (it stays running, to resume)
        except Exception as exc:  # a bug must cost the job, not the service and the other jobs
            logger.exception("job %s failed", job_id)
            self._fail(job_id, f"internal error: {type(exc).__name__}: {exc}")
        else:
            self.store.finish(job_id, "done", result=result)
            figures = ", ".join(f"{name} {value:.4g}" for name, value in (result or {}).items()) or "not evaluated"
            self._log(job_id, f"Done: {figures}")
            self.report(f"Job {job_id} done: {figures}")
        finally:
            self._running.pop(job_id, None)
            self.table.give_back(job_id)

    def _fail(self, job_id: str, reason: str) -> None:
        with contextlib.suppress(JobStateError):  # aborted meanwhile
            self.store.finish(job_id, "failed", reason=reason)
        self._log(job_id, f"Failed: {reason}")
        self.report(f"Job {job_id} failed: {reason}")

    def _folder(self, job_id: str) -> Path:
        return self.settings.state / "jobs" / job_id

    def _log(self, job_id: str, line: str) -> None:
        append_log(self._folder(job_id), line)


def _whole_lines(path: Path) -> list[str]:
    """The lines of a file being appended to, without a last one still half-written; none if it does not exist."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]  # what follows the last newline is unfinished (or empty)
