"""The coordinator's side of one worker connection: requests matched to replies by id.

Named a *link* because in federated learning "client" means the worker; the
old name :class:`WorkerClient` stays an alias for one release.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import random
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.frames import CloseCode

from .. import auth
from ..config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT, DEFAULT_REQUEST_TIMEOUT
from ..exceptions import (
    AuthenticationFailed,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    SyncfedError,
    WorkerTimeout,
    WorkerUnavailable,
)
from ..policy import with_terms
from ..protocol import (
    DEFAULT_CHUNK_SIZE,
    Error,
    Message,
    MessageDecoder,
    Opened,
    Outgoing,
    Route,
    Sink,
    Terms,
    encode_fragments,
    reply_kind,
)
from .reader import ChunkedClientConnection
from .transport import connection_options, off_loop, receive, receive_message, send_message

__all__ = ["LinkSettings", "WorkerLink", "WorkerClient", "ping"]

#: Streamed requests a coordinator sends at once (see :attr:`LinkSettings.sends`).
SEND_SLOTS = 4

logger = logging.getLogger("syncfed.client")  # the name it had before the move: --verbose lines are unchanged


@dataclass(frozen=True)
class LinkSettings:
    """What every link of one coordinator-side tool shares: limits, timeouts and credentials.

    The coordinator, ``--status`` and ``python -m syncfed analytics`` each
    build one and make their links with :meth:`WorkerLink.from_settings`, so
    a new setting is added in one place.
    """

    # Limits
    max_message_size: int
    chunk_size: int = DEFAULT_CHUNK_SIZE  # larger requests are streamed in fragments of this size
    # Timeouts
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    ping_interval: float | None = DEFAULT_PING_INTERVAL  # None: no liveness pings
    ping_timeout: float | None = DEFAULT_PING_TIMEOUT
    # Security
    tls: ssl.SSLContext | None = None  # for wss:// workers; None: the system's CAs
    auth_token: bytes | None = None  # answer the workers' token challenge with this
    #: Streamed requests sent at once over all the links made from these settings: each holds a frame and its
    #: masked copy in memory, so a model sent to 30 workers at once raised the coordinator's peak by half a model.
    sends: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(SEND_SLOTS), compare=False)


def _refused_everywhere(exc: OSError) -> bool:
    """Whether every address of the worker refused the connection: nothing listens there (yet).

    asyncio joins one failure per address (``localhost`` may be ``::1`` and
    ``127.0.0.1``) into a plain ``OSError("Multiple exceptions: ...")``.
    """
    if isinstance(exc, ConnectionRefusedError):
        return True
    text = str(exc)
    codes = re.findall(r"\[Errno (\d+)\]", text)
    return text.startswith("Multiple exceptions") and bool(codes) and all(int(c) == errno.ECONNREFUSED for c in codes)


async def _send_whole(connection: Connection, outgoing: Outgoing, sends: asyncio.Semaphore | None = None) -> None:
    """Send ``outgoing``, finishing it even when the request is given up midway (aborted, timed out);
    a streamed one once ``sends`` has a slot free.

    A streamed message cut off after its first fragment leaves the connection unusable
    (:func:`~syncfed.net.transport.send_message` then aborts it): the worker would be lost to a
    cancelled request. Sent whole, its late reply is dropped like
    any reply to a request that gave up (:meth:`WorkerLink._deliver`), and the connection goes on.
    """
    if not outgoing.streamed:  # one frame goes out whole or not at all: sent in the request's own task
        await send_message(connection, outgoing)
        return
    sending = asyncio.ensure_future(_send_in_slot(connection, outgoing, sends))
    try:
        await asyncio.shield(sending)
    except asyncio.CancelledError:
        # Its failure, if any (the connection closing), is the connection's news, not this request's.
        sending.add_done_callback(lambda task: None if task.cancelled() else task.exception())
        raise


async def _send_in_slot(connection: Connection, outgoing: Outgoing, sends: asyncio.Semaphore | None) -> None:
    """Send a streamed ``outgoing`` once ``sends`` (when given) has a slot free, holding it until sent."""
    async with sends or contextlib.nullcontext():
        await send_message(connection, outgoing)


def _settle(future: asyncio.Future[Message], outcome: Message | Exception) -> None:
    """Give a waiting request its reply or its failure, unless it has given up already."""
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _forsake(future: asyncio.Future[Message]) -> None:
    """Let go of a request's reply: its failure, set while the request itself failed (the reader saw the
    connection end while the send was still going), is known already and must not be logged as unretrieved."""
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


class WorkerLink:
    """One connection to a worker; several requests may be in flight at once.

    Usage::

        async with WorkerLink("alice", "ws://localhost:8777") as alice:
            info = await alice.request(Hello())
    """

    def __init__(
        self,
        name: str,
        uri: str,
        *,
        # Limits
        max_message_size: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        # Timeouts
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        retry_delay: float = 0.1,
        max_retry_delay: float = 2.0,
        # Security
        tls: ssl.SSLContext | None = None,
        auth_token: bytes | None = None,
        sends: asyncio.Semaphore | None = None,
    ) -> None:
        self.name = name
        self.uri = uri
        self.max_message_size = max_message_size
        self.chunk_size = chunk_size  # larger requests are streamed in fragments of this size
        self.connect_timeout = connect_timeout
        # A refused connection is tried again, retry_delay doubling up to max_retry_delay: the worker may be starting.
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.request_timeout = request_timeout
        # Liveness: websockets pings every ping_interval and drops the
        # connection when a pong is ping_timeout late. A training worker
        # answers pings (it trains in a thread); a frozen or dead one does not.
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.tls = tls
        self.auth_token = auth_token
        self.sends = sends  # shared with other links: streamed requests sent at once (LinkSettings.sends)
        self._connection: Connection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._routes: dict[int, Route] = {}  # where a pending request's streamed reply may go as it arrives
        self._ids = itertools.count(1)
        self._closed_reason = "not connected"
        self._closing: str | None = None  # why we are closing, when it is our doing
        self.bytes_sent = 0  # message bytes over all connections, for metrics
        self.bytes_received = 0
        self.last_heard: float | None = None  # when the worker last sent a message (time.time())
        #: The job's terms, which every fit, evaluate and query declares once the worker accepted them.
        self.terms: Terms | None = None

    @classmethod
    def from_settings(cls, name: str, uri: str, settings: LinkSettings) -> WorkerLink:
        """A link to worker ``name`` at ``uri`` with the shared ``settings``; not connected yet."""
        return cls(
            name,
            uri,
            max_message_size=settings.max_message_size,
            chunk_size=settings.chunk_size,
            connect_timeout=settings.connect_timeout,
            request_timeout=settings.request_timeout,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            tls=settings.tls,
            auth_token=settings.auth_token,
            sends=settings.sends,
        )

    async def __aenter__(self) -> WorkerLink:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self, *, wait_for_start: bool = True) -> None:
        """Open the connection: TLS for wss:// addresses, then the token handshake when one is set.

        While nothing listens (``wait_for_start``: the worker may be starting), try again with backoff until
        ``connect_timeout``, saying once whom it waits for. A rejoin passes ``False``: it has a backoff of its own.

        Raises:
            WorkerUnavailable: if the worker cannot be reached within ``connect_timeout``.
            AuthenticationFailed: if the worker's certificate does not verify, or either side
                refuses the other (client certificate, allow-list, token).
        """
        secure = self.uri.startswith("wss://")
        refused = False
        try:
            async with asyncio.timeout(self.connect_timeout):
                delay = self.retry_delay
                while True:
                    try:
                        connection = await connect(
                            self.uri,
                            open_timeout=None,
                            # Short: on a missed pong websockets waits this long for a
                            # closing handshake the frozen peer cannot answer.
                            close_timeout=1.0,
                            ping_interval=self.ping_interval,
                            ping_timeout=self.ping_timeout,
                            ssl=(self.tls or ssl.create_default_context()) if secure else None,
                            create_connection=ChunkedClientConnection,
                            **connection_options(self.max_message_size),
                        )
                        break
                    except OSError as exc:
                        if not (wait_for_start and _refused_everywhere(exc)):
                            raise
                        if not refused:
                            logger.warning(
                                "waiting for %s at %s (connection refused), up to %g s",
                                self.name,
                                urlsplit(self.uri).netloc or self.uri,
                                self.connect_timeout,
                            )
                            refused = True
                        await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: workers started together
                        delay = min(2 * delay, self.max_retry_delay)
                if self.auth_token is not None:
                    try:
                        await self._authenticate(connection, self.auth_token)
                    except BaseException:
                        connection.transport.abort()  # never leave a half-authenticated connection open
                        raise
                self._connection = connection
        except TimeoutError:
            why = " (connection refused)" if refused else ""
            raise WorkerUnavailable(
                self.name, f"no connection to {self.uri} within {self.connect_timeout:g} s{why}"
            ) from None
        except (ssl.SSLError, InvalidStatus, InvalidMessage) as exc:
            raise _handshake_failure(self.name, self.uri, exc) from None
        except (OSError, ConnectionClosed) as exc:
            raise WorkerUnavailable(self.name, f"cannot connect to {self.uri}: {exc}") from None
        except (AuthenticationFailed, WorkerUnavailable):
            raise
        except Exception as exc:  # invalid URI or handshake: websockets raises several types
            raise WorkerUnavailable(self.name, f"cannot connect to {self.uri}: {exc}") from None
        self._attach(self._connection)

    def _attach(self, connection: Connection) -> None:
        """Serve requests over an open, authenticated ``connection``: start reading its replies."""
        self._connection = connection
        self._closing = None
        self._reader = asyncio.create_task(self._read_replies(connection))

    async def _authenticate(self, connection: ClientConnection, token: bytes) -> None:
        """Answer the worker's challenge and check its proof; see :mod:`syncfed.auth`."""
        try:
            frame, worker_nonce, own_nonce = auth.respond(token, await receive(connection, auth.MAX_AUTH_FRAME))
            await connection.send(frame)
            auth.verify_confirmation(token, worker_nonce, own_nonce, await receive(connection, auth.MAX_AUTH_FRAME))
        except ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code != CloseCode.POLICY_VIOLATION:
                # Dropped, e.g. from a worker's full queue of connections still authenticating: not a refusal.
                raise WorkerUnavailable(self.name, f"connection lost while authenticating ({exc})") from None
            reason = exc.rcvd.reason or "connection closed"
            raise AuthenticationFailed(f"worker {self.name} refused this coordinator: {reason}") from None
        except (AuthenticationFailed, MessageTooLarge) as exc:
            await connection.close(CloseCode.POLICY_VIOLATION, "authentication failed")
            raise AuthenticationFailed(f"worker {self.name} failed authentication: {exc}") from None

    @property
    def connected(self) -> bool:
        """Whether requests can be sent now."""
        return self._connection is not None and self._reader is not None and not self._reader.done()

    @property
    def closed_reason(self) -> str:
        return self._closed_reason

    async def close(self, reason: str = "connection closed by the coordinator") -> None:
        """Close the connection (the worker abandons what it was doing for us); idempotent."""
        if self.connected:
            self._closing = reason
        if self._connection is not None:
            await self._connection.close()
        if self._reader is not None:
            await self._reader

    async def request(self, message: Message, *, timeout: float | None = None, route: Route | None = None) -> Message:
        """Send a request and wait for its reply; ``route`` may take a streamed reply's tensors as they arrive.

        Raises:
            RemoteError: if the worker answered with an error reply.
            WorkerUnavailable: if the connection is gone or the reply is late.
            ProtocolError: if the reply is of the wrong kind.
        """
        if self._connection is None or self._reader is None or self._reader.done():
            raise WorkerUnavailable(self.name, self._closed_reason)
        message = with_terms(message, self.terms)
        request_id = next(self._ids)
        reply: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        if route is not None:
            self._routes[request_id] = route
        limit = self.request_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                outgoing = encode_fragments(request_id, message, chunk_size=self.chunk_size)
                await _send_whole(self._connection, outgoing, self.sends)
                self.bytes_sent += outgoing.size
                answer = await reply
        except TimeoutError:
            raise WorkerTimeout(self.name, f"no reply to {message.kind} within {limit:g} s") from None
        except ConnectionClosed:
            raise WorkerUnavailable(self.name, self._closed_reason) from None
        finally:
            self._pending.pop(request_id, None)
            self._routes.pop(request_id, None)
            _forsake(reply)
        if isinstance(answer, Error):
            raise RemoteError(self.name, answer.code, answer.reason)
        expected = reply_kind(message)
        if answer.kind != expected:
            raise RemoteProtocolError(f"{self.name} answered {message.kind} with {answer.kind}, expected {expected}")
        return answer

    async def _read_replies(self, connection: Connection) -> None:
        """Route each reply to the request waiting for it; fail them all when the connection ends."""
        failure: Exception = WorkerUnavailable(self.name, "connection closed")
        try:
            while True:
                await self._deliver(await receive_message(connection, self.max_message_size, route=self._route))
        except ConnectionClosed as exc:
            if self._closing is not None:
                self._closed_reason = self._closing
            elif "keepalive ping timeout" in str(exc):
                self._closed_reason = f"no answer to pings for {self.ping_timeout:g} s (frozen or gone)"
            else:
                self._closed_reason = f"connection lost ({exc})"
            failure = WorkerUnavailable(self.name, self._closed_reason)
        except ProtocolError as exc:
            self._closed_reason = f"sent an invalid reply: {exc}"
            failure = WorkerUnavailable(self.name, self._closed_reason)
            await connection.close(1002, "invalid reply")
        finally:
            # Whatever ended the loop, nobody may wait for a reply that cannot come.
            for request_id in list(self._pending):
                _settle(self._pending.pop(request_id), failure)

    def _route(self, opened: Opened, entries: Sequence[dict[str, Any]]) -> Sink | None:
        """The sink of the request ``opened`` answers, if that request gave a route and it takes the reply."""
        route = self._routes.get(opened.id)
        return None if route is None else route(opened, entries)

    async def _deliver(self, incoming: MessageDecoder) -> None:
        """Hand one received reply to the request waiting for it.

        A method of its own so that nothing of the reply outlives the call:
        a loop's variables would hold each connection's last reply, a whole
        model, until the next one arrives.

        Raises:
            ProtocolError: if the reply is invalid and no request can take the blame.
        """
        self.bytes_received += incoming.size
        self.last_heard = time.time()
        try:
            envelope = await off_loop(incoming.size, incoming.finish)  # a large reply decodes in a thread
        except ProtocolError as exc:
            if exc.request_id in self._pending:
                _settle(self._pending.pop(exc.request_id), exc)
                return
            if incoming.frame is not None and auth.is_challenge(incoming.frame):
                raise ProtocolError("it requires a shared token: pass --auth-token-file") from None
            raise
        if envelope.id in self._pending:
            _settle(self._pending.pop(envelope.id), envelope.message)
        elif envelope.id == 0 and isinstance(envelope.message, Error):
            # The worker could not tell which request it refuses (e.g. too_large with no readable id):
            # any of those in flight may be the one, and none would get a reply, so all fail now.
            error = envelope.message
            logger.warning(
                "%s: error %s with id 0 fails %d requests: %s", self.name, error.code, len(self._pending), error.reason
            )
            for request_id in list(self._pending):
                _settle(self._pending.pop(request_id), RemoteError(self.name, error.code, error.reason))
        elif isinstance(envelope.message, Error):
            logger.warning("%s: error %s: %s", self.name, envelope.message.code, envelope.message.reason)
        else:  # a reply to a request that timed out
            logger.debug("%s: dropped late reply to request %d", self.name, envelope.id)


def _handshake_failure(name: str, uri: str, exc: ssl.SSLError | InvalidStatus | InvalidMessage) -> SyncfedError:
    """What a failed TLS or websocket handshake with worker ``name`` at ``uri`` means: the error to raise."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return AuthenticationFailed(f"worker {name} at {uri} failed certificate verification: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return AuthenticationFailed(
            f"worker {name} at {uri} refused the TLS handshake ({exc.reason});"
            " it may require a client certificate: pass --tls-cert and --tls-key"
        )
    if isinstance(exc, InvalidStatus):
        status, body = exc.response.status_code, exc.response.body.decode(errors="replace").strip()
        if status == 403:
            return AuthenticationFailed(f"worker {name} refused this coordinator: {body}")
        return WorkerUnavailable(name, f"{uri} answered HTTP {status}: {body}")
    if uri.startswith("wss://"):
        # Under TLS 1.3 a refused client certificate shows up here: the
        # worker hangs up after the TLS handshake, before answering HTTP.
        return AuthenticationFailed(
            f"worker {name} at {uri} hung up after the TLS handshake: it did not accept this"
            " coordinator's client certificate (pass --tls-cert and --tls-key signed by its CA)"
        )
    return WorkerUnavailable(name, f"{uri} did not answer a websocket handshake (is it a wss:// worker?)")


async def ping(link: WorkerLink, *, timeout: float) -> float:
    """A websocket ping over ``link``: the round trip in seconds. The job service keeps an idle worker's figures so.

    Raises:
        WorkerUnavailable: if the connection is gone.
        WorkerTimeout: if no pong came within ``timeout``.
    """
    connection = link._connection
    if connection is None or not link.connected:
        raise WorkerUnavailable(link.name, link.closed_reason)
    try:
        async with asyncio.timeout(timeout):
            return await (await connection.ping())
    except TimeoutError:
        raise WorkerTimeout(link.name, f"no pong within {timeout:g} s") from None
    except ConnectionClosed:
        raise WorkerUnavailable(link.name, link.closed_reason) from None


#: The old name, kept for one release: "client" meant three different things.
WorkerClient = WorkerLink
