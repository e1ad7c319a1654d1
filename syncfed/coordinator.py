"""The coordinator: sends the global model out, aggregates what comes back.

Usage::

    result = asyncio.run(Coordinator(CoordinatorConfig(training_rounds=5)).run())

Each synchronous round: select the round's workers (all, or a seeded
sample) → send the model and a training plan to them at once → fold each
update into the strategy's running sums as it arrives, under a deadline →
aggregate → (on evaluation rounds) have the evaluator score each worker's
model and the federated one → record metrics → checkpoint.

In ``--mode async`` (FedBuff, Nguyen et al. 2022) every worker trains in a
loop of its own: each time one returns an update it gets the newest global
model at once, and the coordinator applies the updates in buffers of
``buffer_size``, discounted by their staleness; each applied buffer is a new
global version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch

from .aggregation import RunningMean
from .auth import read_token
from .checkpoint import Checkpoint, check_resumable, check_weights, load_checkpoint, save_checkpoint, save_weights
from .client import WorkerClient
from .config import DEFAULT_PING_TIMEOUT, CoordinatorConfig
from .disclosure import held_classes, holdings, losses_text, round_figures
from .evaluation import TEST, VALIDATION, Cell, CrossSiteMatrix, pool, result_json, write_cross_site
from .exceptions import (
    AggregationError,
    AuthenticationFailed,
    CheckpointError,
    ConfigError,
    IncompatibleWorkers,
    ModelError,
    ProtocolError,
    QuorumNotMet,
    RemoteError,
    WorkerTimeout,
    WorkerUnavailable,
)
from .finite import nonfinite
from .models import check_model, default_model, get_weights, resolve_model
from .partition import group_label
from .protocol import (
    PROTOCOL_VERSION,
    EvalResult,
    Evaluate,
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    Hello,
    Info,
    TrainingPlan,
)
from .registry import ModelRegistry
from .secure_round import PrivateFold, PrivateRounds
from .staleness import UpdateBuffer
from .strategies import MeanStrategy, Strategy, make_strategy
from .tensors import DTYPES, Weights
from .transport import client_tls

__all__ = ["Coordinator", "EvalRecord", "RoundRecord", "RunResult", "SiteEvalRecord"]

logger = logging.getLogger("syncfed.coordinator")

_T = TypeVar("_T")

FEDERATED = "federated"
#: Keeps client sampling's random stream apart from the training seeds derived from the same seed.
_SAMPLING_STREAM = 0x53414D50
#: Cross-site evaluation requests in flight per site: a worker computes one at a time, and a second
#: one queued keeps it busy without nearing its limit of requests in flight.
_PIPELINE = 2


@dataclass(frozen=True)
class EvalRecord:
    """The evaluator's verdict on one model at one round."""

    round: int
    model: str  # "federated" or a worker id
    result: EvalResult


def _itself(reply: FitResult) -> FitResult:
    """Take a reply as it is (asynchronous mode buffers updates rather than folding them as they come)."""
    return reply


@dataclass(frozen=True)
class RoundRecord:
    round: int
    workers: tuple[str, ...]
    seconds: float
    lr: float
    train_loss: dict[str, float]
    failed: dict[str, str] = field(default_factory=dict)  # worker -> why it did not contribute


@dataclass(frozen=True)
class SiteEvalRecord:
    """Federated evaluation at one round: the global model scored by each training worker on its validation split."""

    round: int
    sites: dict[str, EvalResult]
    failed: dict[str, str] = field(default_factory=dict)  # worker -> why it has no score

    @property
    def average(self) -> EvalResult:
        """The example-weighted average over the sites that answered (AggregationError when none did)."""
        return pool(self.sites.values())


@dataclass
class RunResult:
    """What a run produced: the final global weights and its history."""

    model: str
    weights: Weights
    first_round: int = 1  # later than 1 when the run was resumed from a checkpoint
    rounds: list[RoundRecord] = field(default_factory=list)
    evaluations: list[EvalRecord] = field(default_factory=list)
    site_evaluations: list[SiteEvalRecord] = field(default_factory=list)  # with --federated-eval
    cross_site: CrossSiteMatrix | None = None  # with --cross-site-validation

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
        self.strategy: Strategy = make_strategy(config.strategy, **config.strategy_settings)
        self._metrics: IO[str] | None = None
        self._clients = {name: self._client(name, uri) for name, uri in {**config.workers, **config.evaluator}.items()}
        self._backoff = {name: _Backoff() for name in self._clients}
        self._reference: Info | None = None
        self._model_name = ""
        self._resumed: Checkpoint | None = None
        self._joining: dict[str, asyncio.Task[None]] = {}
        # Each trainer's latest update (its local model), kept for cross-site validation only.
        self._local_models: dict[str, Weights] = {}
        #: Names this run in the model registry: the start time and a random suffix, kept across --resume.
        self._run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        self._registry = ModelRegistry(config.registry) if config.registry is not None else None
        # How long a round start waits for reconnecting workers: a live one
        # answers at once, a frozen one must not stall the round.
        self._join_grace = min(config.connect_timeout, config.ping_timeout or DEFAULT_PING_TIMEOUT)
        # Secure aggregation and differential privacy (syncfed.secure_round); it needs each worker's example count.
        self._private = PrivateRounds(config, self.strategy, report=report) if config.private else None
        self._num_examples: dict[str, int] = {}
        # Flow control: updates received at once, so the peak holds a few updates however many workers finish.
        self._slots = asyncio.Semaphore(config.receive_slots) if config.receive_slots else None

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
            # Each trainer's classes, for the shares of predictions per group; private under --secure-agg.
            groups = {
                name: held_classes(info)
                for name, info in infos.items()
                if name in config.workers and not config.secure_agg and info.histogram is not None
            }
            self._open_metrics(result)
            run_mode = self._run_async if config.mode == "async" else self._run_sync
            await run_mode(start, result, trainers, evaluator, groups)
            if config.cross_site_validation:
                await self._cross_site_validation(result, trainers, evaluator)
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
            chunk_size=self.config.chunk_size,
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
        refused: list[RemoteError | ProtocolError] = []  # answered hello with an error, or with an invalid info
        for client, outcome in zip(clients, outcomes, strict=True):
            if isinstance(outcome, Info):
                infos[client.name] = outcome
            elif isinstance(outcome, (WorkerUnavailable, RemoteError, ProtocolError)) and client is not evaluator:
                # One faulty peer is one unavailable worker: the quorum decides whether the run can go on.
                if isinstance(outcome, WorkerUnavailable):
                    unreachable.append(outcome)
                else:
                    refused.append(outcome)
                    unreachable.append(WorkerUnavailable(client.name, f"bad reply to hello: {outcome}"))
                self._backoff[client.name].failed(time.monotonic(), self.config.reconnect_max_delay)
            elif isinstance(outcome, BaseException):
                raise outcome
        reachable = len(trainers) - len(unreachable)
        if reachable < self.config.quorum and refused:
            raise refused[0]  # as before: a worker's own answer says more than "unavailable"
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
        info = self._chosen_data(client.name, info)
        self._num_examples[client.name] = info.num_examples
        logger.info("%s holds %s", client.name, holdings(info, secure=self.config.secure_agg))
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

    def _chosen_data(self, name: str, info: Info) -> Info:
        """``info`` as it describes the data the run uses: the ``--dataset-key`` data set, or the worker's default.

        Raises:
            IncompatibleWorkers: the worker lacks that data set, or a trainer holds no validation
                split when federated evaluation or cross-site validation needs one.
        """
        config = self.config
        key = config.dataset_key
        if key is not None:
            entry = next((entry for entry in info.datasets if entry.key == key), None)
            if entry is None:
                held = ", ".join(entry.key for entry in info.datasets) or "none"
                raise IncompatibleWorkers(
                    f"{name} has no data set {key} (its data sets: {held}); start it with --dataset-spec {key}=..."
                )
            info = dataclasses.replace(
                info,
                dataset=entry.dataset,
                input_shape=entry.input_shape,
                num_classes=entry.num_classes,
                histogram=entry.histogram,
                max_examples=entry.max_examples,
                validation_size=entry.validation_size,
            )
        needs = "--federated-eval" if config.federated_eval else "--cross-site-validation"
        if (
            name in config.workers
            and info.validation_size == 0
            and (config.federated_eval or config.cross_site_validation)
        ):
            raise IncompatibleWorkers(
                f"{name} holds no validation split, which {needs} needs; start it with --val-fraction above 0"
            )
        return info

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
            "dataset_key": self.config.dataset_key,
            "workers": list(self.config.workers),
            "evaluator": list(self.config.evaluator),
            "run_id": self._run_id,
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
        self._run_id = str(checkpoint.identity.get("run_id", self._run_id))  # a resumed run keeps its id
        check_resumable(checkpoint, self._identity())
        check_weights(checkpoint, get_weights(resolve_model(self._model_name)()))
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

    async def _version_done(self, round_number: int, result: RunResult) -> None:
        """Record a finished round (or asynchronous version): in the model registry, then in the checkpoint."""
        if self._registry is not None:
            await asyncio.to_thread(self._register, round_number, result)
        self._checkpoint(round_number, result)

    def _register(self, round_number: int, result: RunResult) -> None:
        assert self._registry is not None and self._reference is not None
        reason = nonfinite(result.weights)
        if reason is not None:  # the registry's own module stays unaware of this rule
            raise AggregationError(f"refusing to register a non-finite model: {reason}")
        metrics: dict[str, float] = {}
        for record in result.evaluations:
            if record.round == round_number and record.model == FEDERATED:
                metrics |= {"accuracy": record.result.accuracy, "loss": record.result.loss}
        for site in result.site_evaluations:
            if site.round == round_number and site.sites:
                average = site.average
                metrics |= {"site_accuracy": average.accuracy, "site_loss": average.loss}
        self._registry.record(
            run_id=self._run_id,
            round=round_number,
            model=self._model_name,
            weights=result.weights,
            participants=list(result.rounds[-1].workers) if result.rounds else [],
            strategy=self.strategy.describe(),
            settings={**_settings(self.config), "input_shape": list(self._reference.input_shape)},
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

    # Synchronous rounds

    async def _run_sync(
        self,
        start: int,
        result: RunResult,
        trainers: Sequence[WorkerClient],
        evaluator: WorkerClient | None,
        groups: Mapping[str, Sequence[int]],
    ) -> None:
        for round_number in range(start, self.config.training_rounds + 1):
            if self._private is not None and self._private.exhausted(round_number):  # --dp-target-epsilon
                break
            evaluating = evaluator is not None and self.config.is_eval_round(round_number)
            keep = evaluating or self.config.cross_site_validation
            updates = await self._train_round(round_number, result, trainers, keep=keep)
            if self.config.cross_site_validation:
                self._local_models.update(updates)
            if evaluator is not None and evaluating:
                await self._evaluate_round(round_number, result, updates, evaluator, groups)
            if self.config.federated_eval and self.config.is_eval_round(round_number):
                await self._federated_eval(round_number, result, trainers)
            await self._version_done(round_number, result)

    # Asynchronous training

    async def _run_async(
        self,
        start: int,
        result: RunResult,
        trainers: Sequence[WorkerClient],
        evaluator: WorkerClient | None,
        groups: Mapping[str, Sequence[int]],
    ) -> None:
        """Versions ``start`` to ``training_rounds``, each from a buffer of updates (FedBuff).

        Every worker loops on its own (``_train_continuously``) and hands its
        updates to a queue; this loop folds them into the buffer, discounted
        by staleness (the versions published since the worker's base model),
        and publishes a version whenever the buffer is full. Workers never wait
        for each other: a slow site only contributes staler updates.
        """
        config = self.config
        buffer = UpdateBuffer(
            config.buffer_size,
            policy=config.staleness_weight,
            a=config.staleness_a,
            b=config.staleness_b,
            max_staleness=config.max_staleness,
        )
        state = _AsyncState(version=start - 1, weights=result.weights)
        queue: asyncio.Queue[tuple[str, int, FitResult]] = asyncio.Queue()
        loops = [
            asyncio.create_task(self._train_continuously(index, client, state, queue))
            for index, client in enumerate(trainers)
        ]
        try:
            started = time.perf_counter()
            sent, received = _traffic(trainers)
            contributors: list[str] = []
            losses: dict[str, float] = {}
            failed: dict[str, str] = {}
            discarded = 0
            while state.version < config.training_rounds:
                try:
                    async with asyncio.timeout(config.round_timeout):
                        name, base, reply = await queue.get()
                except TimeoutError:
                    raise QuorumNotMet(
                        f"version {state.version + 1}: no worker returned an update within {config.round_timeout:g} s"
                    ) from None
                mismatch = _mismatch(reply.weights, state.weights) or nonfinite(reply.weights)
                if mismatch is not None:
                    self.report(f"Update of {name} dropped: {mismatch}")
                    failed[name] = f"invalid update: {mismatch}"
                    continue
                staleness = state.version - base
                if not buffer.add(reply.weights, staleness):
                    discarded += 1
                    logger.info("%s: update %d versions old discarded", name, staleness)
                    continue
                contributors.append(name)
                losses[name] = reply.loss
                if not buffer.full:
                    continue
                stalenesses = buffer.stalenesses
                mean = buffer.apply(state.weights)
                assert isinstance(self.strategy, MeanStrategy)
                state.weights = result.weights = _finite(
                    self.strategy.step(state.weights, mean, participants=len(contributors), num_workers=len(trainers)),
                    state.version + 1,
                )
                state.version += 1
                seconds = time.perf_counter() - started
                result.rounds.append(
                    RoundRecord(
                        state.version, tuple(contributors), seconds, config.learning_rate(state.version), losses, failed
                    )
                )
                self._write(
                    {
                        "event": "round",
                        "mode": "async",
                        "round": state.version,
                        "workers": contributors,
                        "failed": failed,
                        "seconds": round(seconds, 4),
                        "lr": config.learning_rate(state.version),
                        "train_loss": losses,
                        "strategy": self.strategy.name,
                        "staleness": {
                            "mean": float(np.mean(stalenesses)),
                            "max": int(max(stalenesses)),
                            "values": [int(s) for s in stalenesses],
                        },
                        "discarded": discarded,
                        "bytes_sent": _traffic(trainers)[0] - sent,
                        "bytes_received": _traffic(trainers)[1] - received,
                    }
                )
                if evaluator is not None and config.is_eval_round(state.version):
                    await self._evaluate_round(state.version, result, {}, evaluator, groups)
                if config.federated_eval and config.is_eval_round(state.version):
                    await self._federated_eval(state.version, result, trainers)
                await self._version_done(state.version, result)
                started = time.perf_counter()
                sent, received = _traffic(trainers)
                contributors, losses, failed, discarded = [], {}, {}, 0
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _train_continuously(
        self,
        index: int,
        client: WorkerClient,
        state: _AsyncState,
        queue: asyncio.Queue[tuple[str, int, FitResult]],
    ) -> None:
        """Train ``client`` from the newest global model, again and again, until cancelled.

        A worker that fails is dropped and retried with the usual backoff; its
        in-flight work is lost, the others go on.
        """
        config = self.config
        for task_number in itertools.count():
            if not client.connected or client.name in self._joining:
                await self._rejoin([client])
                if not client.connected or client.name in self._joining:
                    await asyncio.sleep(max(self._backoff[client.name].retry_at - time.monotonic(), 0.05))
                    continue
            base, weights = state.version, state.weights
            fit = self._fit(
                base + 1,
                plan_seed(config.seed, task_number, index),
                config.learning_rate(base + 1),
                weights,
                delta=True,
            )
            try:
                reply = await self._train(client, fit, _itself)
            except (WorkerTimeout, WorkerUnavailable, RemoteError, ProtocolError) as exc:
                reason = await self._failure(client, exc)
                self.report(f"Worker {client.name}: update lost ({reason}); it will be retried")
                self._write({"event": "worker_failed", "worker": client.name, "reason": reason})
                if client.connected:  # an error reply: back off too, never retry in a tight loop
                    self._backoff[client.name].failed(time.monotonic(), config.reconnect_max_delay)
                await asyncio.sleep(max(self._backoff[client.name].retry_at - time.monotonic(), 0.05))
                continue
            self._backoff[client.name].failures = 0
            if config.cross_site_validation and _mismatch(reply.weights, weights) is None:
                # The worker's local model: its base plus the update it returned.
                self._local_models[client.name] = {name: weights[name] + delta for name, delta in reply.weights.items()}
            await queue.put((client.name, base, reply))

    def _select(self, round_number: int, trainers: Sequence[WorkerClient]) -> list[WorkerClient]:
        """The round's workers: every ready one, or a sample seeded by ``(seed, round)`` (client sampling)."""
        # A worker still being greeted is connected but unchecked: it joins the next round.
        ready = [client for client in trainers if client.connected and client.name not in self._joining]
        size = self.config.sample_size(len(ready))
        if size == len(ready):
            return ready
        rng = np.random.default_rng([self.config.seed, round_number, _SAMPLING_STREAM])
        return [ready[index] for index in sorted(rng.choice(len(ready), size=size, replace=False))]

    async def _train_round(
        self, round_number: int, result: RunResult, trainers: Sequence[WorkerClient], *, keep: bool
    ) -> dict[str, Weights]:
        """One round: retried while fewer than the quorum contribute, up to ``max_round_retries`` times.

        Returns each contributor's weights when ``keep`` (for the evaluator), else nothing: a
        streaming strategy has folded them into its sums and let them go.
        """
        config = self.config
        started = time.perf_counter()
        sent, received = _traffic(trainers)
        lr = config.learning_rate(round_number)
        attempts = config.max_round_retries + 1
        wanted = config.sample_size(len(trainers))
        quorum = min(config.quorum, wanted)
        of = f"{wanted} selected workers" if wanted < len(trainers) else f"{len(trainers)} workers"
        for attempt in range(1, attempts + 1):
            await self._rejoin(trainers)
            selected = self._select(round_number, trainers)
            failures = {
                client.name: f"not connected ({client.closed_reason})"
                for client in trainers
                if not client.connected or client.name in self._joining
            }
            fold: _Fold | PrivateFold
            if self._private is not None:  # secure aggregation and differential privacy (syncfed.secure_round)
                fold, lost = await self._private.collect(
                    selected,
                    lambda client: self._fit(
                        round_number,
                        plan_seed(config.seed, round_number, trainers.index(client)),
                        lr,
                        result.weights,
                        delta=True,
                    ),
                    result.weights,
                    self._num_examples,
                    self._failure,
                )
            else:
                fold = _Fold(
                    self.strategy, result.weights, keep=keep, delta=config.compress != "none", held=self._num_examples
                )
                lost = await self._collect_updates(round_number, result, trainers, selected, lr, fold)
            failures |= lost
            if len(fold.losses) >= quorum:
                break
            summary = "; ".join(f"{name}: {reason}" for name, reason in failures.items())
            self._write({"event": "round_retry", "round": round_number, "attempt": attempt, "failed": failures})
            if attempt == attempts:
                raise QuorumNotMet(
                    f"round {round_number}: {len(fold.losses)} of {of} contributed,"
                    f" quorum is {quorum}, after {attempts} attempts ({summary})"
                )
            self.report(
                f"Round {round_number}: {len(fold.losses)} of {of} contributed,"
                f" quorum is {quorum} ({summary}); retrying ({attempt}/{config.max_round_retries})"
            )
            await self._wait_for_retry(trainers)
        result.weights = _finite(fold.aggregate(len(trainers)), round_number)
        contributors = [client.name for client in trainers if client.name in fold.losses]  # in the workers' order
        record = RoundRecord(
            round_number,
            tuple(contributors),
            time.perf_counter() - started,
            lr,
            {name: fold.losses[name] for name in contributors},
            failures,
        )
        result.rounds.append(record)
        if failures:
            dropped = "; ".join(f"{name} ({reason})" for name, reason in failures.items())
            self.report(
                f"Round {round_number}: aggregated {len(fold.losses)} of {len(trainers)} workers; dropped {dropped}"
            )
        losses = losses_text(record.train_loss, secure=config.secure_agg)
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
                **round_figures(
                    record.train_loss,
                    {name: fold.examples[name] for name in contributors},
                    secure=config.secure_agg,
                    total=fold.total_examples if isinstance(fold, PrivateFold) else None,
                ),
                **(
                    {"compression_error": {name: fold.compression_errors[name] for name in contributors}}
                    if config.compress != "none"
                    else {}
                ),
                # Each --dp-sgd worker's own example-level epsilon so far, at its own delta.
                **({"dp_epsilon": dict(fold.dp_epsilons)} if isinstance(fold, _Fold) and fold.dp_epsilons else {}),
                "strategy": self.strategy.name,
                **({"selected": [client.name for client in selected]} if len(selected) < len(trainers) else {}),
                "bytes_sent": _traffic(trainers)[0] - sent,
                "bytes_received": _traffic(trainers)[1] - received,
                **(self._private.metrics(round_number) if self._private is not None else {}),
            }
        )
        return {name: fold.kept[name] for name in contributors if name in fold.kept}

    def _fit(self, version: int, seed: int, lr: float, weights: Weights, *, delta: bool) -> Fit:
        """The request that trains one worker from ``weights``, with the strategy's settings."""
        config = self.config
        plan = TrainingPlan(
            round=version,
            batch_size=config.batch_size,
            num_batches=config.federate_after_n_batches,
            lr=lr,
            seed=seed,
            mu=self.strategy.proximal_mu,
            delta=delta or config.compress != "none",
            compress=config.compress,
        )
        control = self.strategy.control(weights) if self.strategy.uses_control else None
        return Fit(self._model_name, weights, plan, control, config.dataset_key)

    async def _train(self, client: WorkerClient, fit: Fit, take: Callable[[FitResult], _T]) -> _T:
        """``take`` of ``client``'s reply to ``fit``: with receive slots, held at the worker until one is free.

        The slot is taken only for the transfer and ``take`` (the fold), never
        while the worker trains, so at most K updates are in memory at once;
        a worker waiting for a slot keeps answering pings and is not taken for
        frozen. Training and the transfer each have the round timeout.
        """
        timeout = self.config.round_timeout
        if self._slots is None:
            reply = await client.request(fit, timeout=timeout)
            assert isinstance(reply, FitResult)  # request() checked the reply's kind
            return take(reply)
        held = await client.request(
            dataclasses.replace(fit, plan=dataclasses.replace(fit.plan, hold=True)), timeout=timeout
        )
        assert isinstance(held, FitHeld)
        async with self._slots:
            reply = await client.request(Fetch(held.token), timeout=timeout)
            assert isinstance(reply, FitResult)
            return take(reply)

    async def _collect_updates(
        self,
        round_number: int,
        result: RunResult,
        trainers: Sequence[WorkerClient],
        selected: Sequence[WorkerClient],
        lr: float,
        fold: _Fold,
    ) -> dict[str, str]:
        """Send the round's plans to the selected workers at once; fold each update in as it arrives.

        Returns why each selected worker that did not contribute failed.
        """
        index = {client.name: position for position, client in enumerate(trainers)}
        pending = {
            asyncio.ensure_future(
                self._train(
                    client,
                    self._fit(
                        round_number,
                        plan_seed(self.config.seed, round_number, index[client.name]),
                        lr,
                        result.weights,
                        delta=False,
                    ),
                    functools.partial(fold.add, client.name),
                )
            ): client
            for client in selected
        }
        failures: dict[str, str] = {}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    client = pending.pop(task)
                    error = task.exception()
                    if error is not None:
                        failures[client.name] = await self._failure(client, error)
                        continue
                    reason = task.result()  # the fold's verdict on the update
                    if reason is not None:
                        failures[client.name] = reason
        finally:
            for task in pending:
                task.cancel()
        return failures

    async def _failure(self, client: WorkerClient, exc: BaseException) -> str:
        """Why a training request failed, closing or backing off the worker as needed; re-raises the unexpected."""
        if isinstance(exc, WorkerTimeout):
            # Closing makes the worker abandon the late work; it rejoins next round.
            await client.close(f"dropped after {exc.reason}")
            return f"timeout: {exc.reason}"
        if isinstance(exc, WorkerUnavailable):
            self._backoff[client.name].failed(time.monotonic(), self.config.reconnect_max_delay)
            return exc.reason
        if isinstance(exc, RemoteError):
            return f"error reply: {exc.code}: {exc.reason}"
        if isinstance(exc, ProtocolError):
            await client.close(f"sent an invalid reply: {exc}")
            return f"invalid reply: {exc}"
        raise exc

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
        updates: Mapping[str, Weights],
        evaluator: WorkerClient,
        groups: Mapping[str, Sequence[int]],
    ) -> None:
        """Score each contributing worker's model and the federated one; a lost evaluator skips this evaluation."""
        candidates = {**updates, FEDERATED: result.weights}
        batch, key = self.config.test_batch_size, self.config.dataset_key
        await self._rejoin([evaluator])
        try:
            replies = await asyncio.gather(
                *(
                    evaluator.request(Evaluate(self._model_name, weights, batch, dataset_key=key))
                    for weights in candidates.values()
                )
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
            if groups:
                self.report(f"{label}: Percentage numbers {shares}")
            self.report(f"{label}: {_figures(reply)}")
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

    # Evaluation at the sites

    async def _score(self, client: WorkerClient, weights: Weights, split: str | None) -> Cell:
        """``client``'s score of ``weights`` on its own data, or on its validation split, or why there is none.

        A failure is handled as in training (a late worker is dropped and
        rejoins later) and its reason returned, so one site cannot stop the others.
        """
        assert self._reference is not None
        if not client.connected or client.name in self._joining:
            return f"not connected ({client.closed_reason})"
        request = Evaluate(self._model_name, weights, self.config.test_batch_size, split, self.config.dataset_key)
        try:
            reply = await client.request(request)
        except (WorkerUnavailable, RemoteError, ProtocolError) as exc:
            return await self._failure(client, exc)
        assert isinstance(reply, EvalResult)
        if len(reply.predictions) != self._reference.num_classes:
            return f"its predictions do not have {self._reference.num_classes} classes"
        return reply

    async def _federated_eval(self, round_number: int, result: RunResult, trainers: Sequence[WorkerClient]) -> None:
        """Federated evaluation: every training worker scores the global model on its own validation split, at once.

        Reported per site and as the example-weighted average, beside the
        central evaluator's score of the same model when there is one.
        """
        outcomes = await asyncio.gather(*(self._score(client, result.weights, VALIDATION) for client in trainers))
        named = dict(zip((client.name for client in trainers), outcomes, strict=True))
        record = SiteEvalRecord(
            round_number,
            {name: outcome for name, outcome in named.items() if isinstance(outcome, EvalResult)},
            {name: outcome for name, outcome in named.items() if isinstance(outcome, str)},
        )
        result.site_evaluations.append(record)
        central = next(
            (entry.result for entry in result.evaluations if entry.round == round_number and entry.model == FEDERATED),
            None,
        )
        self.report(f"Federated evaluation at round {round_number}/{self.config.training_rounds} (validation splits):")
        secure = self.config.secure_agg  # each site's figures and size stay private: the average only
        for name, reply in record.sites.items() if not secure else ():
            self.report(f"Site {name}: {_figures(reply)}")
        for name, reason in record.failed.items():
            self.report(f"Site {name}: not evaluated ({reason})")
        event: dict[str, Any] = {
            "event": "federated_eval",
            "round": round_number,
            "sites": {name: result_json(reply) for name, reply in record.sites.items()} if not secure else {},
            "failed": record.failed,
        }
        if record.sites:
            average = record.average
            beside = f"; central evaluator: {central.accuracy:.2%}" if central is not None else ""
            self.report(f"Weighted average over {len(record.sites)} sites: {_figures(average)}{beside}")
            event["average"] = result_json(average)
        if central is not None:
            event["central"] = result_json(central)
        self._write(event)

    async def _cross_site_validation(
        self, result: RunResult, trainers: Sequence[WorkerClient], evaluator: WorkerClient | None
    ) -> None:
        """Score each trainer's final local model and the global one on every site's data; print and save the matrix.

        Requests go to all sites at once, at most ``_PIPELINE`` at a time per
        site, each under the request timeout; a site that fails leaves its
        cells empty with the reason.
        """
        config = self.config
        sites = [*trainers, *([evaluator] if evaluator is not None else [])]
        await self._rejoin(sites)
        models: dict[str, Weights | None] = {name: self._local_models.get(name) for name in config.workers}
        models[FEDERATED] = result.weights
        gates = {client.name: asyncio.Semaphore(_PIPELINE) for client in sites}

        async def cell(weights: Weights | None, client: WorkerClient) -> Cell:
            if weights is None:
                return "no local model: the worker contributed to no round of this run"
            async with gates[client.name]:
                return await self._score(client, weights, None if client is evaluator else VALIDATION)

        cells = await asyncio.gather(*(cell(weights, client) for weights in models.values() for client in sites))
        last = result.rounds[-1].round if result.rounds else config.training_rounds
        matrix = CrossSiteMatrix(
            last,
            tuple(models),
            tuple(client.name for client in sites),
            tuple(TEST if client is evaluator else VALIDATION for client in sites),
            tuple(tuple(cells[row * len(sites) : (row + 1) * len(sites)]) for row in range(len(models))),
        )
        result.cross_site = matrix
        self.report(f"Cross-site validation after round {last} (accuracy; rows: models, columns: data):")
        for line in matrix.table():
            self.report(line)
        directory = config.cross_site_out or (
            config.metrics_out.parent / "cross-site" if config.metrics_out is not None else Path("cross-site")
        )
        written = write_cross_site(matrix, directory)
        missing = "" if len(written) > 1 else " (no heat map: matplotlib is not installed)"
        self.report(f"Saved the cross-site matrix to {', '.join(str(path) for path in written)}{missing}")
        self._write({"event": "cross_site", **matrix.to_json()})

    def _write(self, event: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(event) + "\n")
            self._metrics.flush()
        for listener in self.listeners:
            listener(event)


@dataclass
class _AsyncState:
    """The newest global version, shared by the asynchronous loops."""

    version: int
    weights: Weights


class _Fold:
    """Takes a round's valid updates as they arrive.

    A streaming strategy (every mean-based one) folds each update into
    running sums and lets it go, so the coordinator holds the sums plus the
    update in flight, whatever the number of workers; a robust one keeps
    them all (it needs every update at once). ``kept`` holds each update's
    weights only when the evaluator scores them this round.
    """

    def __init__(
        self, strategy: Strategy, reference: Weights, *, keep: bool, delta: bool, held: Mapping[str, int]
    ) -> None:
        """``held``: each worker's example count as its hello said, the most its updates may weigh."""
        self.strategy = strategy
        self.reference = reference
        self.keep = keep
        self.delta = delta  # replies carry updates relative to ``reference``
        self.held = held
        self.mean = (
            RunningMean(weighted=strategy.weighted, origin=None if delta else reference)
            if isinstance(strategy, MeanStrategy)
            else None
        )
        self.controls = RunningMean(weighted=False) if strategy.uses_control else None
        self.control = strategy.control(reference) if strategy.uses_control else None
        self.updates: list[tuple[Weights, int]] = []
        self.losses: dict[str, float] = {}
        self.compression_errors: dict[str, float] = {}
        self.dp_epsilons: dict[str, float] = {}  # from workers that train with --dp-sgd
        self.examples: dict[str, int] = {}
        self.kept: dict[str, Weights] = {}

    def add(self, name: str, reply: FitResult) -> str | None:
        """Fold in ``reply``; why it is invalid, if it is."""
        mismatch = _invalid(reply, self.reference, self.held.get(name, 0))
        if mismatch is None and self.controls is not None:
            assert self.control is not None
            mismatch = (
                "no control variate update (SCAFFOLD)"
                if reply.control_delta is None
                else _mismatch(reply.control_delta, self.control) or nonfinite(reply.control_delta)
            )
        if mismatch is not None:
            return f"invalid update: {mismatch}"
        weights = (
            {name: self.reference[name] + array for name, array in reply.weights.items()}
            if self.delta and (self.mean is None or self.keep)
            else reply.weights
        )
        if self.mean is not None:
            self.mean.add(reply.weights, reply.num_examples)
        else:
            self.updates.append((weights, reply.num_examples))
        if self.controls is not None and reply.control_delta is not None:
            self.controls.add(reply.control_delta, 1)
        if self.keep:
            self.kept[name] = weights
        self.losses[name] = reply.loss
        self.compression_errors[name] = reply.compression_error
        if reply.dp_epsilon is not None:
            self.dp_epsilons[name] = reply.dp_epsilon
        self.examples[name] = reply.num_examples
        return None

    def aggregate(self, num_workers: int) -> Weights:
        """The next global model."""
        if self.mean is None:
            return self.strategy.aggregate(self.reference, self.updates, num_workers=num_workers)
        assert isinstance(self.strategy, MeanStrategy)
        mean = self.mean.result()
        if self.delta:
            mean = {name: self.reference[name] + array for name, array in mean.items()}
        return self.strategy.step(
            self.reference,
            mean,
            control_mean=self.controls.result() if self.controls is not None else None,
            participants=self.mean.count,
            num_workers=num_workers,
        )


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


def _finite(weights: Weights, version: int) -> Weights:
    """``weights``, the new global model, unless a server optimizer overflowed on finite updates.

    Raises:
        AggregationError: naming the tensor; the run stops before anything non-finite is saved.
    """
    reason = nonfinite(weights)
    if reason is not None:
        raise AggregationError(f"round {version}: the aggregated model is not finite: {reason}")
    return weights


def _invalid(reply: FitResult, reference: Mapping[str, np.ndarray], held: int) -> str | None:
    """Why an update cannot be aggregated: tensors unlike the model's, a non-finite value (after
    decompression), or more examples than its worker said it holds (which would outweigh the others)."""
    if reply.num_examples > held:
        return f"num_examples {reply.num_examples} exceeds the {held} examples the worker's hello claimed"
    return _mismatch(reply.weights, reference) or nonfinite(reply.weights)


def _figures(reply: EvalResult) -> str:
    return f"Average loss: {reply.loss:.4f}, Accuracy: {reply.correct}/{reply.num_examples} ({reply.accuracy:.2%})"


def _traffic(clients: Sequence[WorkerClient]) -> tuple[int, int]:
    """Message bytes sent to and received from ``clients`` so far."""
    return sum(client.bytes_sent for client in clients), sum(client.bytes_received for client in clients)
