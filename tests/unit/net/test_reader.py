"""ChunkReader against websockets' own StreamReader: the same bytes, waits and errors on any stream."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import Generator
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.client import ClientProtocol
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from syncfed.net import reader as reader_module
from syncfed.net.reader import ChunkedClientConnection, ChunkedServerConnection, ChunkReader, adopt
from syncfed.net.transport import connection_options

MiB = 1 << 20

#: What one read asks for: exactly n bytes, a line of at most m, or the rest up to m; or whether all was read.
reads = st.one_of(
    st.tuples(st.just("exact"), st.integers(0, 40)),
    st.tuples(st.just("line"), st.integers(0, 40)),
    st.tuples(st.just("to_eof"), st.integers(0, 80)),
    st.tuples(st.just("at_eof"), st.just(0)),
)


def replay(reader: Any, chunks: list[bytes], ends: bool, operations: list[tuple[str, int]]) -> list[Any]:
    """What each read returns or raises, feeding the next chunk (then the end, if ``ends``) whenever it waits."""
    pending = list(chunks)
    outcomes: list[Any] = []
    for kind, size in operations:
        reading: Generator[None, None, Any]
        if kind == "exact":
            reading = reader.read_exact(size)
        elif kind == "line":
            reading = reader.read_line(size)
        elif kind == "to_eof":
            reading = reader.read_to_eof(size)
        else:
            reading = reader.at_eof()
        try:
            while True:
                next(reading)
                if pending:
                    reader.feed_data(pending.pop(0))
                elif ends and not reader.eof:
                    reader.feed_eof()
                else:
                    outcomes.append("waits for more")
                    return outcomes
        except StopIteration as done:
            value = done.value
            outcomes.append(bytes(value) if isinstance(value, bytes | bytearray) else value)
        except (EOFError, RuntimeError) as exc:
            outcomes.append((type(exc).__name__, str(exc)))
            return outcomes
    return outcomes


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """A stream of bytes rich in line ends, cut into chunks of any sizes (none empty)."""
    data = draw(st.binary(max_size=120).map(lambda raw: bytes(10 if byte % 7 == 0 else byte for byte in raw)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=12)))
    bounds = [0, *(cut for cut in cuts if cut < len(data)), len(data)]
    chunks = [data[start:stop] for start, stop in zip(bounds, bounds[1:], strict=False) if stop > start]
    return chunks, draw(st.booleans())


@settings(max_examples=400, deadline=None)
@given(streams(), st.lists(reads, max_size=12), st.integers(0, 20))
def test_chunk_reader_reads_as_websockets_stream_reader(
    stream: tuple[list[bytes], bool], operations: list[tuple[str, int]], small: int
) -> None:
    """``small``: where chunks stop being gathered into a bytearray, so that both kinds of chunk mix."""
    chunks, ends = stream
    with mock.patch.object(reader_module, "_SMALL", small):
        assert replay(ChunkReader(), chunks, ends, operations) == replay(StreamReader(), chunks, ends, operations)


def test_a_peer_trickling_bytes_costs_no_object_per_byte() -> None:
    """256 KiB fed a byte at a time, as a slow peer's segments arrive: held in about that much memory."""
    trickled = ChunkReader()
    tracemalloc.start()
    try:
        for _ in range(256 * 1024):
            trickled.feed_data(b"x")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 512 * 1024, held  # a bytes object per byte would be some 9 MB
    assert now(trickled.read_exact(256 * 1024)) == b"x" * (256 * 1024)


def now(reading: Generator[None, None, Any]) -> Any:
    """The value of a read that needs no more bytes than are buffered."""
    with pytest.raises(StopIteration) as done:
        next(reading)
    return done.value.value


def test_a_payload_is_joined_once_and_a_whole_chunk_is_handed_over() -> None:
    buffered = ChunkReader()
    first, second = os.urandom(MiB), os.urandom(300)
    buffered.feed_data(first)
    buffered.feed_data(bytearray(second))  # small: gathered into a bytearray of its own
    assert now(buffered.read_exact(100)) == first[:100]
    assert now(buffered.read_exact(MiB)) == first[100:] + second[:100]
    buffered.feed_data(third := os.urandom(50))
    assert now(buffered.read_exact(250)) == second[100:] + third
    buffered.feed_data(fourth := os.urandom(MiB))
    assert now(buffered.read_exact(MiB)) is fourth  # exactly one large chunk: no copy


def test_adopt_leaves_a_protocol_that_has_received_bytes() -> None:
    fresh = ClientProtocol(parse_uri("ws://127.0.0.1:1/"))
    adopt(fresh)
    assert isinstance(fresh.reader, ChunkReader)
    started = ClientProtocol(parse_uri("ws://127.0.0.1:1/"))
    started.receive_data(b"HTTP/1.1 101 Switching")  # half a status line: the parser is under way
    adopt(started)
    assert type(started.reader) is StreamReader


def test_connections_exchange_fragmented_messages_through_chunk_readers() -> None:
    """Both ends of a real connection read through a ChunkReader, and a 5 MiB message in odd fragments arrives whole."""
    payload = os.urandom(5 * MiB + 3)
    readers: list[Any] = []

    async def echo(connection: ServerConnection) -> None:
        readers.append(connection.protocol.reader)
        message = await connection.recv()
        await connection.send([message[start : start + MiB - 1] for start in range(0, len(message), MiB - 1)])

    async def main() -> bytes:
        options = connection_options(16 * MiB)
        async with serve(echo, "127.0.0.1", 0, create_connection=ChunkedServerConnection, **options) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            async with connect(
                f"ws://127.0.0.1:{port}", create_connection=ChunkedClientConnection, **options
            ) as connection:
                readers.append(connection.protocol.reader)
                await connection.send(payload)
                reply = await asyncio.wait_for(connection.recv(), 30)
                assert isinstance(reply, bytes)
                return reply

    assert asyncio.run(main()) == payload
    assert [type(reader) for reader in readers] == [ChunkReader, ChunkReader]
