"""A worker that dials out: it connects to the coordinator's ``--listen`` address and serves there.

For sites that open no inbound port. Who opens the connection changes, the
protocol does not: once the coordinator has proven itself (its TLS
certificate, or the token's confirmation) and the worker its id (its client
certificate, or its token), the coordinator sends requests and
:meth:`Worker.handle` answers them, as on a listening worker, with the same
limits. See docs/protocol.md, "Dial-out workers".

Usage::

    config = WorkerConfig("alice", connect="wss://coordinator.example.org:8765", auth_token_file=Path("alice.token"))
    asyncio.run(dial_out(Worker(config, load_holdings(config))))
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode

from .. import auth
from ..exceptions import AuthenticationFailed, MessageTooLarge
from ..net.reader import ChunkedClientConnection
from ..net.transport import client_tls, common_name, connection_options, receive, small_frames
from ..redial import Redial
from .server import LOOPBACK, Worker, logger

__all__ = ["dial_out"]

#: HTTP answers that refuse this worker for good (an id not in the run, a certificate for another, one
#: already connected): dialing again would only be refused again. Others (503, say) are tried again.
_REFUSED = (400, 403, 409)


async def dial_out(worker: Worker, *, report: Callable[[str], None] = print, redial: Redial | None = None) -> None:
    """Dial ``worker.config.connect`` and serve, dialing again with backoff, until cancelled.

    ``report`` gets one line per change of state (connected, lost, unreachable), never one per attempt.

    Raises:
        AuthenticationFailed: if the coordinator refused this worker (its token, its certificate, its id),
            or failed to prove itself: dialing again would not help.
        ConfigError: if the TLS files cannot be read.
    """
    config = worker.config
    uri = config.connect
    assert uri is not None, "dial_out serves a worker configured with connect"
    tls = client_tls(config.tls_ca, config.tls_cert, config.tls_key) if uri.startswith("wss://") else None
    redial = (
        redial if redial is not None else Redial(first=min(0.5, config.redial_max_delay), cap=config.redial_max_delay)
    )
    name = config.worker_id
    host = urlsplit(uri).hostname or ""
    if worker.token is None and tls is None and host not in LOOPBACK:
        logger.warning(
            "WORKER %s SERVES WHOEVER ANSWERS AT %s: nothing proves the coordinator (no TLS, no token), so anyone"
            " who can take that address trains on this data; use wss:// with --tls-ca (see python -m syncfed"
            " provision) or --auth-token-file",
            name.upper(),
            uri,
        )
    unreachable = False  # said once until the next connection, however many attempts fail
    while True:
        try:
            connection = await _dial(worker, uri, tls)
        except AuthenticationFailed:
            raise
        except Exception as exc:  # refused, reset, timed out, a bad handshake: websockets' errors share no base
            if not unreachable:
                report(f"{name}: cannot reach {uri} ({_why(exc)}), retrying with backoff up to {redial.cap:g} s")
                unreachable = True
            await asyncio.sleep(redial.next_delay())
            continue
        redial.reset()
        unreachable = False
        report(f"{name}: connected to {uri}")
        await worker.handle(connection, authenticated=True)
        await connection.wait_closed()
        refusal = _refusal(connection)
        if refusal is not None:
            raise _refused(name, uri, refusal)
        delay = redial.next_delay()
        report(f"{name}: connection lost ({_closed(connection)}), retrying in {delay:.1f} s")
        await asyncio.sleep(delay)


async def _dial(worker: Worker, uri: str, tls: ssl.SSLContext | None) -> ClientConnection:
    """Open the connection and prove who this worker is; the coordinator proves itself too.

    Raises:
        AuthenticationFailed: if either side refuses the other.
    """
    config = worker.config
    try:
        connection = await connect(
            uri,
            additional_headers={auth.WORKER_HEADER: config.worker_id},
            ssl=tls,
            open_timeout=config.handshake_timeout,
            close_timeout=1.0,
            create_connection=ChunkedClientConnection,
            **connection_options(config.max_message_size),
        )
    except InvalidStatus as exc:
        if exc.response.status_code not in _REFUSED:
            raise
        raise _refused(config.worker_id, uri, exc.response.body.decode(errors="replace").strip()) from None
    except ssl.SSLCertVerificationError as exc:
        raise AuthenticationFailed(
            f"the coordinator at {uri} failed certificate verification: {exc.verify_message}"
        ) from None
    try:
        if config.allow_coordinators:
            identity = common_name(connection.transport.get_extra_info("peercert"))
            if identity not in config.allow_coordinators:
                raise AuthenticationFailed(f"coordinator identity {identity!r} at {uri} is not on the allow-list")
        if worker.token is not None:
            await _prove(connection, worker.token, config.worker_id, config.handshake_timeout)
    except ConnectionClosed:
        connection.transport.abort()
        refusal = _refusal(connection)
        if refusal is None:
            raise
        raise _refused(config.worker_id, uri, refusal) from None
    except BaseException:
        connection.transport.abort()  # never leave a half-authenticated connection open
        raise
    return connection


async def _prove(connection: ClientConnection, token: bytes, name: str, timeout: float) -> None:
    """Answer the coordinator's challenge with this worker's token and check its confirmation."""
    context = auth.dial_in_context(name)
    try:
        with small_frames(connection, auth.MAX_AUTH_FRAME):
            async with asyncio.timeout(timeout):
                challenge = await receive(connection, auth.MAX_AUTH_FRAME)
                frame, own_nonce, coordinator_nonce = auth.respond(token, challenge, context=context)
                await connection.send(frame)
                confirmation = await receive(connection, auth.MAX_AUTH_FRAME)
        auth.verify_confirmation(token, own_nonce, coordinator_nonce, confirmation, context=context)
    except (AuthenticationFailed, MessageTooLarge) as exc:
        await connection.close(CloseCode.POLICY_VIOLATION, "authentication failed")
        raise AuthenticationFailed(f"the coordinator failed authentication: {exc}") from None


def _refused(name: str, uri: str, reason: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"{name}: refused by the coordinator at {uri}: {reason}")


def _refusal(connection: ClientConnection) -> str | None:
    """The coordinator's reason when it closed the connection with code 1008 (a refusal), else ``None``."""
    received = connection.protocol.close_rcvd
    if received is None or received.code != CloseCode.POLICY_VIOLATION or not connection.protocol.close_rcvd_then_sent:
        return None
    return received.reason or "refused"


def _closed(connection: ClientConnection) -> str:
    received = connection.protocol.close_rcvd
    if received is None:
        return "no closing handshake"
    return f"closed by the coordinator: {received.code} {received.reason}".strip()


def _why(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
