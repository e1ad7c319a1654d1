"""Websocket plumbing shared by worker and coordinator: options and bounded reads."""

from __future__ import annotations

from typing import Any

from websockets.asyncio.connection import Connection

from .exceptions import MessageTooLarge

__all__ = ["connection_options", "receive"]


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
