"""One job's run inside the service: a :class:`~.coordinator.Coordinator` over lent links, and its files.

A job's folder, ``jobs/<id>/`` under the service's state folder, holds its
checkpoint (``checkpoint/``), its metrics (``metrics.jsonl``), its log
(``log.txt``: the coordinator's report lines) and its final model
(``model.safetensors``); its evaluated rounds go to the service's model
registry. Progress, refusals and the final figures are written to the job
store as the metrics events arrive, so the consoles see them at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..config import CoordinatorConfig
from ..evaluation import scalar_metrics
from ..net.link import WorkerLink
from .coordinator import Coordinator
from .job_file import JobFile
from .job_store import JobStore
from .results import RunResult

__all__ = ["CHECKPOINT", "LOG", "METRICS", "MODEL", "JobRun", "append_log", "final_figures", "run_config"]

CHECKPOINT: Final = "checkpoint"
METRICS: Final = "metrics.jsonl"
LOG: Final = "log.txt"
MODEL: Final = "model.safetensors"


def run_config(
    job: JobFile, folder: Path, *, service: Mapping[str, Any], registry: Path, resume: bool
) -> CoordinatorConfig:
    """The coordinator's config of ``job`` with its files in ``folder``: built at launch, and at submit so that a
    job that could never run is refused then. Raises ConfigError (one line)."""
    return job.config(
        **service,
        checkpoint_dir=folder / CHECKPOINT,
        metrics_out=folder / METRICS,
        save_model=folder / MODEL,
        registry=registry,
        cross_site_out=folder / "cross-site",
        resume=resume,
    )


class JobRun:
    """Runs job ``job_id`` once; :meth:`run` returns its result or raises its one-line error."""

    def __init__(
        self,
        job_id: str,
        job: JobFile,
        store: JobStore,
        folder: Path,
        *,
        links: Mapping[str, WorkerLink],
        registry: Path,
        service: Mapping[str, Any],
        resume: bool,
    ) -> None:
        """``service``: the settings the service decides for every job (its listener and credentials)."""
        self.job_id, self.store, self.folder = job_id, store, folder
        self.config = run_config(job, folder, service=service, registry=registry, resume=resume)
        self.refusals: dict[str, str] = dict(store.get(job_id)["refusals"])
        self.coordinator = Coordinator(self.config, report=self.report, listeners=[self.event], links=links)
        self._run_id: str | None = None

    def report(self, line: str) -> None:
        append_log(self.folder, line)

    def event(self, event: Mapping[str, Any]) -> None:
        """A metrics event: the round reached, a site's refusal, the run's name in the registry."""
        if self._run_id != self.coordinator.run_id:
            self._run_id = self.coordinator.run_id
            self.store.update(self.job_id, run_id=self._run_id)
        if event.get("event") == "round":
            self.store.update(self.job_id, round=int(event["round"]))
        elif event.get("event") == "refused":
            self.refusals[str(event["worker"])] = str(event["reason"])
            self.store.update(self.job_id, refusals=self.refusals)

    async def run(self) -> dict[str, float] | None:
        """Train; the final global model's figures (accuracy, loss, ...), or ``None`` when it was never evaluated.

        Raises:
            SyncfedError: what stopped the run.
        """
        return final_figures(await self.coordinator.run())


def append_log(folder: Path, line: str) -> None:
    """A time-stamped line of a job's log (``log.txt`` in its folder), which ``logs`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    with (folder / LOG).open("a", encoding="utf-8") as log:
        log.write(f"{stamp} {line}\n")


def final_figures(result: RunResult) -> dict[str, float] | None:
    """The last evaluation of the global model, as numbers."""
    final = [record for record in result.evaluations if record.model == result.global_model]
    return {"round": float(final[-1].round), **scalar_metrics(final[-1].result)} if final else None
