"""Websocket plumbing shared by worker and coordinator: options, bounded reads, streamed sends."""

from __future__ import annotations

import asyncio
import inspect
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

from websockets.asyncio.connection import Connection

from ..exceptions import ConfigError, MessageTooLarge
from ..protocol import MessageDecoder, Outgoing, Route

__all__ = [
    "connection_options",
    "receive",
    "receive_message",
    "off_loop",
    "send_message",
    "server_tls",
    "client_tls",
    "common_name",
    "subject",
    "small_frames",
]

T = TypeVar("T")

#: Messages larger than this are decoded in a thread: reading up to one object per byte takes about a
#: microsecond each, and the event loop must keep answering pings meanwhile.
OFF_LOOP_SIZE: Final = 16 * 1024


def connection_options(max_message_size: int) -> dict[str, Any]:
    """Keyword arguments for ``websockets.asyncio`` ``serve`` and ``connect``.

    A single frame larger than the limit makes websockets close the
    connection (code 1009); a fragmented message larger than the limit is
    drained by :func:`receive` and answered with an error reply, and the
    connection goes on. Compression is off: floats do not deflate.
    """
    return {"max_size": (None, max_message_size), "compression": None}


async def receive(connection: Connection, max_size: int) -> bytes:
    """Read one whole message, holding at most ``max_size`` bytes of it.

    Raises:
        MessageTooLarge: after the rest of an oversized message was read and dropped.
        websockets.ConnectionClosed: when the connection ends.
    """
    chunks: list[bytes] = []
    size = 0
    async for fragment in connection.recv_streaming(decode=False):
        size += len(fragment)
        if size <= max_size:
            chunks.append(fragment)
        else:
            chunks.clear()
    if size > max_size:
        raise MessageTooLarge(size, max_size)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def receive_message(
    connection: Connection,
    max_size: int,
    *,
    on_fragment: Callable[[], None] | None = None,
    route: Route | None = None,
) -> MessageDecoder:
    """Read one protocol message through a :class:`MessageDecoder`, fragment by fragment.

    A streamed message's tensors are filled as its fragments arrive, so no
    buffer of the whole message is built; an oversized or invalid one is read
    to its end and dropped. Call ``finish()`` on the result for the envelope
    (it raises what was wrong) and read ``size`` for the bytes received.
    ``on_fragment`` is called as each fragment arrives: a slow upload is not an idle peer.
    ``route`` may hand a streamed message's tensors to a sink instead (see :class:`MessageDecoder`).

    Raises:
        websockets.ConnectionClosed: when the connection ends.
    """
    decoder = MessageDecoder(max_size=max_size, route=route)
    async for fragment in connection.recv_streaming(decode=False):
        if on_fragment is not None:
            on_fragment()
        decoder.feed(fragment)
    return decoder


async def off_loop(size: int, work: Callable[[], T]) -> T:
    """Run the decoding step ``work`` of a message of ``size`` bytes: in a thread when it is large."""
    if size <= OFF_LOOP_SIZE:
        return work()
    return await asyncio.to_thread(work)


async def send_message(connection: Connection, message: Outgoing) -> None:
    """Send an encoded message: one frame, or a streamed one as one fragmented websocket message.

    Raises:
        websockets.ConnectionClosed: when the connection ends.
    """
    if not message.streamed:
        await connection.send(message.pieces[0])
        return
    fragments = message.fragments()
    try:
        await connection.send(fragments)
    except asyncio.CancelledError:
        if inspect.getgeneratorstate(fragments) != inspect.GEN_CREATED:
            # Nothing may follow half a fragmented message (RFC 6455, 5.4): the connection is done.
            connection.transport.abort()
        raise


def server_tls(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """A worker's TLS context; with ``ca``, clients must present a certificate it signed (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if ca is not None:
            context.load_verify_locations(ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files {cert}, {key}, {ca}: {exc}") from None
    return context


def client_tls(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The coordinator's TLS context: verify workers' certificates and host names against ``ca``
    (the system's CAs when ``None``), presenting ``cert`` when given."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None and key is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files {ca}, {cert}, {key}: {exc}") from None
    return context


def subject(peercert: object) -> dict[str, str]:
    """The subject of a verified peer certificate (``ssl`` getpeercert form) by field, the first of each; ``{}``
    without one. The one reader of certificate subjects: workers' ids and admins' names and roles alike."""
    fields: dict[str, str] = {}
    if isinstance(peercert, dict):
        for entry in peercert.get("subject", ()):
            for key, value in entry:
                fields.setdefault(str(key), str(value))
    return fields


def common_name(peercert: object) -> str | None:
    """The subject common name of a verified peer certificate (``ssl`` getpeercert form)."""
    return subject(peercert).get("commonName")


@contextmanager
def small_frames(connection: Connection, limit: int) -> Iterator[None]:
    """While authenticating, websockets itself refuses frames over ``limit``: an unproven peer
    cannot make us buffer a large message. The connection's own limits come back afterwards."""
    protocol = connection.protocol
    limits = protocol.max_message_size, protocol.max_fragment_size
    protocol.max_message_size = protocol.max_fragment_size = limit
    try:
        yield
    finally:
        protocol.max_message_size, protocol.max_fragment_size = limits
