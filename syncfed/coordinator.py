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
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .aggregation import get_aggregator
from .auth import read_token
from .checkpoint import Checkpoint, check_resumable, load_checkpoint, save_checkpoint, save_weights
from .client import WorkerClient
from .config import DEFAULT_PING_TIMEOUT, CoordinatorConfig
from .exceptions import (
    AuthenticationFailed,
    CheckpointError,
    IncompatibleWorkers,
    ModelError,
    ProtocolError,
    QuorumNotMet,
    RemoteError,
    WorkerTimeout,
    WorkerUnavailable,
)
from .models import check_model, default_model, get_weights, resolve_model
from .partition import group_label
from .protocol import PROTOCOL_VERSION, EvalResult, Evaluate, Fit, FitResult, Hello, Info, TrainingPlan
from .tensors import DTYPES, Weights
from .transport import client_tls

__all__ = ["Coordinator", "EvalRecord", "RoundRecord", "RunResult"]

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
    failed: dict[str, str] = field(default_factory=dict)  # worker -> why it did not contribute


@dataclass
class RunResult:
    """What a run produced: the final global weights and its history."""

    model: str
    weights: Weights
    first_round: int = 1  # later than 1 when the run was resumed from a checkpoint
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


@dataclass
class _Backoff:
    """When to try a lost worker again: at once, then after 0.5, 1, 2, 4, ... s, capped.

    Trying is cheap when the worker is down (the connection is refused at
    once) and never holds a round up (see ``Coordinator._rejoin``), so the
    backoff only spares a struggling host a stream of handshakes.
    """

    failures: int = 0
    retry_at: float = 0.0

    def failed(self, now: float, cap: float) -> None:
        self.failures += 1
        self.retry_at = now + (0.0 if self.failures == 1 else min(0.5 * 2.0 ** (self.failures - 2), cap))

    def due(self, now: float) -> bool:
        return now >= self.retry_at


class Coordinator:
    """Runs federated training as configured; see the module docstring."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        report: Callable[[str], None] = print,
        listeners: Sequence[Callable[[Mapping[str, Any]], None]] = (),
    ) -> None:
        """``report`` gets the human-readable lines; ``listeners`` get every metrics event as it happens."""
        self.config = config
        self.report = report
        self.listeners = tuple(listeners)
        self._tls = (
            client_tls(config.tls_ca, config.tls_cert, config.tls_key)
            if config.tls_ca is not None or config.tls_cert is not None
            else None
        )
        self._token = read_token(config.auth_token_file) if config.auth_token_file is not None else None
        self.aggregate = get_aggregator(config.aggregation)
        self._metrics: IO[str] | None = None
        self._clients = {name: self._client(name, uri) for name, uri in {**config.workers, **config.evaluator}.items()}
        self._backoff = {name: _Backoff() for name in self._clients}
        self._reference: Info | None = None
        self._model_name = ""
        self._resumed: Checkpoint | None = None
        self._joining: dict[str, asyncio.Task[None]] = {}
        # How long a round start waits for reconnecting workers: a live one
        # answers at once, a frozen one must not stall the round.
        self._join_grace = min(config.connect_timeout, config.ping_timeout or DEFAULT_PING_TIMEOUT)

    async def run(self) -> RunResult:
        """Connect, check the workers, train for the configured rounds, save.

        Raises:
            WorkerUnavailable: fewer workers than the quorum, or no evaluator, at the start.
            IncompatibleWorkers: workers disagree with each other or with the model.
            QuorumNotMet: a round could not gather the quorum within its retries.
            CheckpointError: the checkpoint cannot be resumed.
        """
        config = self.config
        trainers = [self._clients[name] for name in config.workers]
        evaluator = self._clients[next(iter(config.evaluator))] if config.evaluator else None
        try:
            infos = await self._start(trainers, evaluator)
            result, start = self._initial_state(infos)
            groups = {name: _held_classes(info) for name, info in infos.items() if name in config.workers}
            self._open_metrics(result)
            for round_number in range(start, config.training_rounds + 1):
                updates = await self._train_round(round_number, result, trainers)
                if evaluator is not None and config.is_eval_round(round_number):
                    await self._evaluate_round(round_number, result, updates, evaluator, groups)
                self._checkpoint(round_number, result)
        finally:
            for task in list(self._joining.values()):
                task.cancel()
            await asyncio.gather(*self._joining.values(), return_exceptions=True)
            await asyncio.gather(*(client.close() for client in self._clients.values()))
            if self._metrics is not None:
                self._metrics.close()
        if config.save_model is not None:
            save_weights(config.save_model, result.weights, {"format": "pt", "model": result.model})
            self.report(f"Saved the federated model to {config.save_model}")
        return result

    def _client(self, name: str, uri: str) -> WorkerClient:
        return WorkerClient(
            name,
            uri,
            max_message_size=self.config.max_message_size,
            connect_timeout=self.config.connect_timeout,
            request_timeout=self.config.request_timeout,
            ping_interval=self.config.ping_interval,
            ping_timeout=self.config.ping_timeout,
            tls=self._tls,
            auth_token=self._token,
        )

    # Joining

    async def _start(self, trainers: Sequence[WorkerClient], evaluator: WorkerClient | None) -> dict[str, Info]:
        """Greet every worker at once; go on with a quorum of trainers and the evaluator."""
        clients = [*trainers, *([evaluator] if evaluator else [])]
        outcomes = await asyncio.gather(*(self._greet(client) for client in clients), return_exceptions=True)
        infos: dict[str, Info] = {}
        unreachable: list[WorkerUnavailable] = []
        for client, outcome in zip(clients, outcomes, strict=True):
            if isinstance(outcome, Info):
                infos[client.name] = outcome
            elif isinstance(outcome, WorkerUnavailable) and client is not evaluator:
                unreachable.append(outcome)
                self._backoff[client.name].failed(time.monotonic(), self.config.reconnect_max_delay)
            elif isinstance(outcome, BaseException):
                raise outcome
        reachable = len(trainers) - len(unreachable)
        if reachable < self.config.quorum:
            raise (
                unreachable[0]
                if len(unreachable) == 1
                else WorkerUnavailable(
                    ", ".join(error.worker for error in unreachable),
                    f"{reachable} of {len(trainers)} training workers reachable, quorum is {self.config.quorum} ("
                    + "; ".join(f"{error.worker}: {error.reason}" for error in unreachable)
                    + ")",
                )
            )
        for error in unreachable:
            self.report(f"Worker {error.worker} is unreachable ({error.reason}); it will be retried each round")
        self._model_name = self._check_compatible(infos)
        return infos

    async def _greet(self, client: WorkerClient) -> Info:
        await client.connect()
        try:
            info = await client.request(Hello(), timeout=self.config.connect_timeout)
        except BaseException:
            await client.close()
            raise
        assert isinstance(info, Info)
        logger.info(
            "%s holds %d examples of %s (classes %s)",
            client.name,
            info.num_examples,
            info.dataset,
            group_label(_held_classes(info)),
        )
        return info

    def _check_compatible(self, infos: Mapping[str, Info]) -> str:
        """Stop before round 1 when workers disagree with each other or with the model; return the model name."""
        for name, info in infos.items():
            self._check_identity(name, info)
        reference_name, reference = next(iter(infos.items()))
        for name, info in infos.items():
            self._check_data(name, info, reference_name, reference)
        model_name = self.config.model or default_model(reference.dataset)
        for name, info in infos.items():
            self._check_model_available(name, info, model_name)
        try:
            model = resolve_model(model_name)()
            check_model(model, reference.input_shape, reference.num_classes)
            for name, array in get_weights(model).items():
                if array.dtype.name not in DTYPES:
                    raise ModelError(f"tensor {name} has dtype {array.dtype}, which the wire does not carry")
        except ModelError as exc:
            raise IncompatibleWorkers(
                f"model {model_name} does not fit the workers' {reference.dataset} data: {exc}"
            ) from None
        self._reference = reference
        return model_name

    def _check_identity(self, name: str, info: Info) -> None:
        role = "trainer" if name in self.config.workers else "evaluator"
        if info.worker_id != name:
            raise IncompatibleWorkers(f"the worker listed as {name} says it is {info.worker_id}")
        if info.protocol_version != PROTOCOL_VERSION:
            raise IncompatibleWorkers(
                f"{name} speaks protocol version {info.protocol_version}, this coordinator {PROTOCOL_VERSION}"
            )
        if info.role != role:
            hint = "started with --testing" if info.role == "evaluator" else "started without --testing"
            article = "an" if info.role == "evaluator" else "a"
            raise IncompatibleWorkers(f"{name} is {article} {info.role} ({hint}) but is listed as the {role}")
        if role == "trainer" and info.num_examples == 0:
            raise IncompatibleWorkers(f"{name} holds no training examples")

    @staticmethod
    def _check_data(name: str, info: Info, reference_name: str, reference: Info) -> None:
        for what in ("dataset", "input_shape", "num_classes"):
            if getattr(info, what) != getattr(reference, what):
                raise IncompatibleWorkers(
                    f"{name} has {what} {getattr(info, what)}, but {reference_name} has {getattr(reference, what)}"
                )

    @staticmethod
    def _check_model_available(name: str, info: Info, model_name: str) -> None:
        if model_name not in info.models:
            raise IncompatibleWorkers(
                f"{name} cannot build model {model_name} (it has {', '.join(info.models)});"
                f" start it with --model {model_name}"
            )

    async def _rejoin(self, clients: Sequence[WorkerClient]) -> None:
        """Start reconnecting the lost workers whose backoff has elapsed, and give them a moment.

        A live worker greets back within milliseconds and takes part in the
        coming round; a frozen one cannot hold the round up for longer than
        the grace period, and joins a later round if it ever answers.
        """
        now = time.monotonic()
        for client in clients:
            if not client.connected and client.name not in self._joining and self._backoff[client.name].due(now):
                self._joining[client.name] = asyncio.create_task(self._try_rejoin(client))
        pending = [self._joining[client.name] for client in clients if client.name in self._joining]
        if pending:
            await asyncio.wait(pending, timeout=self._join_grace)

    async def _try_rejoin(self, client: WorkerClient) -> None:
        """Reconnect and greet ``client``, checking it like at the start; back off on failure."""
        assert self._reference is not None
        try:
            info = await self._greet(client)
            self._check_identity(client.name, info)
            self._check_data(client.name, info, "the others", self._reference)
            self._check_model_available(client.name, info, self._model_name)
        except (WorkerUnavailable, IncompatibleWorkers, RemoteError, ProtocolError, AuthenticationFailed) as exc:
            await client.close()
            self._backoff[client.name].failed(time.monotonic(), self.config.reconnect_max_delay)
            logger.info("%s: still unavailable (%s)", client.name, exc)
            return
        finally:
            self._joining.pop(client.name, None)
        self._backoff[client.name].failures = 0
        self.report(f"Worker {client.name} rejoined")

    # State

    def _identity(self) -> dict[str, Any]:
        assert self._reference is not None
        return {
            "model": self._model_name,
            "dataset": self._reference.dataset,
            "workers": list(self.config.workers),
            "evaluator": list(self.config.evaluator),
        }

    def _initial_state(self, infos: Mapping[str, Info]) -> tuple[RunResult, int]:
        """Fresh weights from the seed, or the checkpoint's with ``--resume``; the first round to run."""
        config = self.config
        checkpoint = load_checkpoint(config.checkpoint_dir) if config.checkpoint_dir is not None else None
        if checkpoint is not None and not config.resume:
            raise CheckpointError(
                f"{config.checkpoint_dir} holds a checkpoint of round {checkpoint.round};"
                " pass --resume to continue it, or choose another --checkpoint-dir"
            )
        if checkpoint is None:
            if config.resume:
                self.report(f"No checkpoint in {config.checkpoint_dir}: starting at round 1")
            torch.manual_seed(config.seed)
            return RunResult(self._model_name, get_weights(resolve_model(self._model_name)())), 1
        check_resumable(checkpoint, self._identity())
        self._resumed = checkpoint
        self.report(f"Resuming after round {checkpoint.round} from {config.checkpoint_dir}")
        return RunResult(self._model_name, checkpoint.weights, first_round=checkpoint.round + 1), checkpoint.round + 1

    def _open_metrics(self, result: RunResult) -> None:
        """Open the metrics file: new for a new run; cut back to the checkpoint's length and appended to on resume."""
        path = self.config.metrics_out
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if result.first_round == 1 or not path.exists():
            self._metrics = path.open("w", encoding="utf-8")
            return
        if self._resumed is not None and self._resumed.metrics_size is not None:
            self._check_metrics_file(path, self._resumed)
        self._metrics = path.open("r+", encoding="utf-8")
        if self._resumed is not None and self._resumed.metrics_size is not None:
            # Lines written after the checkpoint belong to the round in progress at the crash: drop them.
            self._metrics.truncate(self._resumed.metrics_size)
        self._metrics.seek(0, os.SEEK_END)

    @staticmethod
    def _check_metrics_file(path: Path, checkpoint: Checkpoint) -> None:
        """Refuse to cut a metrics file that is not the one the checkpoint describes."""
        size = checkpoint.metrics_size or 0
        recorded = checkpoint.metrics_path
        if recorded is not None and recorded != str(path.resolve()):
            raise CheckpointError(
                f"the checkpointed run wrote its metrics to {recorded}, not {path};"
                f" resume with --metrics-out {recorded}"
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

    # Rounds

    async def _train_round(
        self, round_number: int, result: RunResult, trainers: Sequence[WorkerClient]
    ) -> dict[str, FitResult]:
        """One round: retried while fewer than the quorum contribute, up to ``max_round_retries`` times."""
        config = self.config
        started = time.perf_counter()
        sent, received = _traffic(trainers)
        lr = config.learning_rate(round_number)
        attempts = config.max_round_retries + 1
        for attempt in range(1, attempts + 1):
            await self._rejoin(trainers)
            updates, failures = await self._collect_updates(round_number, result, trainers, lr)
            if len(updates) >= config.quorum:
                break
            summary = "; ".join(f"{name}: {reason}" for name, reason in failures.items())
            self._write({"event": "round_retry", "round": round_number, "attempt": attempt, "failed": failures})
            if attempt == attempts:
                raise QuorumNotMet(
                    f"round {round_number}: {len(updates)} of {len(trainers)} workers contributed, quorum is"
                    f" {config.quorum}, after {attempts} attempts ({summary})"
                )
            self.report(
                f"Round {round_number}: {len(updates)} of {len(trainers)} workers contributed, quorum is"
                f" {config.quorum} ({summary}); retrying ({attempt}/{config.max_round_retries})"
            )
            await self._wait_for_retry(trainers)
        result.weights = self.aggregate([(update.weights, update.num_examples) for update in updates.values()])
        record = RoundRecord(
            round_number,
            tuple(updates),
            time.perf_counter() - started,
            lr,
            {name: update.loss for name, update in updates.items()},
            failures,
        )
        result.rounds.append(record)
        if failures:
            dropped = "; ".join(f"{name} ({reason})" for name, reason in failures.items())
            self.report(
                f"Round {round_number}: aggregated {len(updates)} of {len(trainers)} workers; dropped {dropped}"
            )
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
                "failed": failures,
                "seconds": round(record.seconds, 4),
                "lr": lr,
                "train_loss": record.train_loss,
                "num_examples": {name: update.num_examples for name, update in updates.items()},
                "bytes_sent": _traffic(trainers)[0] - sent,
                "bytes_received": _traffic(trainers)[1] - received,
            }
        )
        return updates

    async def _collect_updates(
        self, round_number: int, result: RunResult, trainers: Sequence[WorkerClient], lr: float
    ) -> tuple[dict[str, FitResult], dict[str, str]]:
        """Send the round's plans to the connected workers at once; sort replies into updates and failures."""
        config = self.config
        # A worker still being greeted is connected but unchecked: it joins the next round.
        ready = {client.name for client in trainers if client.connected and client.name not in self._joining}
        failures = {
            client.name: f"not connected ({client.closed_reason})" for client in trainers if client.name not in ready
        }
        active = [(index, client) for index, client in enumerate(trainers) if client.name in ready]
        requests = [
            client.request(
                Fit(
                    self._model_name,
                    result.weights,
                    TrainingPlan(
                        round=round_number,
                        batch_size=config.batch_size,
                        num_batches=config.federate_after_n_batches,
                        lr=lr,
                        seed=plan_seed(config.seed, round_number, index),
                    ),
                ),
                timeout=config.round_timeout,
            )
            for index, client in active
        ]
        replies = await asyncio.gather(*requests, return_exceptions=True)
        updates: dict[str, FitResult] = {}
        now = time.monotonic()
        for (_, client), reply in zip(active, replies, strict=True):
            if isinstance(reply, FitResult):
                mismatch = _mismatch(reply.weights, result.weights)
                if mismatch is None:
                    updates[client.name] = reply
                else:
                    failures[client.name] = f"invalid update: {mismatch}"
                continue
            if isinstance(reply, WorkerTimeout):
                failures[client.name] = f"timeout: {reply.reason}"
                # Closing makes the worker abandon the late work; it rejoins next round.
                await client.close(f"dropped after {reply.reason}")
                continue
            if isinstance(reply, WorkerUnavailable):
                failures[client.name] = reply.reason
                self._backoff[client.name].failed(now, config.reconnect_max_delay)
            elif isinstance(reply, RemoteError):
                failures[client.name] = f"error reply: {reply.code}: {reply.reason}"
            elif isinstance(reply, ProtocolError):
                failures[client.name] = f"invalid reply: {reply}"
                await client.close(f"sent an invalid reply: {reply}")
            elif isinstance(reply, BaseException):
                raise reply
        return updates, failures

    async def _wait_for_retry(self, trainers: Sequence[WorkerClient]) -> None:
        """Before retrying a round, wait until the next lost worker is due to be tried (bounded by the cap).

        With every worker connected (the round failed on error replies) there is nothing to wait for.
        """
        now = time.monotonic()
        waits = [self._backoff[client.name].retry_at - now for client in trainers if not client.connected]
        delay = min([self.config.reconnect_max_delay, *waits]) if waits else 0.0
        if delay > 0:
            await asyncio.sleep(delay)

    async def _evaluate_round(
        self,
        round_number: int,
        result: RunResult,
        updates: Mapping[str, FitResult],
        evaluator: WorkerClient,
        groups: Mapping[str, Sequence[int]],
    ) -> None:
        """Score each contributing worker's model and the federated one; a lost evaluator skips this evaluation."""
        candidates = {name: update.weights for name, update in updates.items()} | {FEDERATED: result.weights}
        batch = self.config.test_batch_size
        await self._rejoin([evaluator])
        try:
            replies = await asyncio.gather(
                *(evaluator.request(Evaluate(self._model_name, weights, batch)) for weights in candidates.values())
            )
        except (WorkerUnavailable, RemoteError, ProtocolError) as exc:
            if isinstance(exc, WorkerUnavailable):
                self._backoff[evaluator.name].failed(time.monotonic(), self.config.reconnect_max_delay)
            await evaluator.close()
            self.report(f"Evaluation at round {round_number} skipped: {exc}")
            self._write({"event": "eval_skipped", "round": round_number, "reason": str(exc)})
            return
        assert self._reference is not None
        scores = [reply for reply in replies if isinstance(reply, EvalResult)]
        if any(len(score.predictions) != self._reference.num_classes for score in scores):
            reason = f"the evaluator's predictions do not have {self._reference.num_classes} classes"
            self.report(f"Evaluation at round {round_number} skipped: {reason}")
            self._write({"event": "eval_skipped", "round": round_number, "reason": reason})
            return
        self.report(f"Evaluation at round {round_number}/{self.config.training_rounds}:")
        for name, reply in zip(candidates, scores, strict=True):
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
        for listener in self.listeners:
            listener(event)


def _settings(config: CoordinatorConfig) -> dict[str, Any]:
    """The run's settings as JSON values, recorded in checkpoints."""
    return {
        name: str(value) if isinstance(value, Path) else value for name, value in dataclasses.asdict(config).items()
    }


def _mismatch(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """How a worker's weights differ from the global model's names, shapes and dtypes, if they do."""
    if update.keys() != reference.keys():
        return f"tensors {sorted(set(update) ^ set(reference))[:5]} do not match the model's"
    for name, array in reference.items():
        if update[name].shape != array.shape or update[name].dtype != array.dtype:
            got, expected = f"{update[name].dtype}{list(update[name].shape)}", f"{array.dtype}{list(array.shape)}"
            return f"tensor {name} is {got}, the model's is {expected}"
    return None


def _traffic(clients: Sequence[WorkerClient]) -> tuple[int, int]:
    """Message bytes sent to and received from ``clients`` so far."""
    return sum(client.bytes_sent for client in clients), sum(client.bytes_received for client in clients)


def _held_classes(info: Info) -> list[int]:
    return [label for label, count in enumerate(info.histogram) if count > 0]
