"""Websocket plumbing shared by worker and coordinator: options and bounded reads."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from websockets.asyncio.connection import Connection

from .exceptions import ConfigError, MessageTooLarge

__all__ = ["connection_options", "receive", "server_tls", "client_tls"]


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
