"""The coordinator: sends the global model out, aggregates what comes back.

Usage::

    result = asyncio.run(Coordinator(CoordinatorConfig(training_rounds=5)).run())

Each round: send the model and a training plan to every training worker at
once → await their updates with a deadline → aggregate → (on evaluation
rounds) have the evaluator score each worker's model and the federated
one → record metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .aggregation import get_aggregator
from .client import WorkerClient
from .config import CoordinatorConfig
from .exceptions import IncompatibleWorkers, ModelError
from .models import check_model, default_model, get_weights, resolve_model
from .partition import group_label
from .protocol import PROTOCOL_VERSION, EvalResult, Evaluate, Fit, FitResult, Hello, Info, TrainingPlan
from .tensors import Weights

__all__ = ["Coordinator", "EvalRecord", "RoundRecord", "RunResult", "save_model"]

logger = logging.getLogger("syncfed.coordinator")

FEDERATED = "federated"


@dataclass(frozen=True)
class EvalRecord:
    """The evaluator's verdict on one model at one round."""

    round: int
    model: str  # "federated" or a worker id
    result: EvalResult


@dataclass(frozen=True)
class RoundRecord:
    round: int
    workers: tuple[str, ...]
    seconds: float
    lr: float
    train_loss: dict[str, float]


@dataclass
class RunResult:
    """What a run produced: the final global weights and its history."""

    model: str
    weights: Weights
    rounds: list[RoundRecord] = field(default_factory=list)
    evaluations: list[EvalRecord] = field(default_factory=list)

    def accuracy(self, round_number: int, model: str = FEDERATED) -> float:
        for record in self.evaluations:
            if record.round == round_number and record.model == model:
                return record.result.accuracy
        raise KeyError(f"no evaluation of {model} at round {round_number}")


def plan_seed(seed: int, round_number: int, worker_index: int) -> int:
    """An independent, reproducible seed per run, round and worker."""
    state = np.random.SeedSequence([seed, round_number, worker_index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def save_model(path: Path, weights: Weights, metadata: Mapping[str, str]) -> None:
    """Write ``weights`` as safetensors, atomically (never pickle)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    save_file(
        {name: np.ascontiguousarray(array) for name, array in weights.items()}, str(partial), metadata=dict(metadata)
    )
    os.replace(partial, path)


class Coordinator:
    """Runs federated training as configured; see the module docstring."""

    def __init__(self, config: CoordinatorConfig, *, report: Callable[[str], None] = print) -> None:
        self.config = config
        self.report = report
        self.aggregate = get_aggregator(config.aggregation)
        self._metrics: IO[str] | None = None

    async def run(self) -> RunResult:
        """Connect, check the workers, train for the configured rounds, save.

        Raises:
            WorkerUnavailable, RemoteError, IncompatibleWorkers: the run cannot go on.
        """
        config = self.config
        async with AsyncExitStack() as stack:
            trainers = [self._client(name, uri) for name, uri in config.workers.items()]
            evaluators = [self._client(name, uri) for name, uri in config.evaluator.items()]
            await self._connect([*trainers, *evaluators], stack)
            infos = await self._handshake([*trainers, *evaluators])
            model_name = self._check_compatible(infos, trainers, evaluators)
            if config.metrics_out is not None:
                config.metrics_out.parent.mkdir(parents=True, exist_ok=True)
                self._metrics = stack.enter_context(config.metrics_out.open("w", encoding="utf-8"))
            torch.manual_seed(config.seed)
            weights = get_weights(resolve_model(model_name)())
            result = RunResult(model_name, weights)
            groups = {client.name: _held_classes(infos[client.name]) for client in trainers}
            evaluator = evaluators[0] if evaluators else None
            for round_number in range(1, config.training_rounds + 1):
                updates = await self._train_round(round_number, model_name, result, trainers)
                if evaluator is not None and config.is_eval_round(round_number):
                    await self._evaluate_round(round_number, model_name, result, updates, evaluator, groups)
        if config.save_model is not None:
            save_model(config.save_model, result.weights, {"format": "pt", "model": model_name})
            self.report(f"Saved the federated model to {config.save_model}")
        return result

    def _client(self, name: str, uri: str) -> WorkerClient:
        return WorkerClient(
            name,
            uri,
            max_message_size=self.config.max_message_size,
            connect_timeout=self.config.connect_timeout,
            request_timeout=self.config.request_timeout,
        )

    @staticmethod
    async def _connect(clients: Sequence[WorkerClient], stack: AsyncExitStack) -> None:
        """Connect to all at once; close the ones that connected if any did not."""
        outcomes = await asyncio.gather(*(client.connect() for client in clients), return_exceptions=True)
        for client, outcome in zip(clients, outcomes, strict=True):
            if outcome is None:
                stack.push_async_callback(client.close)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _handshake(self, clients: Sequence[WorkerClient]) -> dict[str, Info]:
        replies = await asyncio.gather(
            *(client.request(Hello(), timeout=self.config.connect_timeout) for client in clients)
        )
        infos: dict[str, Info] = {}
        for client, info in zip(clients, replies, strict=True):
            assert isinstance(info, Info)
            infos[client.name] = info
            logger.info(
                "%s holds %d examples of %s (classes %s)",
                client.name,
                info.num_examples,
                info.dataset,
                group_label(_held_classes(info)),
            )
        return infos

    def _check_compatible(
        self, infos: Mapping[str, Info], trainers: Sequence[WorkerClient], evaluators: Sequence[WorkerClient]
    ) -> str:
        """Stop before round 1 when workers disagree with each other or with the model; return the model name."""
        roles = {client.name: "trainer" for client in trainers} | {client.name: "evaluator" for client in evaluators}
        for name, info in infos.items():
            if info.worker_id != name:
                raise IncompatibleWorkers(f"the worker listed as {name} says it is {info.worker_id}")
            if info.protocol_version != PROTOCOL_VERSION:
                raise IncompatibleWorkers(
                    f"{name} speaks protocol version {info.protocol_version}, this coordinator {PROTOCOL_VERSION}"
                )
            if info.role != roles[name]:
                hint = "started with --testing" if info.role == "evaluator" else "started without --testing"
                article = "an" if info.role == "evaluator" else "a"
                raise IncompatibleWorkers(
                    f"{name} is {article} {info.role} ({hint}) but is listed as the {roles[name]}"
                )
            if roles[name] == "trainer" and info.num_examples == 0:
                raise IncompatibleWorkers(f"{name} holds no training examples")
        reference_name, reference = next(iter(infos.items()))
        for name, info in infos.items():
            for what in ("dataset", "input_shape", "num_classes"):
                if getattr(info, what) != getattr(reference, what):
                    raise IncompatibleWorkers(
                        f"{name} has {what} {getattr(info, what)}, but {reference_name} has {getattr(reference, what)}"
                    )
        model_name = self.config.model or default_model(reference.dataset)
        for name, info in infos.items():
            if model_name not in info.models:
                raise IncompatibleWorkers(
                    f"{name} cannot build model {model_name} (it has {', '.join(info.models)});"
                    f" start it with --model {model_name}"
                )
        try:
            check_model(resolve_model(model_name)(), reference.input_shape, reference.num_classes)
        except ModelError as exc:
            raise IncompatibleWorkers(
                f"model {model_name} does not fit the workers' {reference.dataset} data: {exc}"
            ) from None
        return model_name

    async def _train_round(
        self, round_number: int, model_name: str, result: RunResult, trainers: Sequence[WorkerClient]
    ) -> dict[str, FitResult]:
        config = self.config
        started = time.perf_counter()
        lr = config.learning_rate(round_number)
        requests = [
            Fit(
                model_name,
                result.weights,
                TrainingPlan(
                    round=round_number,
                    batch_size=config.batch_size,
                    num_batches=config.federate_after_n_batches,
                    lr=lr,
                    seed=plan_seed(config.seed, round_number, index),
                ),
            )
            for index, _ in enumerate(trainers)
        ]
        replies = await asyncio.gather(
            *(client.request(request) for client, request in zip(trainers, requests, strict=True))
        )
        updates: dict[str, FitResult] = {}
        for client, reply in zip(trainers, replies, strict=True):
            assert isinstance(reply, FitResult)
            updates[client.name] = reply
        result.weights = self.aggregate([(update.weights, update.num_examples) for update in updates.values()])
        record = RoundRecord(
            round_number,
            tuple(updates),
            time.perf_counter() - started,
            lr,
            {name: update.loss for name, update in updates.items()},
        )
        result.rounds.append(record)
        losses = ", ".join(f"{name} {loss:.4f}" for name, loss in record.train_loss.items())
        logger.info(
            "round %d/%d: %.2f s, lr %.4f, training loss %s",
            round_number,
            config.training_rounds,
            record.seconds,
            lr,
            losses,
        )
        self._write(
            {
                "event": "round",
                "round": round_number,
                "workers": list(record.workers),
                "seconds": round(record.seconds, 4),
                "lr": lr,
                "train_loss": record.train_loss,
                "num_examples": {name: update.num_examples for name, update in updates.items()},
            }
        )
        return updates

    async def _evaluate_round(
        self,
        round_number: int,
        model_name: str,
        result: RunResult,
        updates: Mapping[str, FitResult],
        evaluator: WorkerClient,
        groups: Mapping[str, Sequence[int]],
    ) -> None:
        candidates = {name: update.weights for name, update in updates.items()} | {FEDERATED: result.weights}
        batch = self.config.test_batch_size
        replies = await asyncio.gather(
            *(evaluator.request(Evaluate(model_name, weights, batch)) for weights in candidates.values())
        )
        self.report(f"Evaluation at round {round_number}/{self.config.training_rounds}:")
        for name, reply in zip(candidates, replies, strict=True):
            assert isinstance(reply, EvalResult)
            result.evaluations.append(EvalRecord(round_number, name, reply))
            label = "Federated model" if name == FEDERATED else f"Model update {name}"
            shares = ", ".join(
                f"{group_label(classes)}: {sum(reply.predictions[c] for c in classes) / reply.num_examples:.0%}"
                for classes in groups.values()
            )
            self.report(f"{label}: Percentage numbers {shares}")
            self.report(
                f"{label}: Average loss: {reply.loss:.4f}, "
                f"Accuracy: {reply.correct}/{reply.num_examples} ({reply.accuracy:.2%})"
            )
            self._write(
                {
                    "event": "eval",
                    "round": round_number,
                    "model": name,
                    "accuracy": reply.accuracy,
                    "loss": reply.loss,
                    "n": reply.num_examples,
                    "correct": reply.correct,
                    "predictions": list(reply.predictions),
                }
            )

    def _write(self, event: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(event) + "\n")
            self._metrics.flush()


def _held_classes(info: Info) -> list[int]:
    return [label for label, count in enumerate(info.histogram) if count > 0]
