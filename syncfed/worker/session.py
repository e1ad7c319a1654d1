"""One connection to a worker: the I/O around its session rules.

In the manner of websockets' ``asyncio/connection.py``, this layer only moves
messages: it reads each one, asks the pure :class:`~syncfed.protocol.session_rules.SessionRules`
whether it is served, runs what is served in a task of its own, looked up by
kind in one table (:attr:`Session.handlers`), and sends the reply or the
error reply. A bad request gets an error reply and the session keeps serving.
Authentication, connection slots and the idle clock are settled here too,
as they decide when the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from .. import auth
from ..admission import IdleClock
from ..exceptions import AuthenticationFailed, MessageTooLarge, ProtocolError, RequestFailed, TensorError
from ..net.transport import common_name, off_loop, receive, receive_message, send_message, small_frames
from ..protocol import (
    Accepted,
    Describe,
    Envelope,
    Error,
    Evaluate,
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    Hello,
    Message,
    MessageDecoder,
    ModelLayout,
    Ping,
    Pong,
    Propose,
    Query,
    SecAggMask,
    SecAggShare,
    SecAggStart,
    SecAggUnmask,
    encode_fragments,
)
from ..protocol.session_rules import SessionRules
from .policy_gate import PolicyGate
from .secure_steps import SecureSteps

if TYPE_CHECKING:
    from .server import Worker

__all__ = ["Handler", "Session"]

logger = logging.getLogger("syncfed.worker")

#: What serves one kind of request: the request in, the reply out (or :class:`RequestFailed`).
Handler = Callable[[Any], Awaitable[Message]]


class Session:
    """One connection: authentication, its slot, its idle clock, and its requests as its rules allow."""

    def __init__(self, worker: Worker, connection: Connection, peer: str) -> None:
        self.worker = worker
        self.connection = connection
        self.peer = peer
        config = worker.config
        self.rules = SessionRules(max_in_flight=config.max_in_flight)
        self.tasks: set[asyncio.Task[None]] = set()  # the requests in flight, to cancel when the peer leaves
        self.clock = IdleClock(
            time.monotonic(), handshake_timeout=config.handshake_timeout, idle_timeout=config.idle_timeout
        )
        steps = SecureSteps(config, worker.compute, self.rules)
        self.gate = PolicyGate(worker)  # what a site with a policy accepted on this connection
        # One table from request kind to what serves it (NVFlare's ``execute(task_name, ...)``);
        # fetch is not computed but handed over by the rules (see ``reply_for``).
        self.handlers: dict[str, Handler] = {
            Hello.kind: self.greet,
            Ping.kind: self.pong,
            Fit.kind: worker.compute.run,
            Evaluate.kind: worker.compute.run,
            Describe.kind: self.describe,
            Query.kind: worker.compute.query,
            SecAggStart.kind: steps.run,
            SecAggShare.kind: steps.run,
            SecAggMask.kind: steps.run,
            SecAggUnmask.kind: steps.run,
            Propose.kind: self.accept,
        }

    @property
    def coordinator(self) -> str | None:
        """The name the peer's verified certificate proves: a listening worker's client, a dial-out worker's server."""
        return common_name(self.connection.transport.get_extra_info("peercert"))

    async def run(self, *, authenticated: bool = False) -> None:
        """Authenticate, then serve requests until the connection closes.

        A connection takes one of the worker's ``max_connections`` slots once it
        has authenticated: by the token when the worker has one, else by its
        client certificate under mutual TLS (checked before this runs), else
        by a valid ``hello``, the most a worker without either can ask.
        ``authenticated``: the peer already proved itself (a connection the worker dialed out on).
        """
        config = self.worker.config
        if authenticated:
            if not await self.enter():
                return
        elif self.worker.token is not None:
            if not await self.authenticate(self.worker.token) or not await self.enter():
                return
        elif config.tls_ca is not None and not await self.enter():
            return
        watchdog = asyncio.create_task(self.watch())
        try:
            while True:
                try:
                    await self.handle_message(await self.receive())
                except ConnectionClosed:
                    return
                if self.rules.greeted and not self.worker.admission.admitted(self) and not await self.enter():
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
            authenticated = self.worker.admission.admitted(self)
            deadline = self.clock.deadline(time.monotonic(), authenticated=authenticated, busy=self.rules.busy)
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

    async def authenticate(self, token: bytes) -> bool:
        """Challenge the peer for the shared token before reading any application message.

        Until it answers, websockets itself refuses frames over the handshake's
        size, so an unauthenticated peer cannot make the worker buffer a large message.
        """
        frame, nonce = auth.challenge()
        try:
            with small_frames(self.connection, auth.MAX_AUTH_FRAME):
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
        return True

    async def handle_message(self, incoming: MessageDecoder) -> None:
        """Check one received message against the session's rules, then start it, or send why it is refused.

        A method of its own so that nothing of the request outlives its
        task: a loop's variables would hold the last one, a whole model,
        until the next request arrives.
        """
        logger.debug("message from %s: %d bytes", self.peer, incoming.size)
        try:
            # The session's rules see the envelope before the body is built: building may cost more.
            opened = await off_loop(incoming.size, incoming.open)
            try:
                self.rules.check_envelope(opened.id, opened.kind)
            except RequestFailed as exc:
                await self.reply_error(opened.id, exc.code, exc.reason, incoming.size)
                return
            envelope = await off_loop(incoming.size, opened.build)
        except ProtocolError as exc:  # MessageTooLarge too: the rest was read and dropped
            await self.reply_error(exc.request_id or 0, exc.code, str(exc), incoming.size)
            return
        self.start_request(envelope, incoming.size)

    def start_request(self, envelope: Envelope, size: int) -> None:
        """Count an admitted request in flight and run it in a task of its own."""
        request_id, message = envelope.id, envelope.message
        # Started here, not in the task, so requests pipelined after hello are admitted.
        self.rules.start(request_id, message)
        task = asyncio.create_task(self.run_request(request_id, message, size))
        self.tasks.add(task)
        task.add_done_callback(lambda _: self.finish_request(request_id, task))
        if not isinstance(message, Ping):  # pings keep no connection from being idle
            task.add_done_callback(self.served)

    def finish_request(self, request_id: int, task: asyncio.Task[None]) -> None:
        """A request's task ended, answered or cancelled: its id is free again."""
        self.rules.finish(request_id)
        self.tasks.discard(task)

    async def run_request(self, request_id: int, message: Message, size: int) -> None:
        """Serve one request to the end: its reply, or an error reply, sent and logged."""
        started = time.perf_counter()
        try:
            reply, compression = await self.reply_for(message)
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

    async def reply_for(self, message: Message) -> tuple[Message, str]:
        """The reply to ``message`` and the encoding of its float tensors.

        A fit reply goes in the encoding its plan asked for (compressing is
        part of encoding), now or, when the plan holds it, once fetched.
        """
        if isinstance(message, Fetch):
            held = self.rules.fetch(message.token)
            return held.reply, held.compression
        reply = await self.compute_reply(message)
        if not isinstance(message, Fit):
            return reply, "none"
        if not message.plan.hold:
            return reply, message.plan.compress
        assert isinstance(reply, FitResult)
        token, dropped = self.rules.hold(reply, message.plan.compress)
        if dropped is not None:
            logger.warning("%s never fetched update %d: dropped for a newer one", self.peer, dropped)
        return FitHeld(token), "none"

    async def compute_reply(self, message: Message) -> Message:
        """What the handler of ``message``'s kind answers, once the site's policy allows it."""
        if self.worker.policy is not None:
            self.gate.judge(message, coordinator=self.coordinator, peer=self.peer)
        return await self.handlers[message.kind](message)

    async def accept(self, message: Propose) -> Message:
        """Propose: the job's terms, checked by :meth:`judge` when the site has a policy."""
        logger.info("%s proposed %s", self.peer, message.terms.describe())
        return Accepted()

    async def greet(self, message: Hello) -> Message:
        """Hello: what this worker serves, when the peer speaks its protocol version."""
        self.rules.check_hello(message)
        return self.worker.info()

    async def pong(self, _: Ping) -> Message:
        """Ping: proof of life, at the application level."""
        return Pong()

    async def describe(self, message: Describe) -> ModelLayout:
        """Describe: the layout of a model this worker serves."""
        return self.worker.compute.describe(message)

    async def reply_error(self, request_id: int, code: str, reason: str, size: int) -> None:
        """Send an error reply, logged: failures cross the wire as data, never as a traceback."""
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
        for task in list(self.tasks):
            task.cancel()
