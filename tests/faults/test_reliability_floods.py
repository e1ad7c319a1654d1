"""Reliability: a flood of bad input, and connections beyond a worker's limit.

A real worker process on 127.0.0.1 (see reliability_kit.py) gets thousands of
bad messages, senders that never read, and hundreds of short-lived
connections while a coordinator trains through it; it answers each bad message
with an error, keeps its memory and descriptors flat, and trains bit for bit
as before. A worker started with --max-connections refuses one connection past
its limit. Every wait has a deadline, and the measured figures are printed
(run pytest with ``-s``).

The fixtures come from reliability_kit.py, imported by name so that pytest
finds them here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import run
from reliability_kit import FAST, POLL, TRAINERS, Cluster, record, wait_until
from reliability_kit import cluster as cluster
from reliability_kit import figures_table as figures_table
from reliability_kit import trio as trio
from units import MS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from syncfed.config import CoordinatorConfig
from syncfed.coordinator import Coordinator, RunResult
from syncfed.protocol import Envelope, Error, Hello, Info, Ping, Pong, decode, encode

# -- A flood of bad input -------------------------------------------------------------------


def pack(request_id: Any, kind: Any, body: Any, *, v: Any = 1) -> bytes:
    """An envelope built by hand, so that it can break the rules :func:`encode` enforces."""
    data: bytes = msgpack.packb({"v": v, "id": request_id, "kind": kind, "body": body}, use_bin_type=True)
    return data


def nested(depth: int) -> bytes:
    """msgpack for ``[[[...]]]`` ``depth`` deep, written by hand (msgpack refuses to pack it)."""
    return b"\x91" * depth + b"\xc0"


BAD_ENVELOPES: list[bytes | str] = [
    b"",
    b"\xc1",  # never used in msgpack
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": 1}),
    msgpack.packb({1: 2}),  # non-string key
    pack(5, "ping", {}, v=99),
    pack(-5, "ping", {}),
    pack("x", "ping", {}),
    pack(2**63, "ping", {}),
    pack(0, "ping", {}),
    pack(7, "boom", {}),
    pack(8, "pong", {}),  # not a request
    pack(9, "fit", {"model": 1}),
    pack(10, "fit", {"model": "digits-cnn", "weights": {"w": {"dtype": "f4", "shape": [3], "data": b"x"}}}),
    pack(11, "ping", {}),  # before hello
    pack(12, "evaluate", []),
    pack(13, "hello", {"protocol_version": "one"}),
    msgpack.packb({"v": 1, "id": 14, "kind": "ping", "body": msgpack.ExtType(5, b"ext")}),
    nested(100_000),
    msgpack.packb({"v": 1, "id": 15, "kind": "ping", "body": {}})[:-2],  # truncated
    "not msgpack at all, and in a text frame",
]


def garbage(rng: random.Random) -> bytes | str:
    if rng.random() < 0.5:
        return rng.choice(BAD_ENVELOPES)
    return rng.randbytes(rng.choice([1, 7, 64, 512, 4096]))


async def flood_connection(uri: str, count: int, seed: int) -> int:
    """Send ``count`` bad messages while reading the replies; return how many error replies came."""
    rng = random.Random(seed)
    async with connect(
        uri, compression=None, max_size=None, open_timeout=10_000 * MS, close_timeout=5000 * MS
    ) as connection:

        async def read() -> int:
            replies = 0
            while replies < count:
                envelope = decode(await connection.recv(decode=False))
                assert isinstance(envelope.message, Error), envelope
                replies += 1
            return replies

        reader = asyncio.create_task(read())
        for _ in range(count):
            await connection.send(garbage(rng))
        async with asyncio.timeout(60_000 * MS):
            return await reader


async def flood_without_reading(uri: str, seconds: float, seed: int) -> int:
    """Send bad messages for ``seconds`` and never read a reply; then drop the TCP connection."""
    rng = random.Random(seed)
    sent = 0
    connection = await connect(uri, compression=None, max_size=None, open_timeout=10_000 * MS, close_timeout=1000 * MS)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    await connection.send(rng.randbytes(1024))
                    sent += 1
    finally:
        connection.transport.abort()
    return sent


async def short_connection(uri: str, port: int, kind: int) -> str:
    """One of several ways to open a connection and go away quickly."""
    if kind == 0:  # a polite session: hello, close
        async with connect(
            uri, compression=None, max_size=None, open_timeout=10_000 * MS, close_timeout=5000 * MS
        ) as connection:
            await connection.send(encode(1, Hello()))
            async with asyncio.timeout(10_000 * MS):
                reply = decode(await connection.recv(decode=False))
            assert isinstance(reply.message, Info)
        return "hello"
    if kind == 1:  # a websocket handshake, then gone without a closing handshake
        connection = await connect(uri, compression=None, open_timeout=10_000 * MS)
        await connection.send(b"\x00garbage")
        connection.transport.abort()
        return "abort"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind == 2:  # not HTTP at all
            writer.write(os.urandom(300) + b"\r\n\r\n")
        elif kind == 3:  # HTTP, but no websocket upgrade
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        else:  # half a request, then a reset
            writer.write(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n")
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return "reset"
        await writer.drain()
        answer = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10_000 * MS):
                answer = await reader.read(200)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
        return "bad-http"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def short_connections(uri: str, port: int, total: int, concurrency: int) -> dict[str, int]:
    limit = asyncio.Semaphore(concurrency)
    counts: dict[str, int] = {}

    async def one(index: int) -> None:
        async with limit:
            kind = await short_connection(uri, port, index % 5)
            counts[kind] = counts.get(kind, 0) + 1

    await asyncio.gather(*(one(index) for index in range(total)))
    return counts


def assert_same_weights(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert np.array_equal(actual[name], expected[name]), name


def test_a_flood_of_bad_input_leaves_a_worker_serving_with_flat_memory(trio: Cluster, tmp_path: Path) -> None:
    alice = trio["alice"]
    config = CoordinatorConfig(workers=trio.uris(*TRAINERS), evaluator={}, training_rounds=2, seed=11, **FAST)
    reference = run(Coordinator(config, report=lambda line: None).run())
    rss_before, fds_before = alice.rss_mib(), alice.open_fds()
    connections, per_connection, short_total = 4, 1000, 300

    async def flood_and_train() -> tuple[list[int], int, dict[str, int], RunResult]:
        flood = asyncio.gather(
            asyncio.gather(*(flood_connection(alice.uri, per_connection, seed) for seed in range(connections))),
            flood_without_reading(alice.uri, 2.0, 99),
            short_connections(alice.uri, alice.port, short_total, concurrency=16),
        )
        during = await Coordinator(config, report=lambda line: None).run()
        replies, unread, short = await flood
        return replies, unread, short, during

    started = time.monotonic()
    replies, unread, short, during = run(flood_and_train())
    flood_seconds = time.monotonic() - started
    assert replies == [per_connection] * connections, "every bad message gets exactly one error reply"
    assert sum(short.values()) == short_total
    rss_peak = alice.rss_mib()
    after = run(Coordinator(config, report=lambda line: None).run())
    assert_same_weights(during.weights, reference.weights)
    assert_same_weights(after.weights, reference.weights)
    assert all(record.workers == TRAINERS for record in [*during.rounds, *after.rounds])
    rss_after = alice.rss_mib()
    assert rss_after - rss_before < 100, (rss_before, rss_after)
    # Every connection of the flood was let go: the descriptors are back to where they were.
    fds = wait_until(
        lambda: alice.open_fds() <= fds_before + 1 and alice.open_fds(), 10_000 * MS, "alice's sockets to close"
    )

    async def still_serves() -> None:
        async with connect(alice.uri, compression=None, max_size=None, open_timeout=10_000 * MS) as connection:
            await connection.send(encode(1, Hello()))
            await connection.send(encode(2, Ping()))
            async with asyncio.timeout(10_000 * MS):
                replies = [decode(await connection.recv(decode=False)) for _ in range(2)]
            assert isinstance(replies[0].message, Info) and replies[1] == Envelope(2, Pong())

    run(still_serves(), 30_000 * MS)
    assert alice.alive
    record(
        "flood of alice (4x1000 bad messages, 1 unread sender, 300 short connections, during a 2-round run)",
        outcome="every bad message answered with an error; both runs bit-identical to the reference",
        flood_s=flood_seconds,
        unread_messages_sent=unread,
        short_connections=short,
        rss_before_mib=rss_before,
        rss_after_flood_mib=rss_peak,
        rss_after_run_mib=rss_after,
        fds_before_after=f"{fds_before} -> {fds}",
    )


# -- Connections beyond the limit -----------------------------------------------------------


def refused_code(exc: BaseException) -> int | None:
    """The HTTP status of a refused handshake, or the close code of a refused hello."""
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code
    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
        return exc.rcvd.code
    return None


def test_connections_beyond_the_limit_are_refused_with_503(cluster: Cluster) -> None:
    erin = cluster["erin"]  # --max-connections 3
    limit = 3

    async def hello(connection: ClientConnection, request_id: int = 1) -> None:
        await connection.send(encode(request_id, Hello()))
        async with asyncio.timeout(10_000 * MS):
            reply = decode(await connection.recv(decode=False))
        assert isinstance(reply.message, Info) and reply.message.worker_id == "erin"

    async def open_one() -> ClientConnection:
        return await connect(
            erin.uri, compression=None, max_size=None, open_timeout=10_000 * MS, close_timeout=5000 * MS
        )

    async def admitted(timeout: float = 5000 * MS) -> tuple[ClientConnection, float]:
        """A connection, once the worker has counted out the ones closed just before (a moment after the close).

        A connection counts from its hello on (erin has no token): until the slots free, the handshake gets
        HTTP 503 or the hello a close with 1013.
        """
        started = time.monotonic()
        while True:
            try:
                connection = await open_one()
                await hello(connection)  # its session runs: it counts
            except (InvalidStatus, ConnectionClosed) as exc:
                assert refused_code(exc) in (503, 1013)
                assert time.monotonic() - started < timeout, "the worker still counts closed connections"
                await asyncio.sleep(POLL)
                continue
            return connection, time.monotonic() - started

    async def one_past_the_limit() -> float:
        held: list[ClientConnection] = []
        try:
            for _ in range(limit):
                held.append((await admitted())[0])
            with pytest.raises(InvalidStatus) as refused:
                await open_one()
            assert refused.value.response.status_code == 503
            assert refused.value.response.body == b"too many connections\n"
            for index, connection in enumerate(held):  # the admitted ones are unharmed
                await hello(connection, 10 + index)
        finally:
            for connection in held:
                await connection.close()
        connection, waited = await admitted()
        await connection.close()
        return waited

    async def at_once(count: int) -> tuple[int, int]:
        """``count`` handshakes and hellos at the same time: the limit holds however they interleave.

        Unauthenticated connections do not count, so all handshakes pass; the hellos beyond the limit
        are answered with a close (1013 too many connections).
        """
        (await admitted())[0].transport.abort()  # wait until the slots are free, then free ours at once
        await asyncio.sleep(200 * MS)
        outcomes = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
        opened = [outcome for outcome in outcomes if isinstance(outcome, ClientConnection)]
        try:
            assert len(opened) == count, outcomes
            greeted = await asyncio.gather(
                *(hello(connection, index + 1) for index, connection in enumerate(opened)), return_exceptions=True
            )
            refused = [outcome for outcome in greeted if isinstance(outcome, ConnectionClosed)]
            assert all(refused_code(exc) == 1013 for exc in refused), greeted
            assert all(outcome is None or isinstance(outcome, ConnectionClosed) for outcome in greeted), greeted
        finally:
            for connection in opened:
                await connection.close()
        return count - len(refused), len(refused)

    reopened = run(one_past_the_limit(), 60_000 * MS)
    accepted, refused = run(at_once(20), 60_000 * MS)
    assert (accepted, refused) == (limit, 20 - limit)
    assert erin.alive
    record(
        "max connections 3",
        outcome="4th handshake refused with HTTP 503 (body 'too many connections'); accepted again after closing;"
        " 20 hellos at once: 3 answered, 17 closed with 1013",
        reopen_after_close_s=reopened,
        twenty_at_once=f"{accepted} accepted, {refused} refused",
    )
