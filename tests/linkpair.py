"""An in-process worker and its coordinator's link, for tests of session rules and faults without subprocesses.

In the manner of h11's ``tests/helpers.py`` (``ConnectionPair``): a real
:class:`~syncfed.worker.Worker` over a tiny in-memory data set, served in the
test's own event loop on 127.0.0.1 port 0, a connected
:class:`~syncfed.client.WorkerLink`, and a side door that sends raw bytes
on a connection of its own, so a test can break rules the client never would.

Usage::

    async with LinkPair() as pair:
        await pair.client.request(Hello())
        async with pair.raw() as peer:
            await peer.send(b"\\xc1")
            assert (await peer.receive()).message.code == "malformed"

Import it as ``from linkpair import LinkPair`` from any folder under tests/:
pytest puts tests/ on ``sys.path`` for its ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import numpy as np
import torch
from websockets.asyncio.client import ClientConnection, connect

from syncfed.config import WorkerConfig
from syncfed.datasets import Dataset, load_dataset
from syncfed.models import DigitsCNN, get_weights
from syncfed.net.link import WorkerLink
from syncfed.protocol import Envelope, Error, Hello, Info, Message, decode, encode
from syncfed.worker import Served, Worker, serving

__all__ = ["MS", "LinkPair", "RawPeer", "digits_weights", "tiny_digits"]

#: The unit of every duration in tests that use the pair (websockets' tests do the same):
#: a busy machine may need them all longer, never one alone.
MS = 0.001

#: How long a reply may take: a short fit of the tiny data set on a busy 2-core machine.
REPLY = 20_000 * MS
#: Silence that shows no further reply is coming.
QUIET = 300 * MS

#: Examples in :func:`tiny_digits`: enough for a few batches, few enough to train in milliseconds.
TINY = 48


def tiny_digits(count: int = TINY) -> Dataset:
    """The first ``count`` examples of the digits training split, all ten classes among them."""
    return load_dataset("digits", "train", ".").subset(np.arange(count))


def digits_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh digits-cnn weights, the same for the same seed."""
    torch.manual_seed(seed)
    return get_weights(DigitsCNN())


class RawPeer:
    """A websocket connection to the pair's worker that sends whatever bytes it is given."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    async def send(self, data: bytes | list[bytes]) -> None:
        """Send one message; a list goes as one message in fragments."""
        await self.connection.send(data)

    async def request(self, request_id: int, message: Message) -> None:
        await self.send(encode(request_id, message))

    async def receive(self, timeout: float = REPLY) -> Envelope:
        async with asyncio.timeout(timeout):
            data = await self.connection.recv(decode=False)
        return decode(data)

    async def hello(self, request_id: int = 1) -> Info:
        """Greet the worker, as every session must first."""
        await self.request(request_id, Hello())
        reply = await self.receive()
        assert reply.id == request_id and isinstance(reply.message, Info), reply
        return reply.message

    async def expect_error(self, request_id: int, code: str) -> str:
        """The reason of the next reply, which must be an error of ``code`` for ``request_id``."""
        reply = await self.receive()
        assert isinstance(reply.message, Error), f"expected error {code}, got {reply.message.kind}"
        assert (reply.id, reply.message.code) == (request_id, code), reply.message.reason
        return reply.message.reason

    async def assert_silent(self, quiet: float = QUIET) -> None:
        """No further reply arrives within ``quiet`` seconds."""
        try:
            async with asyncio.timeout(quiet):
                data = await self.connection.recv(decode=False)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected reply {decode(data)}")


class LinkPair:
    """A worker served in this event loop, a client linked to it, and raw connections on demand.

    ``settings`` replace fields of the worker's :class:`WorkerConfig` (``max_in_flight=2``);
    ``data`` is what it serves (a data set, or holdings), :func:`tiny_digits` by default.
    """

    def __init__(self, data: Dataset | Sequence[Served] | None = None, **settings: Any) -> None:
        base = WorkerConfig("linked", host="127.0.0.1", port=0)
        self.config = dataclasses.replace(base, **settings)
        self.worker = Worker(self.config, tiny_digits() if data is None else data)
        self.uri = ""
        self._stack = AsyncExitStack()
        self._client: WorkerLink | None = None

    @property
    def client(self) -> WorkerLink:
        """The coordinator's side of the link, connected (not greeted: send ``Hello`` first)."""
        assert self._client is not None, "use the pair as an async context manager"
        return self._client

    async def __aenter__(self) -> LinkPair:
        try:
            _, self.uri = await self._stack.enter_async_context(serving(self.worker))
            self._client = WorkerLink(
                self.config.worker_id, self.uri, max_message_size=self.config.max_message_size, connect_timeout=REPLY
            )
            await self._stack.enter_async_context(self._client)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    @asynccontextmanager
    async def raw(self) -> AsyncIterator[RawPeer]:
        """A raw connection of its own to the worker, closed on exit."""
        async with connect(self.uri, compression=None, max_size=None, open_timeout=REPLY) as connection:
            yield RawPeer(connection)
