"""A worker's compute: fits, evaluations and queries over its data, in a thread, one model job at a time.

Training and evaluation run in a thread so that the event loop keeps
answering pings and other requests; they share the cached models, so only
one runs at a time. A job whose request is cancelled (its coordinator went
away) is asked to stop within one batch, and the next waits until it has.
Across rounds the compute keeps each model's SCAFFOLD control variate, the
example-level DP-SGD accountant, and the optimizer's state when a plan asks
to keep it (``keep_state``; see :mod:`.optimizer_states`).

A request's recipe names its task (``syncfed.tasks``): the loss trained on
and the metric sums an evaluation returns. Without one, training and the
reply are exactly the classic ones.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import analytics
from ..compression import compression_error
from ..config import WorkerConfig
from ..datasets import Dataset
from ..evaluation import VALIDATION
from ..exceptions import ConfigError, DatasetError, LocalProtocolError, ModelError, ProtocolError, RequestFailed
from ..models import check_layout, get_weights, set_weights
from ..privacy import clip_update, gaussian_noise
from ..protocol import (
    DataPlan,
    Describe,
    Error,
    EvalResult,
    Evaluate,
    Fit,
    FitResult,
    Message,
    ModelLayout,
    Query,
    QueryResult,
)
from ..tasks import Task, make_task, resolve_task
from ..tensors import Weights
from ..training import DPSGD, ExampleAccountant, batch_size, corrupt, evaluate, train, training_device
from .catalog import ModelCatalog, ModelKey
from .cores import available_cores, count_workers, counted, fair_threads
from .holdings import Holding, Served, SourceHolding
from .optimizer_states import OptimizerStates

__all__ = ["Compute", "CoreShare"]

logger = logging.getLogger("syncfed.worker")


class CoreShare:
    """Sets torch's threads in the calling thread to this worker's share of the cores.

    Call :meth:`apply` at start and before each job, in the thread that runs
    it: torch keeps the OpenMP thread count per thread, and workers that
    start later shrink the share of those started earlier.
    """

    def __init__(self, worker_id: str, *, directory: Path | None = None, cores: int | None = None) -> None:
        self.worker_id = worker_id
        self.directory = directory
        self.cores = available_cores() if cores is None else cores
        self.ceiling = torch.get_num_threads()  # torch's default, before anyone changed it
        self.said: tuple[int, int] | None = None  # the threads and workers of the last line logged

    def apply(self) -> int:
        """Take this worker's share now; the count of threads it set."""
        workers = count_workers(self.directory)
        threads = fair_threads(self.cores, workers, self.ceiling)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if (threads, workers) != self.said:
            logger.info(
                "%s runs torch with %s, its share of %d cores among %s on this machine (--threads fixes the count)",
                self.worker_id,
                counted(threads, "thread"),
                self.cores,
                counted(max(1, workers), "syncfed worker"),
            )
            self.said = (threads, workers)
        return threads


class Compute:
    """Runs what a worker is asked to compute over its holdings, with the models it may build.

    A request over a user's own data carries the federation's data plan
    (``data``): the holding prepares its examples as the plan says, in the
    compute's thread, since a large table takes a while to encode.
    """

    def __init__(self, config: WorkerConfig, holdings: Sequence[Served], named: Mapping[str, Served]) -> None:
        """``holdings``: the first is the default; ``named``: those a request may name by key.

        Raises:
            ConfigError: if a model cannot be described, a task (``--task``) cannot be built for the
                default data set's classes, or a kept optimizer state (``--state-dir``) cannot be read.
        """
        self.config = config
        self.holdings = holdings
        self.named = named
        self.catalog = ModelCatalog(config, shaped=any(isinstance(holding, SourceHolding) for holding in holdings))
        for path in config.tasks:  # a bad path stops the worker at start, as a bad --model does
            resolve_task(path, _num_classes(holdings[0]))
        self._states = OptimizerStates(config.state_dir)
        self.device = training_device(config.cuda)
        # One compute job at a time: it owns the cached models and the CPU.
        self._lock = asyncio.Lock()
        # SCAFFOLD's client control variates c_i, per model; see ``_control``.
        self._controls: dict[ModelKey, Weights] = {}
        self._attack_rng = np.random.default_rng()
        # Example-level DP-SGD (--dp-sgd): one accountant for every step on this worker's examples, across rounds.
        z = config.dp_sgd_noise_multiplier
        self._dp_sgd = DPSGD(z, config.dp_sgd_clip) if z is not None else None
        self._accountant = ExampleAccountant(z, config.dp_sgd_delta) if z is not None else None
        self._cores = CoreShare(config.worker_id) if config.share_cores and config.threads is None else None
        if self._cores is not None:
            self._cores.apply()  # says at start what it takes

    async def run(self, message: Fit | Evaluate) -> Message:
        """Run a fit or an evaluation in a thread, one at a time."""
        holding = self._holding(message.dataset_key, message.data)
        key = self.catalog.key(message.model, message.data, message.recipe, hint="; start it with --model to add one")
        if isinstance(message, Fit) and self.config.testing:
            raise RequestFailed("wrong_role", "this worker is an evaluator and does not train")
        if isinstance(message, Evaluate) and message.split == VALIDATION and not holding.validation_size:
            raise RequestFailed(
                "incompatible",
                "this worker holds no validation split (it is the evaluator, or runs with --val-fraction 0)",
            )
        if isinstance(message, Fit) and message.control is not None and message.plan.optimizer != "sgd":
            # Option II learns c_i from (x - y) / (K * lr): the mean gradient only when each step is lr times one.
            raise RequestFailed(
                "incompatible",
                f"scaffold learns its control variates from sgd steps, not {message.plan.optimizer}: use sgd",
            )
        task = _task(message, holding, self.config.tasks)
        try:
            check_layout(self.catalog.layout(key, message.data, message.recipe), message.weights)
        except ModelError as exc:
            raise RequestFailed("incompatible", str(exc)) from None
        abandoned = threading.Event()
        async with self._lock:
            job = asyncio.get_running_loop().run_in_executor(
                None, self._compute_sync, message, key, holding, task, abandoned
            )
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                # A thread cannot be killed: ask it to stop at the next batch and
                # keep the lock until it has, so the next job never shares the
                # cached model with it.
                abandoned.set()
                await asyncio.wait([job])
                if not job.cancelled():
                    job.exception()  # retrieved: an abandoned job's Abandoned is expected
                raise

    def describe(self, message: Describe) -> ModelLayout:
        """The layout of a model this worker serves, from its description: nothing is built."""
        self._holding(None, message.data)
        return self.catalog.describe(message.model, message.data, message.recipe)

    async def query(self, query: Query) -> QueryResult:
        """This worker's answer to ``query``; a refusal or a query its data cannot answer is an error reply."""
        holding = self._holding(None, query.data)
        # Read-only numpy over the data: a thread, beside any fit, so pings are still answered.
        reply = await asyncio.to_thread(self._answer, query, holding)
        if isinstance(reply, Error):
            raise RequestFailed(reply.code, reply.reason)
        return reply

    def _answer(self, query: Query, holding: Served) -> QueryResult | Error:
        if query.data is None:
            return analytics.answer(query, self._bundled(holding).data, self.config.min_group_size)
        # A table's one-hot slots count the rows of each category, the rare ones its schema hides included:
        # only its numeric columns may be selected (federated normalisation asks for no others).
        selectable = frozenset(query.data.numeric_slots().tolist()) if query.data.kind == "table" else None
        data = self._prepared(holding, query.data)[0]
        return analytics.answer(query, data, self.config.min_group_size, selectable=selectable)

    def _holding(self, key: str | None, plan: DataPlan | None) -> Served:
        """The data set a request names (else the default), checked against whether it carries a data plan.

        Raises:
            RequestFailed: ``incompatible`` for a data set this worker does not hold, a request over own data
                without a plan, or one over a bundled data set with one.
        """
        holding = self.holdings[0] if key is None else self.named.get(key)
        if holding is None:
            held = ", ".join(self.named) or "no named data sets"
            raise RequestFailed("incompatible", f"data set {key!r} is not held by this worker (it has {held})")
        if isinstance(holding, SourceHolding) and plan is None:
            raise RequestFailed(
                "incompatible",
                f"this worker holds its own data ({holding.name}): requests need the federation's data plan;"
                " see docs/data.md",
            )
        if not isinstance(holding, SourceHolding) and plan is not None:
            raise RequestFailed(
                "incompatible", f"this worker holds {holding.data.name}, not own data: requests carry no data plan"
            )
        return holding

    @staticmethod
    def _bundled(holding: Served) -> Holding:
        assert not isinstance(holding, SourceHolding), "checked by _holding"
        return holding

    @staticmethod
    def _prepared(holding: Served, plan: DataPlan) -> tuple[Dataset, Dataset | None]:
        """Own data as ``plan`` says; a plan that does not fit it is an ``incompatible`` reply with its line."""
        assert isinstance(holding, SourceHolding), "checked by _holding"
        try:
            return holding.prepared(plan)
        except DatasetError as exc:
            raise RequestFailed("incompatible", str(exc)) from None

    def _examples(self, message: Fit | Evaluate, holding: Served) -> Dataset:
        """What ``message`` asks for: the data set's examples, or its validation split (checked in :meth:`run`)."""
        if message.data is not None:
            data, validation = self._prepared(holding, message.data)
        else:
            bundled = self._bundled(holding)
            data, validation = bundled.data, bundled.validation
        if isinstance(message, Evaluate) and message.split == VALIDATION:
            assert validation is not None, "checked by run"
            return validation
        return data

    def _compute_sync(
        self, message: Fit | Evaluate, key: ModelKey, holding: Served, task: Task | None, abandoned: threading.Event
    ) -> Message:
        if self._cores is not None:
            self._cores.apply()  # in this thread: torch keeps the count per thread, and workers come and go
        data = self._examples(message, holding)
        model = self.catalog.model(key, message.data, message.recipe)
        try:
            set_weights(model, message.weights)
        except ModelError as exc:
            raise RequestFailed("incompatible", str(exc)) from None
        if isinstance(message, Fit):
            return self._fit(model, key, message, data, task, abandoned)
        return self._evaluate(model, message, data, task)

    def _evaluate(self, model: nn.Module, message: Evaluate, data: Dataset, task: Task | None) -> EvalResult:
        """The score of ``model`` on ``data``; with a recipe, also its task's metric sums."""
        try:
            outcome = evaluate(model, data, message.batch_size, self.device, task)
        except (ModelError, DatasetError) as exc:  # a user task's output or sums that do not fit
            raise RequestFailed("incompatible", str(exc)) from None
        scored = (outcome.loss, outcome.correct, outcome.num_examples, tuple(outcome.predictions))
        # Per-class counts over own data with classes: a bundled data set's reply stays as it always was.
        classes = message.data is not None and message.data.classes is not None
        counts = tuple(outcome.class_counts) if classes else None
        right = tuple(outcome.class_correct) if classes else None
        if message.recipe is None:
            return EvalResult(*scored, counts, right)
        try:  # no sums (more classes than a confusion matrix may have): accuracy and recall travel without them
            return EvalResult(*scored, counts, right, outcome.metrics or None)
        except LocalProtocolError as exc:  # a user task's sums that are not the protocol's
            raise RequestFailed(
                "incompatible", f"task {message.recipe.task} metric sums cannot be sent: {exc}"
            ) from None

    def _fit(
        self,
        model: nn.Module,
        key: ModelKey,
        message: Fit,
        data: Dataset,
        task: Task | None,
        abandoned: threading.Event,
    ) -> FitResult:
        started = time.perf_counter()
        plan = message.plan
        state_key = (*key, plan.optimizer)
        if not plan.keep_state:
            self._states.drop(key)
        # A run's first round starts afresh, as SCAFFOLD's variate does, rather than from an earlier run's moments.
        state = self._states.get(state_key) if plan.keep_state and plan.round > 1 else None
        local = self._control(key, message) if message.control is not None else None
        correction = (
            {name: message.control[name] - local[name] for name in local}
            if message.control is not None and local is not None
            else None
        )
        torch.manual_seed(plan.seed)  # dropout and other random layers
        try:
            result = train(
                model,
                data,
                plan,
                self.device,
                abandoned=abandoned,
                batch_delay=self.config.batch_delay,
                anchor=message.weights,
                correction=correction,
                dp_sgd=self._dp_sgd,
                task=task,
                optimizer=plan.optimizer,
                momentum=plan.momentum,
                weight_decay=plan.weight_decay,
                grad_clip=plan.grad_clip,
                local_epochs=plan.local_epochs,
                state=state,
            )
        except (ModelError, ConfigError, DatasetError) as exc:
            # A model Opacus cannot train with DP-SGD, a kept state that does not fit, labels the task cannot learn.
            raise RequestFailed("incompatible", str(exc)) from None
        dp_epsilon = None
        if self._accountant is not None:
            # Every step trained counts, whatever becomes of the reply. A batch size above the
            # shard's trains on the whole shard each step: a sample rate of 1.
            self._accountant.step(batch_size(plan, len(data)) / len(data), result.steps)
            dp_epsilon = self._accountant.epsilon()
            logger.info(
                "dp-sgd: %d steps so far on %d examples, epsilon %.4g at delta %g",
                self._accountant.steps,
                len(data),
                dp_epsilon,
                self._accountant.delta,
            )
        if not math.isfinite(result.loss):
            raise RequestFailed("internal", f"training diverged (loss {result.loss}); lower the learning rate")
        if plan.keep_state and result.state is not None:
            self._states.put(state_key, result.state)
        trained = get_weights(model)
        if self.config.attack is not None:
            trained = corrupt(trained, message.weights, self.config.attack, self._attack_rng)
        control_delta = None
        if message.control is not None and local is not None:
            # Option II of SCAFFOLD: c_i+ = c_i - c + (x - y) / (K * lr), from the weights alone.
            # With no batches there is nothing to learn the variate from: it stays.
            steps = result.steps * plan.lr
            control_delta = {
                name: ((message.weights[name] - trained[name]) / steps - message.control[name]).astype(array.dtype)
                if steps
                else np.zeros_like(array)
                for name, array in local.items()
            }
            self._controls[key] = {name: local[name] + control_delta[name] for name in local}
        weights = {name: trained[name] - message.weights[name] for name in trained} if plan.delta else trained
        if plan.clip is not None:
            # Differential privacy (DP-FedAvg, McMahan et al. 2018): the float tensors' update, clipped, plus this
            # worker's share of the noise, drawn from the operating system's entropy, never from the plan's seed.
            weights, _ = clip_update(
                {name: array for name, array in weights.items() if np.issubdtype(array.dtype, np.floating)}, plan.clip
            )
            if plan.noise_std:
                noise = gaussian_noise(weights, plan.noise_std, np.random.default_rng())
                weights = {name: array + noise[name] for name, array in weights.items()}
        error = compression_error(weights, plan.compress) if plan.compress != "none" else 0.0
        return FitResult(
            weights, len(data), result.loss, time.perf_counter() - started, control_delta, error, dp_epsilon
        )

    def _control(self, key: ModelKey, message: Fit) -> Weights:
        """This worker's SCAFFOLD control variate for the request's model (``key``), checked against the server's.

        A server variate of all zeros marks the first round of a run: the
        worker's own variate starts at zero then too, rather than carrying
        over from an earlier run.
        """
        assert message.control is not None
        for name, array in message.control.items():
            reference = message.weights.get(name)
            if reference is None or reference.shape != array.shape or not np.issubdtype(array.dtype, np.floating):
                raise RequestFailed(
                    "incompatible", f"control variate {name} does not match a float tensor of the model"
                )
        local = self._controls.get(key)
        fresh = not any(np.any(array) for array in message.control.values())
        if local is None or fresh or local.keys() != message.control.keys():
            local = {name: np.zeros_like(array) for name, array in message.control.items()}
        return local


def _num_classes(holding: Served) -> int:
    """The classes a data set's models output (1 for a continuous label), before any plan: its schema's."""
    if isinstance(holding, SourceHolding):
        return 1 if holding.schema.classes is None else len(holding.schema.classes)
    return holding.data.num_classes


def _task(message: Fit | Evaluate, holding: Served, user_tasks: tuple[str, ...]) -> Task | None:
    """The task the request's recipe names over the data it is about; ``None`` without a recipe (the classic).
    ``user_tasks``: the task paths the worker was started with.

    Raises:
        RequestFailed: ``incompatible`` if the task does not fit the data (a binary task over the
            ten digits), or is a user's task this worker was not started with (``--task``).
    """
    if message.recipe is None:
        return None
    num_classes = _num_classes(holding) if message.data is None else message.data.num_classes
    try:
        if message.data is None:  # a plan's classes were checked against the recipe when the request was read
            message.recipe.check_classes(tuple(str(label) for label in range(num_classes)))
        return make_task(message.recipe, num_classes, user_tasks=user_tasks)
    except (ProtocolError, ConfigError) as exc:
        raise RequestFailed("incompatible", str(exc)) from None
