"""A worker: serves its private shard over websockets, never the data itself.

Each connection is a session that starts with ``hello``. Requests are served
concurrently and answered by id; training and evaluation run in a thread,
one at a time, so the event loop keeps answering pings and other requests.
A bad request gets an error reply and the worker keeps serving.

Usage::

    config = WorkerConfig("alice", port=8777)
    asyncio.run(run_worker(config, load_shard(config)))
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

import torch
from torch import nn
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from . import auth
from .config import WorkerConfig
from .datasets import Dataset, load_dataset
from .exceptions import AuthenticationFailed, MessageTooLarge, ModelError, ProtocolError, TensorError
from .models import MODELS, ModelFactory, get_weights, resolve_model, set_weights
from .partition import class_indices, default_classes
from .protocol import (
    PROTOCOL_VERSION,
    REQUESTS,
    Envelope,
    Error,
    EvalResult,
    Evaluate,
    Fit,
    FitResult,
    Hello,
    Info,
    Message,
    Ping,
    Pong,
    decode,
    encode,
)
from .training import evaluate, train
from .transport import connection_options, receive, server_tls

__all__ = ["Worker", "load_shard", "model_factories", "run_worker"]

logger = logging.getLogger("syncfed.worker")


LOOPBACK = ("localhost", "127.0.0.1", "::1")
#: Seconds a peer has to answer the authentication challenge.
AUTH_TIMEOUT = 10.0


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


def load_shard(config: WorkerConfig) -> Dataset:
    """Load what this worker holds: the test set, or its classes of the training set."""
    if config.testing:
        data = load_dataset(config.dataset, "test", config.data_dir, download=config.download)
    else:
        data = load_dataset(config.dataset, "train", config.data_dir, download=config.download)
    classes = config.digits
    if classes is None and not config.testing:
        classes = default_classes(config.worker_id)
    return data if classes is None else data.subset(class_indices(data.labels, classes))


def model_factories(import_paths: tuple[str, ...]) -> dict[str, ModelFactory]:
    """The built-in models plus the user models this worker was started with."""
    factories = dict(MODELS)
    for path in import_paths:
        factories[path] = resolve_model(path)
    return factories


class Worker:
    """Serves fit, evaluate, hello and ping requests over its data."""

    def __init__(self, config: WorkerConfig, data: Dataset) -> None:
        self.config = config
        self.data = data
        self.factories = model_factories(config.models)
        self.device = torch.device("cuda" if config.cuda and torch.cuda.is_available() else "cpu")
        # One compute job at a time: it owns the cached models and the CPU.
        self._compute = asyncio.Lock()
        self._models: dict[str, nn.Module] = {}
        self._connections = 0
        self.token = auth.read_token(config.auth_token_file) if config.auth_token_file is not None else None

    def info(self) -> Info:
        return Info(
            worker_id=self.config.worker_id,
            role=self.config.role,
            dataset=self.data.name,
            input_shape=self.data.input_shape,
            num_classes=self.data.num_classes,
            histogram=tuple(self.data.histogram()),
            models=tuple(self.factories),
        )

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse the websocket handshake: HTTP 503 beyond ``max_connections``, HTTP 403
        for a client certificate whose common name is not on the allow-list."""
        if self._connections >= self.config.max_connections:
            logger.warning("refused a connection: %d connections already open", self._connections)
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
        self._connections += 1
        try:
            await session.run()
        finally:
            self._connections -= 1
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
        abandoned = threading.Event()
        async with self._compute:
            job = asyncio.get_running_loop().run_in_executor(None, self._compute_sync, message, abandoned)
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

    def _model(self, name: str) -> nn.Module:
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = self.factories[name]()
        return model

    def _compute_sync(self, message: Fit | Evaluate, abandoned: threading.Event) -> Message:
        model = self._model(message.model)
        try:
            set_weights(model, message.weights)
        except ModelError as exc:
            raise RequestFailed("incompatible", str(exc)) from None
        if isinstance(message, Fit):
            started = time.perf_counter()
            torch.manual_seed(message.plan.seed)  # dropout and other random layers
            result = train(
                model, self.data, message.plan, self.device, abandoned=abandoned, batch_delay=self.config.batch_delay
            )
            if not math.isfinite(result.loss):
                raise RequestFailed("internal", f"training diverged (loss {result.loss}); lower the learning rate")
            return FitResult(get_weights(model), len(self.data), result.loss, time.perf_counter() - started)
        outcome = evaluate(model, self.data, message.batch_size, self.device)
        return EvalResult(outcome.loss, outcome.correct, outcome.num_examples, tuple(outcome.predictions))


class _Session:
    """The state of one connection: handshake done, requests in flight."""

    def __init__(self, worker: Worker, connection: ServerConnection, peer: str) -> None:
        self.worker = worker
        self.connection = connection
        self.peer = peer
        self.greeted = False
        self.in_flight: dict[int, asyncio.Task[None]] = {}

    async def run(self) -> None:
        if self.worker.token is not None and not await self.authenticate(self.worker.token):
            return
        limit = self.worker.config.max_message_size
        while True:
            try:
                data = await receive(self.connection, limit)
            except ConnectionClosed:
                return
            except MessageTooLarge as exc:  # the rest was read and dropped
                await self.reply_error(0, exc.code, str(exc), exc.size)
                continue
            logger.debug("message from %s: %d bytes", self.peer, len(data))
            try:
                envelope = decode(data)
            except ProtocolError as exc:
                await self.reply_error(exc.request_id or 0, exc.code, str(exc), len(data))
                continue
            failure = self.refusal(envelope)
            if failure is not None:
                await self.reply_error(envelope.id, *failure, len(data))
                continue
            self.dispatch(envelope, len(data))

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
            async with asyncio.timeout(AUTH_TIMEOUT):
                await self.connection.send(frame)
                response = await receive(self.connection, auth.MAX_AUTH_FRAME)
                client_nonce = auth.verify_response(token, nonce, response)
                await self.connection.send(auth.confirm(token, nonce, client_nonce))
        except ConnectionClosed:
            return False
        except (TimeoutError, MessageTooLarge, AuthenticationFailed) as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            logger.warning("%s failed authentication: %s", self.peer, reason)
            await self.connection.close(CloseCode.POLICY_VIOLATION, f"authentication failed: {reason}"[:120])
            return False
        protocol.max_message_size, protocol.max_fragment_size = limits
        return True

    def refusal(self, envelope: Envelope) -> tuple[str, str] | None:
        """The error code and reason for a request the session's rules refuse, if any."""
        request_id, message = envelope.id, envelope.message
        limit = self.worker.config.max_in_flight
        if message.kind not in REQUESTS:
            return "unknown_kind", f"message kind {message.kind!r} is not a request"
        if request_id == 0:
            return "malformed", "request id 0 is reserved for unattributable errors"
        if not self.greeted and not isinstance(message, Hello):
            return "out_of_order", f"{message.kind} before hello"
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

    async def serve(self, request_id: int, message: Message, size: int) -> None:
        started = time.perf_counter()
        try:
            reply = await self.answer(message)
        except RequestFailed as exc:
            await self.reply_error(request_id, exc.code, exc.reason, size)
            return
        except Exception:
            logger.exception("%s from %s failed", message.kind, self.peer)
            await self.reply_error(request_id, "internal", f"{message.kind} failed on the worker", size)
            return
        sent = await self.send(request_id, reply)
        log = logger.debug if isinstance(message, Ping) else logger.info
        log(
            "%s from %s: %d bytes in, %d bytes out, %.3f s",
            message.kind,
            self.peer,
            size,
            sent,
            time.perf_counter() - started,
        )

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
        return Pong()

    async def reply_error(self, request_id: int, code: str, reason: str, size: int) -> None:
        logger.warning(
            "error reply to %s (request %d, %d bytes in): %s: %s", self.peer, request_id, size, code, reason[:1000]
        )
        await self.send(request_id, Error(code, reason[:1000]))

    async def send(self, request_id: int, message: Message) -> int:
        try:
            data = encode(request_id, message)
        except TensorError as exc:  # e.g. a user model with a dtype the wire does not carry
            logger.error("cannot encode the %s reply to %s: %s", message.kind, self.peer, exc)
            data = encode(request_id, Error("internal", f"cannot encode the {message.kind} reply: {exc}"[:1000]))
        try:
            await self.connection.send(data)
        except ConnectionClosed:
            logger.info("%s left before the reply to request %d", self.peer, request_id)
        return len(data)

    def abandon(self) -> None:
        """Cancel what is still in flight for a closed connection."""
        for task in list(self.in_flight.values()):
            task.cancel()


async def run_worker(config: WorkerConfig, data: Dataset, *, ready: Callable[[str], None] = print) -> None:
    """Serve ``data`` until cancelled; ``ready`` gets the line naming the bound address."""
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
        worker.handle, config.host, config.port, process_request=worker.admit, ssl=tls, **options
    ) as server:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        scheme = "wss" if tls is not None else "ws"
        ready(f"syncfed worker {config.worker_id} listening on {scheme}://{host}:{port}")
        await server.serve_forever()
