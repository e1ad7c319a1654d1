"""Kept for one release: the websocket plumbing moved to :mod:`syncfed.net.transport`."""

from __future__ import annotations

from .net.transport import (
    OFF_LOOP_SIZE,
    client_tls,
    connection_options,
    off_loop,
    receive,
    receive_message,
    send_message,
    server_tls,
)

__all__ = [
    "OFF_LOOP_SIZE",
    "client_tls",
    "connection_options",
    "off_loop",
    "receive",
    "receive_message",
    "send_message",
    "server_tls",
]
