"""The run's written record: the metrics file, the model registry and the checkpoint, and resuming from them.

A finished round (or asynchronous version) is written in this order: its
events in the metrics file, its model in the registry, then the checkpoint,
which records how long the metrics file was at that point. On ``--resume``
the metrics file is cut back to that length, so lines of the round in
progress at a crash are not written twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from ..checkpoint import Checkpoint, check_resumable, check_weights, load_checkpoint, save_checkpoint
from ..config import CoordinatorConfig
from ..evaluation import scalar_metrics
from ..exceptions import CheckpointError, ConfigError, ProtocolError
from ..initial_weights import initial_weights
from ..models import get_weights, resolve_model
from ..protocol import DataPlan, Info, Recipe
from ..registry import ModelRegistry
from ..shaped_models import shaped_factory
from ..strategies import Strategy
from ..tensors import Weights
from .results import CENTRALIZED, FEDERATED, RoundRecord, RunResult

__all__ = ["Journal", "round_event"]


def round_event(
    record: RoundRecord,
    *,
    mode: str | None,
    figures: Mapping[str, Any],
    strategy: str,
    details: Mapping[str, Any],
    traffic: tuple[int, int],
    privacy: Mapping[str, Any],
) -> dict[str, Any]:
    """A round's metrics event, in both modes: the record, then the mode's own fields in their places.

    ``figures``: the loss (and example, compression, epsilon) fields; ``details``: what the mode
    adds after the strategy (the sample, the staleness); ``traffic``: bytes sent and received.
    """
    return {
        "event": "round",
        **({"mode": mode} if mode is not None else {}),
        "round": record.round,
        "workers": list(record.workers),
        "failed": dict(record.failed),
        "seconds": round(record.seconds, 4),
        "lr": record.lr,
        **figures,
        "strategy": strategy,
        **details,
        "bytes_sent": traffic[0],
        "bytes_received": traffic[1],
        **privacy,
    }


class Journal:
    """Writes the metrics events, registers each version's model, checkpoints, and resumes from a checkpoint."""

    def __init__(
        self,
        config: CoordinatorConfig,
        strategy: Strategy,
        *,
        report: Callable[[str], None],
        listeners: Sequence[Callable[[Mapping[str, Any]], None]],
    ) -> None:
        """``listeners`` get every metrics event as it is written."""
        self.config = config
        self.strategy = strategy
        self.report = report
        self.listeners = tuple(listeners)
        #: Names this run in the model registry: the start time and a random suffix, kept across --resume.
        self.run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        self._registry = ModelRegistry(config.registry) if config.registry is not None else None
        self._unregistered: int | None = None  # the latest round, when the registry skipped it
        self._metrics: IO[str] | None = None
        self._early: list[str] | None = []  # the lines written before the metrics file opened; None once it has
        self._resumed: Checkpoint | None = None
        self._model_name = ""
        self._reference: Info | None = None
        self._plan: DataPlan | None = None  # over a user's own data: the plan the run trains with
        self._recipe: Recipe | None = None  # the run's task, with its class weights and target statistics

    def write(self, event: dict[str, Any]) -> None:
        """One metrics event: a line in the metrics file, and a call of each listener.

        An event before the file opens (a site that refused the job) reaches the listeners at once
        and the file first thing when it opens.
        """
        if self._metrics is not None:
            self._metrics.write(json.dumps(event) + "\n")
            self._metrics.flush()
        elif self._early is not None:
            self._early.append(json.dumps(event) + "\n")
        for listener in self.listeners:
            listener(event)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()

    def initial_state(
        self, model_name: str, reference: Info, plan: DataPlan | None = None, recipe: Recipe | None = None
    ) -> tuple[RunResult, int]:
        """Fresh weights from the seed (or ``--initial-weights``), or the checkpoint's with ``--resume``; the
        first round to run.

        ``plan`` is the agreed plan of a run over own data (its statistics may come later: :meth:`resumed_plan`),
        ``recipe`` the run's task, which shapes a built-in model's outputs.

        Raises:
            CheckpointError: a checkpoint exists without ``--resume``, or it is not of this run.
            ModelError: ``--initial-weights`` do not fit the model (without ``--allow-partial-weights``).
        """
        self._model_name, self._reference, self._plan, self._recipe = model_name, reference, plan, recipe
        build = shaped_factory(model_name, plan, recipe) if plan is not None else resolve_model(model_name)
        config = self.config
        checkpoint = load_checkpoint(config.checkpoint_dir) if config.checkpoint_dir is not None else None
        named = CENTRALIZED if config.centralized else FEDERATED
        if checkpoint is not None and not config.resume:
            raise CheckpointError(
                f"{config.checkpoint_dir} holds a checkpoint of round {checkpoint.round};"
                " pass --resume to continue it, or choose another --checkpoint-dir"
            )
        if checkpoint is None:
            if config.resume:
                self.report(f"No checkpoint in {config.checkpoint_dir}: starting at round 1")
            torch.manual_seed(config.seed)
            return RunResult(model_name, self._starting_weights(get_weights(build())), global_model=named), 1
        self.run_id = str(checkpoint.identity.get("run_id", self.run_id))  # a resumed run keeps its id
        check_resumable(checkpoint, self._identity())
        if plan is not None:  # other classes change the model's shape: say why, not which tensor differs
            _recorded_plan(checkpoint, plan)
        _recorded_recipe(checkpoint, recipe)
        check_weights(checkpoint, get_weights(build()))
        recorded = checkpoint.strategy_state.get("name")
        if recorded is not None and recorded != self.strategy.name:
            raise CheckpointError(
                f"cannot resume: the run used strategy {recorded}, not {self.strategy.name};"
                " use another --checkpoint-dir to start a new run"
            )
        try:
            self.strategy.load_state(checkpoint.server_state)
        except ConfigError as exc:  # the checkpoint's fault, not the command line's
            raise CheckpointError(f"cannot resume: {exc}") from None
        self._resumed = checkpoint
        self.report(f"Resuming after round {checkpoint.round} from {config.checkpoint_dir}")
        resumed = RunResult(model_name, checkpoint.weights, first_round=checkpoint.round + 1, global_model=named)
        return resumed, checkpoint.round + 1

    def resumed_plan(self) -> DataPlan | None:
        """The plan a resumed run over own data trained with, statistics included: a resumed run keeps
        standardising as its model learned to, so it does not agree on them again.

        Raises:
            CheckpointError: the checkpoint's plan is unreadable, or the workers' data now agree on
                another plan (other classes, features or shapes).
        """
        if self._resumed is None or self._plan is None:
            return None
        return _recorded_plan(self._resumed, self._plan)

    def resumed_recipe(self) -> Recipe | None:
        """The recipe a resumed run trained with, its class weights and target statistics included, or ``None``
        for a new run (or a classic one): a resumed model keeps the target scale it learned."""
        if self._resumed is None or self._recipe is None:
            return None
        return _recorded_recipe(self._resumed, self._recipe)

    def use_recipe(self, recipe: Recipe | None) -> None:
        """The recipe the rounds will carry, with its statistics: checkpoints record it."""
        self._recipe = recipe

    def _starting_weights(self, fresh: Weights) -> Weights:
        """``fresh`` (the seeded model's weights), or those of ``--initial-weights`` checked against them."""
        path = self.config.initial_weights
        if path is None:
            return fresh
        weights, skipped = initial_weights(path, fresh, allow_partial=self.config.allow_partial_weights)
        taken = len(fresh) - sum(name in fresh for name in skipped)
        self.report(f"Initial weights: {taken} of {len(fresh)} tensors from {path}")
        if skipped:
            self.report(f"Initial weights: skipped {', '.join(skipped)}")
        return weights

    def use_plan(self, plan: DataPlan) -> None:
        """The plan the rounds will carry, statistics included: checkpoints and the registry record it."""
        self._plan = plan

    def open_metrics(self, result: RunResult) -> None:
        """Open the metrics file: new for a new run; cut back to the checkpoint's length and appended to on resume."""
        path = self.config.metrics_out
        early, self._early = self._early or [], None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if result.first_round == 1 or not path.exists():
            self._metrics = path.open("w", encoding="utf-8")
            self._metrics.writelines(early)
            return
        if self._resumed is not None and self._resumed.metrics_size is not None:
            _check_metrics_file(path, self._resumed)
        self._metrics = path.open("r+", encoding="utf-8")
        if self._resumed is not None and self._resumed.metrics_size is not None:
            # Lines written after the checkpoint belong to the round in progress at the crash: drop them.
            self._metrics.truncate(self._resumed.metrics_size)
        self._metrics.seek(0, os.SEEK_END)
        self._metrics.writelines(early)

    async def version_done(self, round_number: int, result: RunResult) -> None:
        """Record a finished round (or asynchronous version): in the model registry, then in the checkpoint.

        The registry keeps the evaluated rounds, the ones with scores to choose by, and the final model
        (:meth:`finish`); every round only with ``registry_every_round``, as a model takes MiBs a round.
        """
        if self._registry is not None:
            if self.config.registry_every_round or self.config.is_eval_round(round_number):
                await asyncio.to_thread(self._register, round_number, result)
                self._unregistered = None
            else:
                self._unregistered = round_number
        self._checkpoint(round_number, result)

    async def finish(self, result: RunResult) -> None:
        """Record the final model when the rounds stopped early, after a round the registry skipped
        (``--dp-target-epsilon``); the last round of a full run is an evaluated one, recorded already."""
        if self._registry is not None and self._unregistered is not None:
            await asyncio.to_thread(self._register, self._unregistered, result)
            self._unregistered = None

    def _identity(self) -> dict[str, Any]:
        assert self._reference is not None
        return {
            "model": self._model_name,
            "dataset": self._reference.dataset,
            "dataset_key": self.config.dataset_key,
            "workers": list(self.config.workers),
            "evaluator": list(self.config.evaluator),
            "run_id": self.run_id,
            **({"data_plan": self._plan.to_json()} if self._plan is not None else {}),
            **({"recipe": self._recipe.to_body()} if self._recipe is not None else {}),
        }

    def _register(self, round_number: int, result: RunResult) -> None:
        assert self._registry is not None and self._reference is not None
        metrics: dict[str, float] = {}
        for record in result.evaluations:
            if record.round == round_number and record.model == result.global_model:
                metrics |= scalar_metrics(record.result)  # accuracy, loss and the task's: auc, mae, ...
        for site in result.site_evaluations:
            if site.round == round_number and site.sites:
                metrics |= {f"site_{name}": value for name, value in scalar_metrics(site.average).items()}
        self._registry.record(
            run_id=self.run_id,
            round=round_number,
            model=self._model_name,
            weights=result.weights,
            participants=list(result.rounds[-1].workers) if result.rounds else [],
            strategy=self.strategy.describe(),
            settings={**_settings(self.config), **_data_settings(self._reference, self._plan)},
            metrics=metrics,
        )

    def _checkpoint(self, round_number: int, result: RunResult) -> None:
        directory = self.config.checkpoint_dir
        if directory is None:
            return
        checkpoint = Checkpoint(
            round=round_number,
            weights=result.weights,
            identity=self._identity(),
            seed=self.config.seed,
            config=_settings(self.config),
            strategy_state=self.strategy.describe(),
            server_state=self.strategy.state(),
            metrics_path=str(self.config.metrics_out.resolve()) if self.config.metrics_out is not None else None,
            metrics_size=self._durable_metrics_size(),
        )
        save_checkpoint(directory, checkpoint)

    def _durable_metrics_size(self) -> int | None:
        """Fsync the metrics file, so the size the checkpoint records is on disk too."""
        if self._metrics is None:
            return None
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        return self._metrics.tell()


def _recorded_plan(checkpoint: Checkpoint, plan: DataPlan) -> DataPlan:
    """The plan ``checkpoint`` recorded, statistics included, if the workers' data still agree on it (``plan``).

    Raises:
        CheckpointError: the recorded plan is unreadable, or differs from ``plan`` beyond its statistics.
    """
    try:
        recorded = DataPlan.from_json(checkpoint.identity.get("data_plan"))
        recorded = dataclasses.replace(recorded, label=plan.label)  # a name the console shows: today's
    except ProtocolError as exc:
        raise CheckpointError(f"cannot resume: the checkpoint's data plan is invalid: {exc}") from None
    if recorded.without_statistics() != plan.without_statistics():
        raise CheckpointError(
            "cannot resume: the workers' data no longer agree with the checkpointed run's (classes, features,"
            " categories or input shape changed); use another --checkpoint-dir to start a new run"
        )
    return recorded


def _recorded_recipe(checkpoint: Checkpoint, recipe: Recipe | None) -> Recipe | None:
    """The recipe ``checkpoint`` recorded, with its class weights and target statistics, if the run still
    trains that task (``recipe``, before its statistics).

    Raises:
        CheckpointError: the recorded recipe is unreadable, or the task, loss or model layers changed.
    """
    body = checkpoint.identity.get("recipe")
    try:
        recorded = Recipe.from_body(body) if body is not None else None
    except ProtocolError as exc:
        raise CheckpointError(f"cannot resume: the checkpoint's recipe is invalid: {exc}") from None
    if _without_statistics(recorded) != _without_statistics(recipe):
        was = "the classic task" if recorded is None else f"{recorded.task} with {recorded.loss}"
        now = "the classic task" if recipe is None else f"{recipe.task} with {recipe.loss}"
        raise CheckpointError(
            f"cannot resume: the run trained {was}, now {now} (or its threshold or model layers changed);"
            " use another --checkpoint-dir to start a new run"
        )
    return recorded


def _without_statistics(recipe: Recipe | None) -> Recipe | None:
    """``recipe`` without what is computed from the data before round 1: class weights, target mean and std."""
    if recipe is None:
        return None
    return dataclasses.replace(recipe, class_weights=(), target_mean=0.0, target_std=1.0)


def _check_metrics_file(path: Path, checkpoint: Checkpoint) -> None:
    """Refuse to cut a metrics file that is not the one the checkpoint describes."""
    size = checkpoint.metrics_size or 0
    recorded = checkpoint.metrics_path
    if recorded is not None and recorded != str(path.resolve()):
        raise CheckpointError(
            f"the checkpointed run wrote its metrics to {recorded}, not {path}; resume with --metrics-out {recorded}"
        )
    actual = path.stat().st_size
    with path.open("rb") as handle:
        handle.seek(max(size - 1, 0))
        last = handle.read(1)
    if actual < size or (size and last != b"\n"):
        raise CheckpointError(
            f"metrics file {path} has {actual} bytes and does not end a line at byte {size} as the checkpoint"
            " of its run says; it was changed or lost data since, so resuming would damage it"
        )


def _data_settings(reference: Info, plan: DataPlan | None) -> dict[str, Any]:
    """What a registered version records of the data: the model's input shape, and over own data the plan
    (class names, feature order, vocabularies, statistics), without which the model cannot be used."""
    if plan is None:
        return {"input_shape": list(reference.input_shape)}
    return {"input_shape": list(plan.input_shape), "data_plan": plan.to_json()}


def _settings(config: CoordinatorConfig) -> dict[str, Any]:
    """The run's settings as JSON values, recorded in checkpoints."""
    return {
        name: str(value) if isinstance(value, Path) else value for name, value in dataclasses.asdict(config).items()
    }
