"""The coordinator's side of workers that dial out: a listener that proves who dials, and links over them.

A site that opens no inbound port runs its worker with ``--connect``; the
worker opens the connection, and from then on nothing differs: the
coordinator sends requests and the worker replies, through the same
:class:`~syncfed.net.link.WorkerLink` code. The listener hands a connection
to its link only once the id it claims (the ``Syncfed-Worker`` header) is
one of the run's, is proven (the client certificate's common name, or the
worker's own token in the challenge of :mod:`syncfed.auth`, run the other way
round), and is not connected already: the first connection is kept.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from .. import auth
from ..admission import Admission
from ..exceptions import AuthenticationFailed, MessageTooLarge, WorkerUnavailable
from .link import WorkerLink
from .reader import ChunkedServerConnection
from .transport import common_name, connection_options, receive, small_frames

__all__ = ["DialInLink", "DialInListener"]

logger = logging.getLogger("syncfed.coordinator")


class DialInLink(WorkerLink):
    """A link whose connection comes from the worker, handed over by :class:`DialInListener`."""

    def __init__(self, name: str, uri: str, **settings: Any) -> None:
        super().__init__(name, uri, **settings)
        self._arrived: Connection | None = None
        self._arrival = asyncio.Event()

    @property
    def busy(self) -> bool:
        """Whether a connection of this worker is in use or waiting to be: a second one is refused."""
        return self.connected or (self._arrived is not None and self._arrived.state is State.OPEN)

    def offer(self, connection: Connection) -> bool:
        """Take a proven connection for the next :meth:`connect`; False while another is in use or waiting."""
        if self.busy:
            return False
        self._arrived = connection
        self._arrival.set()
        return True

    def withdraw(self, connection: Connection) -> None:
        """``connection`` closed: if it was still waiting, forget it."""
        if self._arrived is connection:
            self._arrived = None
            self._arrival.clear()

    async def connect(self, *, wait_for_start: bool = True) -> None:
        """Use the connection the worker opened; at the start, wait up to ``connect_timeout`` for it.

        A rejoin passes ``wait_for_start=False``: the pool's backoff paces it.

        Raises:
            WorkerUnavailable: if the worker has not dialed in (within ``connect_timeout`` at the start).
        """
        if self._arrived is None and wait_for_start:
            logger.warning("waiting for %s to dial in, up to %g s", self.name, self.connect_timeout)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._arrival.wait()
            except TimeoutError:
                raise WorkerUnavailable(self.name, f"did not dial in within {self.connect_timeout:g} s") from None
        connection, self._arrived = self._arrived, None
        self._arrival.clear()
        if connection is None or connection.state is not State.OPEN:
            raise WorkerUnavailable(self.name, "has not dialed in again")
        self._attach(connection)

    async def refuse(self, reason: str) -> None:
        """Close with code 1008 and ``reason``, which the worker prints: it will not dial again."""
        self._closing = reason
        if self._connection is not None:
            await self._connection.close(CloseCode.POLICY_VIOLATION, reason[:120])
        if self._reader is not None:
            await self._reader


class DialInListener:
    """Accepts the run's dial-in workers on ``host:port`` and hands each proven connection to its link.

    Usage::

        listener = DialInListener(links, host="0.0.0.0", port=8765, tokens=tokens, report=print)
        uri = await listener.open()
        ...
        await listener.close()
    """

    def __init__(
        self,
        links: Mapping[str, DialInLink],
        *,
        host: str,
        port: int,
        report: Callable[[str], None],
        # Security
        tokens: Mapping[str, bytes] | None = None,  # each worker's token; None: no token handshake
        tls: ssl.SSLContext | None = None,  # wss://; with verify_mode CERT_REQUIRED, ids come from certificates
        # Limits
        max_message_size: int,
        max_pending: int = 64,
        # Timeouts
        handshake_timeout: float = 10.0,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
    ) -> None:
        self.links = links
        self.host, self.port = host, port
        self.report = report
        self.tokens = tokens
        self.tls = tls
        self.certified = tls is not None and tls.verify_mode == ssl.CERT_REQUIRED
        self.max_message_size = max_message_size
        self.handshake_timeout = handshake_timeout
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        # One slot per dial-in worker; proving connections wait in a bounded queue (see syncfed.admission).
        self.admission: Admission[ServerConnection] = Admission(max_connections=len(links), max_pending=max_pending)
        self._server: Server | None = None

    async def open(self) -> str:
        """Start listening; return the address bound (``ws://`` or ``wss://``, host and port)."""
        self._server = await serve(
            self.handle,
            self.host,
            self.port,
            process_request=self.admit,
            ssl=self.tls,
            open_timeout=self.handshake_timeout,  # the TLS handshake and the HTTP upgrade, each
            close_timeout=1.0,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            create_connection=ChunkedServerConnection,
            **connection_options(self.max_message_size),
        )
        host, port = next(iter(self._server.sockets)).getsockname()[:2]
        return f"{'wss' if self.tls is not None else 'ws'}://{host}:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse the HTTP upgrade of a claim that cannot stand: no id, one not in the run,
        one the client certificate does not name, or one already connected."""
        claims = request.headers.get_all(auth.WORKER_HEADER)
        if len(claims) != 1:
            reason = f"a dial-in worker must name its id in one {auth.WORKER_HEADER} header, not {len(claims)}"
            return self._refuse_upgrade(connection, HTTPStatus.BAD_REQUEST, reason)
        (claimed,) = claims
        link = self.links.get(claimed)
        if link is None:
            shown = repr(claimed[:64]) + ("..." if len(claimed) > 64 else "")  # a stranger's header, bounded
            return self._refuse_upgrade(connection, HTTPStatus.FORBIDDEN, f"worker {shown} is not in this run")
        if self.certified:
            certified = common_name(connection.transport.get_extra_info("peercert"))
            if certified != claimed:
                reason = f"a certificate for {certified!r} cannot claim worker id {claimed!r}"
                return self._refuse_upgrade(connection, HTTPStatus.FORBIDDEN, reason)
        if link.busy:
            reason = f"worker {claimed} is already connected"
            return self._refuse_upgrade(connection, HTTPStatus.CONFLICT, reason)
        return None

    async def handle(self, connection: ServerConnection) -> None:
        """Prove the token when there are tokens, hand the connection over, and hold it open until it closes."""
        assert connection.request is not None  # admit() saw the header
        name = connection.request.headers[auth.WORKER_HEADER]
        link = self.links[name]
        evicted = self.admission.arrive(connection)
        if evicted is not None:
            logger.warning("dropped %s: %d dial-ins still authenticating", _peer(evicted), self.admission.max_pending)
            evicted.transport.abort()
        try:
            if self.tokens is not None and not await self._authenticate(connection, name, self.tokens[name]):
                return
            if not self.admission.authenticate(connection) or not link.offer(connection):
                await self._refuse(connection, name, f"worker {name} is already connected")
                return
            logger.info("%s dialed in from %s", name, _peer(connection))
            await connection.wait_closed()
        finally:
            self.admission.leave(connection)
            link.withdraw(connection)

    async def _authenticate(self, connection: ServerConnection, name: str, token: bytes) -> bool:
        """Challenge the worker for its own token; the MACs also cover the id it claims."""
        context = auth.dial_in_context(name)
        frame, nonce = auth.challenge()
        try:
            with small_frames(connection, auth.MAX_AUTH_FRAME):
                async with asyncio.timeout(self.handshake_timeout):
                    await connection.send(frame)
                    response = await receive(connection, auth.MAX_AUTH_FRAME)
                    worker_nonce = auth.verify_response(token, nonce, response, context=context)
                    await connection.send(auth.confirm(token, nonce, worker_nonce, context=context))
        except ConnectionClosed:
            return False
        except (TimeoutError, MessageTooLarge, AuthenticationFailed) as exc:
            why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            await self._refuse(connection, name, f"authentication failed: {why}")
            return False
        return True

    async def _refuse(self, connection: ServerConnection, name: str, reason: str) -> None:
        """Close an open connection with code 1008, ``reason`` to the worker and one line here."""
        self.report(f"Refused a dial-in from {_peer(connection)} claiming worker {name}: {reason}")
        self.admission.leave(connection)
        await connection.close(CloseCode.POLICY_VIOLATION, reason[:120])

    def _refuse_upgrade(self, connection: ServerConnection, status: HTTPStatus, reason: str) -> Response:
        self.report(f"Refused a dial-in from {_peer(connection)}: {reason}")
        return connection.respond(status, reason + "\n")


def _peer(connection: Connection) -> str:
    return "{}:{}".format(*connection.remote_address[:2]) if connection.remote_address else "?"
