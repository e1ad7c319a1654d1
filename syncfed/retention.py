"""What a model registry keeps: each run's headline metric, which versions a prune removes, and the space used.

A run records its evaluated rounds and its final model (``--registry-every-round``
records every round), a few MiB each for a small model, so a registry that
many runs share grows; ``python -m syncfed models prune`` and ``du`` use this module.

- :func:`headline_metric`: the figure that ranks a run's versions, as its task
  reads: AUC for a binary task, MAE for a regression, accuracy for classes;
  the loss for a task with none of them. A binary task's versions record an
  accuracy too, so the order of :data:`HEADLINES` matters.
- :func:`prune_plan`: per run, keep the last N rounds and the best N by the
  headline metric, remove the rest.
- :func:`disk_usage`: bytes per run, each weights file counted once (under
  the first run that uses it, as ``du`` counts a hard link), so the figures add
  up to what the directory holds.

Usage::

    plans = prune_plan(registry.versions(), keep_last=1, keep_best=1)
    freed = registry.delete([version for plan in plans for version in plan.remove])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .exceptions import ConfigError, describe
from .registry import DATABASE_FILE, WEIGHTS_FOLDER, ModelRegistry, ModelVersion

__all__ = ["HEADLINES", "RunPlan", "Usage", "headline_metric", "prune_plan", "reclaimable", "disk_usage"]

#: (metric, lowest is best) in the order a run's headline is looked for; the same names with ``site_``
#: (federated evaluation's average) come after them, for a run without a central evaluator.
HEADLINES: Final = (("auc", False), ("mae", True), ("accuracy", False), ("loss", True))


def headline_metric(versions: Sequence[ModelVersion]) -> tuple[str, bool] | None:
    """The metric that ranks ``versions`` (one run's) and whether lowest is best; ``None`` if none has one."""
    recorded = {name for version in versions for name, value in version.metrics.items() if not math.isnan(value)}
    for prefix in ("", "site_"):
        for name, lowest in HEADLINES:
            if prefix + name in recorded:
                return prefix + name, lowest
    return None


@dataclass(frozen=True)
class RunPlan:
    """One run's part of a prune: the versions it keeps and those it removes, each by round."""

    run_id: str
    keep: tuple[ModelVersion, ...]
    remove: tuple[ModelVersion, ...]
    metric: str | None  # the headline metric --keep-best ranked by; None when nothing ranked


def prune_plan(versions: Sequence[ModelVersion], *, keep_last: int = 0, keep_best: int = 0) -> list[RunPlan]:
    """Per run of ``versions``: keep its last ``keep_last`` rounds and its best ``keep_best`` by the headline
    metric (ties to the earlier round, as :meth:`ModelRegistry.best` breaks them; NaN never counts), remove
    the rest. A run with no metric to rank by keeps its last ``keep_best`` rounds instead: pruning never
    empties a run it cannot judge. Runs come in the order of their first version.

    Raises:
        ConfigError: if a count is not an integer of at least 0.
    """
    for flag, count in (("keep-last", keep_last), ("keep-best", keep_best)):
        if type(count) is not int or count < 0:
            raise ConfigError(f"--{flag} {describe(count)} must be an integer of at least 0")
    runs: dict[str, list[ModelVersion]] = {}
    for version in versions:
        runs.setdefault(version.run_id, []).append(version)
    plans = []
    for run_id, entries in runs.items():
        entries.sort(key=lambda version: version.round)
        kept = {version.id for version in entries[-keep_last:]} if keep_last else set()
        headline = headline_metric(entries) if keep_best else None
        if headline is not None:
            name, lowest = headline
            scored = [version for version in entries if not math.isnan(version.metrics.get(name, math.nan))]
            scored.sort(key=lambda version: version.metrics[name] if lowest else -version.metrics[name])
            kept |= {version.id for version in scored[:keep_best]}
        elif keep_best:
            kept |= {version.id for version in entries[-keep_best:]}
        plans.append(
            RunPlan(
                run_id,
                tuple(version for version in entries if version.id in kept),
                tuple(version for version in entries if version.id not in kept),
                headline[0] if headline is not None else None,
            )
        )
    return plans


def reclaimable(remove: Sequence[ModelVersion], every: Sequence[ModelVersion]) -> int:
    """The bytes that removing ``remove`` frees among ``every`` (all the registry's versions): the weights
    files that no other version uses, each once."""
    removed = {version.id for version in remove}
    used = {version.hash for version in every if version.id not in removed}
    files = {version.path for version in remove if version.hash not in used}
    return sum(path.stat().st_size for path in files if path.is_file())


@dataclass(frozen=True)
class Usage:
    """The bytes a registry holds: per run (versions, bytes), weights no version uses, and the database."""

    runs: Mapping[str, tuple[int, int]]
    unreferenced: int  # weights files no version names: left by a write cut short
    database: int  # the SQLite file with its write-ahead log

    @property
    def total(self) -> int:
        return sum(size for _, size in self.runs.values()) + self.unreferenced + self.database


def disk_usage(registry: ModelRegistry) -> Usage:
    """What each run's weights take, each file counted once under the first run (oldest first) that uses it."""
    counted: set[str] = set()
    runs: dict[str, tuple[int, int]] = {}
    for version in registry.versions():
        count, size = runs.get(version.run_id, (0, 0))
        if version.hash not in counted and version.path.is_file():
            counted.add(version.hash)
            size += version.path.stat().st_size
        runs[version.run_id] = (count + 1, size)
    folder = registry.directory / WEIGHTS_FOLDER
    unreferenced = sum(
        path.stat().st_size for path in folder.glob("*.safetensors") if path.is_file() and path.stem not in counted
    )
    database = sum(
        path.stat().st_size
        for suffix in ("", "-wal", "-shm")
        if (path := registry.directory / (DATABASE_FILE + suffix)).is_file()
    )
    return Usage(runs, unreferenced, database)
