"""A worker: serves its private shard over websockets, never the data itself.

Each connection is a session that starts with ``hello``. Requests are served
concurrently and answered by id; training and evaluation run in a thread,
one at a time, so the event loop keeps answering pings and other requests.
A bad request gets an error reply and the worker keeps serving.

Usage::

    config = WorkerConfig("alice", port=8777)
    asyncio.run(run_worker(config, load_holdings(config)))
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
from torch import nn
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from .. import analytics, auth
from ..admission import Admission, IdleClock
from ..compression import compression_error
from ..config import WorkerConfig
from ..datasets import Dataset, DatasetSpec, load_dataset
from ..evaluation import VALIDATION, holdout, validation_seed
from ..exceptions import (
    AuthenticationFailed,
    ConfigError,
    MessageTooLarge,
    ModelError,
    ProtocolError,
    SecAggError,
    TensorError,
)
from ..models import (
    BENCH_MODELS,
    DEMO_MODELS,
    Layout,
    ModelFactory,
    check_layout,
    describe_model,
    get_weights,
    resolve_model,
    set_weights,
)
from ..partition import class_indices, default_classes, iid_shard
from ..privacy import clip_update, gaussian_noise
from ..protocol import (
    PROTOCOL_VERSION,
    REQUESTS,
    DatasetInfo,
    Describe,
    Envelope,
    Error,
    EvalResult,
    Evaluate,
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    Hello,
    Info,
    Message,
    MessageDecoder,
    ModelLayout,
    Ping,
    Pong,
    Query,
    QueryResult,
    SecAggKeys,
    SecAggMask,
    SecAggMasked,
    SecAggShare,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmasked,
    encode_fragments,
)
from ..secagg import SecAggClient, SecAggConfig, flatten
from ..tensors import Weights
from ..training import DPSGD, ExampleAccountant, batch_size, corrupt, evaluate, train
from ..transport import connection_options, off_loop, receive, receive_message, send_message, server_tls

__all__ = ["Holding", "Worker", "load_holdings", "load_shard", "model_factories", "run_worker"]

logger = logging.getLogger("syncfed.worker")


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _common_name(peercert: object) -> str | None:
    """The subject common name of a verified peer certificate (``ssl`` getpeercert form)."""
    if not isinstance(peercert, dict):
        return None
    for entry in peercert.get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return str(value)
    return None


class RequestFailed(Exception):
    """Internal: a request cannot be served; becomes an error reply."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Holding:
    """A data set a worker serves: what it trains on (the evaluator: scores on) and its held-out validation split.

    ``spec`` names it in the worker's data-set registry (``--dataset-spec``);
    a worker started without one holds a single data set with no name.
    ``version`` is the digest of its examples that the registry advertises.
    """

    data: Dataset
    validation: Dataset | None = None
    spec: DatasetSpec | None = None
    version: str = ""

    @property
    def validation_size(self) -> int:
        return 0 if self.validation is None else len(self.validation)

    def describe(self, withhold: bool = False) -> DatasetInfo:
        """The registry entry :class:`Info` advertises for a named data set (see :func:`advertised_holdings`)."""
        assert self.spec is not None, "only a named data set is advertised"
        return DatasetInfo(
            key=self.spec.key,
            dataset=self.data.name,
            split=self.spec.split,
            version=self.version,
            input_shape=self.data.input_shape,
            dtype=self.data.images.dtype.name,
            num_classes=self.data.num_classes,
            **advertised_holdings(self.data.histogram(), self.validation_size, withhold),
        )


def advertised_holdings(histogram: Sequence[int], validation_size: int, withhold: bool) -> dict[str, Any]:
    """What hello says about a worker's examples: the class histogram, or with ``withhold`` only
    a power of two at least their number, and whether it holds a validation split (docs/privacy.md)."""
    if not withhold:
        return {"histogram": tuple(histogram), "validation_size": validation_size}
    return {
        "histogram": None,
        "max_examples": 1 << max(sum(histogram) - 1, 0).bit_length(),
        "validation_size": min(validation_size, 1),
    }


def load_shard(config: WorkerConfig, spec: DatasetSpec | None = None) -> Holding:
    """Load one data set this worker serves: ``spec``'s, or the split of ``config.dataset`` its role holds.

    The evaluator holds the whole split (the test set by default); a trainer
    its classes or IID shard of it, of which it then holds out
    ``config.val_fraction`` for validation, seeded by ``config.val_seed`` or
    its id, and never trains on those.
    """
    name = config.dataset if spec is None else spec.dataset
    split = spec.split if spec is not None else "test" if config.testing else "train"
    data = load_dataset(name, split, config.data_dir, download=config.download)
    if config.shard is not None:
        shard, count = config.shard
        data = data.subset(iid_shard(len(data), shard, count, np.random.default_rng(config.shard_seed)))
    else:
        classes = config.digits
        if classes is None and not config.testing:
            classes = default_classes(config.worker_id)
        data = data if classes is None else data.subset(class_indices(data.labels, classes))
    version = data.fingerprint() if spec is not None else ""
    if config.testing or config.val_fraction == 0:
        return Holding(data, None, spec, version)
    seed = validation_seed(config.worker_id) if config.val_seed is None else config.val_seed
    train, held = holdout(len(data), config.val_fraction, np.random.default_rng(seed))
    return Holding(data.subset(train), data.subset(held) if len(held) else None, spec, version)


def load_holdings(config: WorkerConfig) -> list[Holding]:
    """Every data set this worker serves: one per ``--dataset-spec``, in order, else the one of ``--dataset``."""
    return [load_shard(config, spec) for spec in config.datasets] or [load_shard(config)]


def model_factories(import_paths: tuple[str, ...], *, bench: bool = False) -> dict[str, ModelFactory]:
    """The demo models, the benchmark models with ``bench``, and the models this worker was started with."""
    factories = {**DEMO_MODELS, **(BENCH_MODELS if bench else {})}
    for path in import_paths:
        factories[path] = resolve_model(path)
    return factories


class Worker:
    """Serves fit, evaluate, describe, query, hello and ping requests over its data."""

    def __init__(self, config: WorkerConfig, data: Dataset | Sequence[Holding]) -> None:
        """``data``: the worker's holdings (the first is its default), or one data set served as is.

        Raises:
            ConfigError: if there is no data set, or two share a name.
        """
        self.config = config
        self.holdings = [Holding(data)] if isinstance(data, Dataset) else list(data)
        if not self.holdings:
            raise ConfigError("a worker needs at least one data set")
        self.named = {holding.spec.key: holding for holding in self.holdings if holding.spec is not None}
        if len(self.named) != sum(holding.spec is not None for holding in self.holdings):
            raise ConfigError("two of the worker's data sets share a key")
        self.data = self.holdings[0].data  # what it serves when a request names no data set
        self._catalog = tuple(holding.describe(config.withhold_histogram) for holding in self.named.values())
        self.factories = model_factories(config.models, bench=config.bench_models)
        # Each model's state as names, dtypes and shapes, described once without building it (see
        # ``describe_model``): a request's weights are checked against it before any model is built.
        self.layouts: dict[str, Layout] = {}
        for name, factory in self.factories.items():
            try:
                self.layouts[name] = describe_model(factory)
            except ModelError as exc:
                raise ConfigError(f"model {name}: {exc}") from None
        self.device = torch.device("cuda" if config.cuda and torch.cuda.is_available() else "cpu")
        # One compute job at a time: it owns the cached models and the CPU.
        self._compute = asyncio.Lock()
        self._models: dict[str, nn.Module] = {}
        # SCAFFOLD's client control variates c_i, per model; see ``_control``.
        self._controls: dict[str, Weights] = {}
        self._attack_rng = np.random.default_rng()
        # Example-level DP-SGD (--dp-sgd): one accountant for every step on this worker's examples, across rounds.
        z = config.dp_sgd_noise_multiplier
        self._dp_sgd = DPSGD(z, config.dp_sgd_clip) if z is not None else None
        self._accountant = ExampleAccountant(z, config.dp_sgd_delta) if z is not None else None
        # Slots go to authenticated connections only; see run() for what authenticates one.
        self.admission: Admission[_Session] = Admission(
            max_connections=config.max_connections, max_pending=config.max_pending_connections
        )
        self.token = auth.read_token(config.auth_token_file) if config.auth_token_file is not None else None

    def info(self) -> Info:
        return Info(
            worker_id=self.config.worker_id,
            role=self.config.role,
            dataset=self.data.name,
            input_shape=self.data.input_shape,
            num_classes=self.data.num_classes,
            models=tuple(self.factories),
            datasets=self._catalog,
            **advertised_holdings(
                self.data.histogram(), self.holdings[0].validation_size, self.config.withhold_histogram
            ),
        )

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse the websocket handshake: HTTP 503 while ``max_connections`` authenticated
        connections are open, HTTP 403 for a client certificate whose common name is not on the allow-list.

        Connections still authenticating never cause a 503: they wait in their own queue (see ``handle``).
        """
        if self.admission.full:
            logger.warning("refused a connection: %d authenticated connections already open", self.admission.counts[0])
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        if self.config.allow_coordinators:
            identity = _common_name(connection.transport.get_extra_info("peercert"))
            if identity not in self.config.allow_coordinators:
                logger.warning("refused coordinator identity %r: not on the allow-list", identity)
                return connection.respond(
                    HTTPStatus.FORBIDDEN, f"coordinator identity {identity!r} is not allowed by this worker\n"
                )
        return None

    async def handle(self, connection: ServerConnection) -> None:
        """Serve one connection until it closes."""
        peer = "{}:{}".format(*connection.remote_address[:2]) if connection.remote_address else "?"
        session = _Session(self, connection, peer)
        evicted = self.admission.arrive(session)
        if evicted is not None:  # the oldest of a full queue of unauthenticated connections
            logger.warning(
                "dropped %s: %d connections still authenticating", evicted.peer, self.config.max_pending_connections
            )
            evicted.connection.transport.abort()
        try:
            await session.run()
        finally:
            self.admission.leave(session)
            session.abandon()

    async def compute(self, message: Fit | Evaluate) -> Message:
        """Run a fit or an evaluation in a thread, one at a time."""
        if message.model not in self.factories:
            raise RequestFailed(
                "unknown_model",
                f"model {message.model!r} is not registered on this worker "
                f"(it has {', '.join(self.factories)}; start it with --model to add one)",
            )
        if isinstance(message, Fit) and self.config.testing:
            raise RequestFailed("wrong_role", "this worker is an evaluator and does not train")
        try:
            check_layout(self.layouts[message.model], message.weights)
        except ModelError as exc:
            raise RequestFailed("incompatible", str(exc)) from None
        data = self._examples(message)
        abandoned = threading.Event()
        async with self._compute:
            job = asyncio.get_running_loop().run_in_executor(None, self._compute_sync, message, data, abandoned)
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

    def describe(self, name: str) -> ModelLayout:
        """The layout of a model this worker serves, from its description: nothing is built."""
        if name not in self.layouts:
            raise RequestFailed(
                "unknown_model",
                f"model {name!r} is not registered on this worker (it has {', '.join(self.layouts)})",
            )
        try:
            return ModelLayout(
                name, tuple((tensor, dtype, shape) for tensor, (dtype, shape) in self.layouts[name].items())
            )
        except ProtocolError as exc:  # e.g. a user model with a dtype the wire does not carry
            raise RequestFailed("incompatible", f"model {name!r} cannot be described on the wire: {exc}") from None

    def _model(self, name: str) -> nn.Module:
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = self.factories[name]()
        return model

    def _examples(self, message: Fit | Evaluate) -> Dataset:
        """What ``message`` asks for: its named data set (else the default), or that set's validation split."""
        key = message.dataset_key
        holding = self.holdings[0] if key is None else self.named.get(key)
        if holding is None:
            held = ", ".join(self.named) or "no named data sets"
            raise RequestFailed("incompatible", f"data set {key!r} is not held by this worker (it has {held})")
        if isinstance(message, Evaluate) and message.split == VALIDATION:
            if holding.validation is None:
                raise RequestFailed(
                    "incompatible",
                    "this worker holds no validation split (it is the evaluator, or runs with --val-fraction 0)",
                )
            return holding.validation
        return holding.data

    def _compute_sync(self, message: Fit | Evaluate, data: Dataset, abandoned: threading.Event) -> Message:
        model = self._model(message.model)
        try:
            set_weights(model, message.weights)
        except ModelError as exc:
            raise RequestFailed("incompatible", str(exc)) from None
        if isinstance(message, Fit):
            return self._fit(model, message, data, abandoned)
        outcome = evaluate(model, data, message.batch_size, self.device)
        return EvalResult(outcome.loss, outcome.correct, outcome.num_examples, tuple(outcome.predictions))

    def _fit(self, model: nn.Module, message: Fit, data: Dataset, abandoned: threading.Event) -> FitResult:
        started = time.perf_counter()
        plan = message.plan
        local = self._control(message) if message.control is not None else None
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
            )
        except ModelError as exc:  # a model Opacus cannot train with DP-SGD
            raise RequestFailed("incompatible", str(exc)) from None
        dp_epsilon = None
        if self._accountant is not None:
            # Every step trained counts, whatever becomes of the reply. A batch size above the
            # shard's trains on the whole shard each step: a sample rate of 1.
            self._accountant.step(batch_size(plan, len(data)) / len(data), plan.num_batches)
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
        trained = get_weights(model)
        if self.config.attack is not None:
            trained = corrupt(trained, message.weights, self.config.attack, self._attack_rng)
        control_delta = None
        if message.control is not None and local is not None:
            # Option II of SCAFFOLD: c_i+ = c_i - c + (x - y) / (K * lr), from the weights alone.
            # With no batches there is nothing to learn the variate from: it stays.
            steps = plan.num_batches * plan.lr
            control_delta = {
                name: ((message.weights[name] - trained[name]) / steps - message.control[name]).astype(array.dtype)
                if steps
                else np.zeros_like(array)
                for name, array in local.items()
            }
            self._controls[message.model] = {name: local[name] + control_delta[name] for name in local}
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

    def _control(self, message: Fit) -> Weights:
        """This worker's SCAFFOLD control variate for the request's model, checked against the server's.

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
        local = self._controls.get(message.model)
        fresh = not any(np.any(array) for array in message.control.values())
        if local is None or fresh or local.keys() != message.control.keys():
            local = {name: np.zeros_like(array) for name, array in message.control.items()}
        return local


class _Session:
    """The state of one connection: handshake done, requests in flight."""

    def __init__(self, worker: Worker, connection: ServerConnection, peer: str) -> None:
        self.worker = worker
        self.connection = connection
        self.peer = peer
        self.greeted = False
        self.in_flight: dict[int, asyncio.Task[None]] = {}
        # The secure aggregation round open on this connection, if any: one at a time, dropped after unmasking.
        self.secagg: tuple[SecAggConfig, SecAggClient] | None = None
        # The update a holding fit left here until the coordinator fetches it: token, reply, its encoding.
        # One at a time, so a coordinator that never fetches costs one update, not one per round.
        self.held: tuple[int, FitResult, str] | None = None
        self.tokens = itertools.count(1)
        config = worker.config
        self.clock = IdleClock(
            time.monotonic(), handshake_timeout=config.handshake_timeout, idle_timeout=config.idle_timeout
        )

    async def run(self) -> None:
        """Authenticate, then serve requests until the connection closes.

        A connection takes one of the worker's ``max_connections`` slots once it
        has authenticated: by the token when the worker has one, else by its
        client certificate under mutual TLS (checked before this runs), else
        by a valid ``hello``, the most a worker without either can ask.
        """
        config = self.worker.config
        if self.worker.token is not None:
            if not await self.authenticate(self.worker.token) or not await self.enter():
                return
        elif config.tls_ca is not None and not await self.enter():
            return
        watchdog = asyncio.create_task(self.watch())
        try:
            while True:
                try:
                    await self.accept(await self.receive())
                except ConnectionClosed:
                    return
                if self.greeted and not self.worker.admission.admitted(self) and not await self.enter():
                    return
        finally:
            watchdog.cancel()

    async def receive(self) -> MessageDecoder:
        """The next message, noting when each of its fragments arrives: a slow upload is not idle."""
        try:
            return await receive_message(
                self.connection,
                self.worker.config.max_message_size,
                on_fragment=lambda: self.clock.fragment(time.monotonic()),
            )
        finally:
            self.clock.fragment(None)

    async def enter(self) -> bool:
        """Take an authenticated slot; without a free one the connection is closed (1013) and nothing served."""
        if self.worker.admission.authenticate(self):
            return True
        self.abandon()  # the hello just dispatched has not started: it is never answered
        if self.worker.admission.full:  # else it was dropped from the queue, and that was logged
            logger.warning(
                "refused %s: %d authenticated connections already open", self.peer, self.worker.config.max_connections
            )
        await self.connection.close(CloseCode.TRY_AGAIN_LATER, "too many connections")
        return False

    def served(self, _: object = None) -> None:
        """A request other than ping was answered: the connection is in use."""
        self.clock.used(time.monotonic())

    async def watch(self) -> None:
        """Close the connection once its clock's deadline passes: no hello in time, or idle."""
        while True:
            busy = bool(self.in_flight) or self.held is not None
            authenticated = self.worker.admission.admitted(self)
            deadline = self.clock.deadline(time.monotonic(), authenticated=authenticated, busy=busy)
            if deadline is None:
                return
            due, reason = deadline
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            self.worker.admission.leave(self)  # the slot is free now, not after a closing handshake
            logger.warning("closing the connection of %s: %s", self.peer, reason)
            await self.connection.close(CloseCode.POLICY_VIOLATION, reason)
            return

    async def accept(self, incoming: MessageDecoder) -> None:
        """Dispatch one received request, or answer why it is refused.

        A method of its own so that nothing of the request outlives its
        task: a loop's variables would hold the last one, a whole model,
        until the next request arrives.
        """
        logger.debug("message from %s: %d bytes", self.peer, incoming.size)
        try:
            # The session's rules see the envelope before the body is built: building may cost more.
            opened = await off_loop(incoming.size, incoming.open)
            failure = self.refusal(opened.id, opened.kind)
            if failure is not None:
                await self.reply_error(opened.id, *failure, incoming.size)
                return
            envelope = await off_loop(incoming.size, opened.build)
        except ProtocolError as exc:  # MessageTooLarge too: the rest was read and dropped
            await self.reply_error(exc.request_id or 0, exc.code, str(exc), incoming.size)
            return
        self.dispatch(envelope, incoming.size)

    async def authenticate(self, token: bytes) -> bool:
        """Challenge the peer for the shared token before reading any application message.

        Until it answers, websockets itself refuses frames over the handshake's
        size, so an unauthenticated peer cannot make the worker buffer a large message.
        """
        frame, nonce = auth.challenge()
        protocol = self.connection.protocol
        limits = protocol.max_message_size, protocol.max_fragment_size
        protocol.max_message_size = protocol.max_fragment_size = auth.MAX_AUTH_FRAME
        try:
            async with asyncio.timeout(self.worker.config.handshake_timeout):
                await self.connection.send(frame)
                response = await receive(self.connection, auth.MAX_AUTH_FRAME)
                client_nonce = auth.verify_response(token, nonce, response)
                await self.connection.send(auth.confirm(token, nonce, client_nonce))
        except ConnectionClosed:
            return False
        except (TimeoutError, MessageTooLarge, AuthenticationFailed) as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            logger.warning("%s failed authentication: %s", self.peer, reason)
            self.worker.admission.leave(self)  # the place is free now, not after a closing handshake
            await self.connection.close(CloseCode.POLICY_VIOLATION, f"authentication failed: {reason}"[:120])
            return False
        protocol.max_message_size, protocol.max_fragment_size = limits
        return True

    def refusal(self, request_id: int, kind: str) -> tuple[str, str] | None:
        """The error code and reason for a request the session's rules refuse, if any; from the envelope alone."""
        limit = self.worker.config.max_in_flight
        if kind not in REQUESTS:
            return "unknown_kind", f"message kind {kind!r} is not a request"
        if request_id == 0:
            return "malformed", "request id 0 is reserved for unattributable errors"
        if not self.greeted and kind != Hello.kind:
            return "out_of_order", f"{kind} before hello"
        if request_id in self.in_flight:
            return "out_of_order", f"request id {request_id} is already in flight"
        if len(self.in_flight) >= limit:
            return "busy", f"{len(self.in_flight) + 1} requests in flight exceed limit of {limit}"
        return None

    def dispatch(self, envelope: Envelope, size: int) -> None:
        """Serve an accepted request in a task of its own."""
        request_id, message = envelope.id, envelope.message
        if isinstance(message, Hello) and message.protocol_version == PROTOCOL_VERSION:
            # Set here, not in the task, so requests pipelined after hello are accepted.
            self.greeted = True
        task = asyncio.create_task(self.serve(request_id, message, size))
        self.in_flight[request_id] = task
        task.add_done_callback(lambda _: self.in_flight.pop(request_id, None))
        if not isinstance(message, Ping):  # pings keep no connection from being idle
            task.add_done_callback(self.served)

    async def serve(self, request_id: int, message: Message, size: int) -> None:
        started = time.perf_counter()
        try:
            reply, compression = await self.respond(message)
        except RequestFailed as exc:
            await self.reply_error(request_id, exc.code, exc.reason, size)
            return
        except Exception:
            logger.exception("%s from %s failed", message.kind, self.peer)
            await self.reply_error(request_id, "internal", f"{message.kind} failed on the worker", size)
            return
        sent = await self.send(request_id, reply, compression=compression)
        log = logger.debug if isinstance(message, Ping) else logger.info
        log(
            "%s from %s: %d bytes in, %d bytes out, %.3f s",
            message.kind,
            self.peer,
            size,
            sent,
            time.perf_counter() - started,
        )

    async def respond(self, message: Message) -> tuple[Message, str]:
        """The reply to ``message`` and the encoding of its float tensors.

        A fit reply goes in the encoding its plan asked for (compressing is
        part of encoding), now or, when the plan holds it, once fetched.
        """
        if isinstance(message, Fetch):
            if self.held is None or self.held[0] != message.token:
                raise RequestFailed("out_of_order", f"no update is held under token {message.token}")
            _, result, compression = self.held
            self.held = None
            return result, compression
        reply = await self.answer(message)
        if not isinstance(message, Fit):
            return reply, "none"
        if not message.plan.hold:
            return reply, message.plan.compress
        assert isinstance(reply, FitResult)
        if self.held is not None:
            logger.warning("%s never fetched update %d: dropped for a newer one", self.peer, self.held[0])
        token = next(self.tokens)
        self.held = (token, reply, message.plan.compress)
        return FitHeld(token), "none"

    async def answer(self, message: Message) -> Message:
        if isinstance(message, Hello):
            if message.protocol_version != PROTOCOL_VERSION:
                raise RequestFailed(
                    "unsupported_version",
                    f"protocol version {message.protocol_version} is not supported"
                    f" (this worker speaks {PROTOCOL_VERSION})",
                )
            return self.worker.info()
        if isinstance(message, (Fit, Evaluate)):
            return await self.worker.compute(message)
        if isinstance(message, Describe):
            return self.worker.describe(message.model)
        if isinstance(message, Query):
            return await self.query(message)
        if isinstance(message, (SecAggStart, SecAggShare, SecAggMask, SecAggUnmask)):
            return await self.secure_aggregation(message)
        return Pong()

    async def query(self, query: Query) -> QueryResult:
        """This worker's answer to ``query``; a refusal or a query its data cannot answer is an error reply."""
        # Read-only numpy over the data: a thread, beside any fit, so pings are still answered.
        reply = await asyncio.to_thread(analytics.answer, query, self.worker.data, self.worker.config.min_group_size)
        if isinstance(reply, Error):
            raise RequestFailed(reply.code, reply.reason)
        return reply

    async def summed_answer(self, query: Query, clip: float) -> np.ndarray:
        """The answer to ``query`` as the sums secure aggregation adds up, all within the round's ``clip``.

        Beyond the clip the quantizer would change the answer without a word,
        so this refuses instead: the coordinator sized the round for fewer examples.
        """
        vector = analytics.sums(query, await self.query(query))
        if float(np.abs(vector).max()) > clip:  # the value itself stays private
            raise RequestFailed("incompatible", f"the answer exceeds the secure round's limit of {clip:.6g}")
        return vector

    async def secure_aggregation(self, message: SecAggStart | SecAggShare | SecAggMask | SecAggUnmask) -> Message:
        """One step of this connection's secure aggregation round (``syncfed.secagg``, Bonawitz et al. 2017).

        The mask step trains as its fit asks and masks the float tensors'
        update, or answers its query and masks the answer's sums; a refusal
        below the threshold (or under ``--min-group-size``) is a ``refused``
        error reply.
        """
        try:
            if isinstance(message, SecAggStart):
                limit = self.worker.config.max_secagg_clients
                if message.config.num_clients > limit:
                    raise RequestFailed(
                        "refused", f"round of {message.config.num_clients} clients exceeds limit of {limit} clients"
                    )
                # O(n + k) for this client's neighbours alone: never the whole graph.
                self.secagg = (message.config, SecAggClient(message.config, message.client))
                return SecAggKeys(self.secagg[1].advertise_keys())
            if self.secagg is None or self.secagg[0].session != message.session:
                raise RequestFailed("out_of_order", "no secure aggregation round with this session is open")
            config, client = self.secagg
            if isinstance(message, SecAggShare):
                # k key agreements and encryptions: a thread, so pings flow whatever k the round has.
                return SecAggShares(await asyncio.to_thread(client.share_keys, message.keys))
            if isinstance(message, SecAggMask):
                if isinstance(message.task, Query):
                    started = time.perf_counter()
                    vector = await self.summed_answer(message.task, config.clip)
                    masked = await asyncio.to_thread(client.mask_input, message.shares, vector, 1)
                    return SecAggMasked(masked, 0.0, time.perf_counter() - started)
                reply = await self.worker.compute(message.task)
                assert isinstance(reply, FitResult)
                vector = flatten({n: a for n, a in reply.weights.items() if np.issubdtype(a.dtype, np.floating)})
                clipped = int(np.count_nonzero(np.abs(vector) > config.clip))
                if clipped:
                    logger.warning("%d update values beyond +-%g clipped before masking", clipped, config.clip)
                count = reply.num_examples if message.weighted else 1
                masked = await asyncio.to_thread(client.mask_input, message.shares, vector, count)
                return SecAggMasked(masked, reply.loss, reply.seconds)
            self.secagg = None  # a client answers one unmasking request only
            return SecAggUnmasked(client.unmask(message.request))
        except SecAggError as exc:
            raise RequestFailed("refused", str(exc)) from None
        except ProtocolError as exc:
            raise RequestFailed(exc.code, str(exc)) from None
        except ConfigError as exc:
            raise RequestFailed("incompatible", str(exc)) from None

    async def reply_error(self, request_id: int, code: str, reason: str, size: int) -> None:
        logger.warning(
            "error reply to %s (request %d, %d bytes in): %s: %s", self.peer, request_id, size, code, reason[:1000]
        )
        await self.send(request_id, Error(code, reason[:1000]))

    async def send(self, request_id: int, message: Message, *, compression: str = "none") -> int:
        """Send a reply, streamed when large, its float tensors encoded with ``compression``; return its size."""
        try:
            outgoing = encode_fragments(
                request_id, message, chunk_size=self.worker.config.chunk_size, compression=compression
            )
        except TensorError as exc:  # e.g. a user model with a dtype the wire does not carry
            logger.error("cannot encode the %s reply to %s: %s", message.kind, self.peer, exc)
            error = Error("internal", f"cannot encode the {message.kind} reply: {exc}"[:1000])
            outgoing = encode_fragments(request_id, error)
        try:
            await send_message(self.connection, outgoing)
        except ConnectionClosed:
            logger.info("%s left before the reply to request %d", self.peer, request_id)
        return outgoing.size

    def abandon(self) -> None:
        """Cancel what is still in flight for a closed connection."""
        for task in list(self.in_flight.values()):
            task.cancel()


async def run_worker(
    config: WorkerConfig, data: Dataset | Sequence[Holding], *, ready: Callable[[str], None] = print
) -> None:
    """Serve ``data`` (see :class:`Worker`) until cancelled; ``ready`` gets the line naming the bound address."""
    worker = Worker(config, data)
    options = connection_options(config.max_message_size)
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = server_tls(config.tls_cert, config.tls_key, config.tls_ca)
    if not config.secured and config.host not in LOOPBACK:
        logger.warning(
            "WORKER %s ACCEPTS ANY COORDINATOR ON %s: serving without client certificates or a token on an address"
            " other than loopback lets anyone who can reach it train on this data; use --tls-ca (see"
            " python -m syncfed provision) or --auth-token-file",
            config.worker_id.upper(),
            config.host,
        )
    async with serve(
        worker.handle,
        config.host,
        config.port,
        process_request=worker.admit,
        ssl=tls,
        open_timeout=config.handshake_timeout,  # the TLS handshake and the HTTP upgrade, each
        **options,
    ) as server:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        scheme = "wss" if tls is not None else "ws"
        ready(f"syncfed worker {config.worker_id} listening on {scheme}://{host}:{port}")
        await server.serve_forever()
