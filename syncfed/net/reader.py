"""Received bytes kept as the chunks the socket returned, and joined once per frame.

websockets' ``StreamReader`` appends every chunk to one ``bytearray`` (a
copy, and another whenever the bytearray outgrows its allocation), slices
each frame's payload out of it (a second copy) and its message iterator
turns that slice into ``bytes`` (a third). In a round of mlp-10m those copies
were a sixth of the coordinator's CPU (docs/performance.md, issue 20).
:class:`ChunkReader` keeps the ``bytes`` objects asyncio hands over (small
ones gathered into a ``bytearray``) and joins a payload from them once. :class:`ChunkedClientConnection` and
:class:`ChunkedServerConnection` install it: every connection syncfed opens
or accepts is one of them (``create_connection=``).

The reader has ``StreamReader``'s interface and behaviour, errors included
(tests/unit/net/test_reader.py compares the two on random streams); the
limits stay where websockets puts them: on a line's length, and on a frame's
size before its payload is read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Any, Final

from websockets.asyncio import client, server
from websockets.client import ClientProtocol
from websockets.protocol import Protocol
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

__all__ = ["ChunkReader", "ChunkedClientConnection", "ChunkedServerConnection", "adopt"]

#: What a read returns, generator-based as websockets' parsers call it.
Read = Generator[None, None, bytes | bytearray]

#: Chunks shorter than this are gathered into one ``bytearray`` (:meth:`ChunkReader.feed_data`).
_SMALL: Final = 64 * 1024


class ChunkReader:
    """A generator-based stream reader (``websockets.streams.StreamReader``'s interface) over a queue of chunks."""

    def __init__(self) -> None:
        self._chunks: deque[bytes | bytearray] = deque()
        self._offset = 0  # bytes of the first chunk already read
        self._size = 0  # bytes buffered and not yet read
        self.eof = False

    def read_line(self, m: int, too_long_exc_type: type[Exception] = RuntimeError) -> Read:
        """Read a line ending in LF, LF included, of at most ``m`` bytes (a security limit)."""
        n = 0  # bytes searched so far
        # Where the search goes on after a wait: nothing is read meanwhile, and only the last chunk grows.
        index, position = 0, self._offset
        while True:
            while index < len(self._chunks):
                chunk = self._chunks[index]
                end = chunk.find(b"\n", position)
                if end >= 0:
                    n += end + 1 - position
                    if n > m:
                        raise too_long_exc_type(f"read {n} bytes, expected no more than {m} bytes")
                    return self._take(n)
                n += len(chunk) - position
                position = len(chunk)
                if index + 1 == len(self._chunks):
                    break
                index, position = index + 1, 0
            if n > m:
                raise too_long_exc_type(f"read {n} bytes, expected no more than {m} bytes")
            if self.eof:
                raise EOFError(f"stream ends after {n} bytes, before end of line")
            yield

    def read_exact(self, n: int) -> Read:
        """Read exactly ``n`` bytes."""
        assert n >= 0
        while self._size < n:
            if self.eof:
                raise EOFError(f"stream ends after {self._size} bytes, expected {n} bytes")
            yield
        return self._take(n)

    def read_to_eof(self, m: int, too_long_exc_type: type[Exception] = RuntimeError) -> Read:
        """Read everything until the stream ends, at most ``m`` bytes (a security limit)."""
        while not self.eof:
            if self._size > m:
                raise too_long_exc_type(f"read {self._size} bytes, expected no more than {m} bytes")
            yield
        return self._take(self._size)

    def at_eof(self) -> Generator[None, None, bool]:
        """Whether the stream has ended and every byte was read."""
        while True:
            if self._size:
                return False
            if self.eof:
                return True
            yield

    def feed_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``: kept as it is when it is large ``bytes``, which nobody can change afterwards.

        Small chunks are copied into a growing ``bytearray`` instead: a peer that
        trickles its bytes one TCP segment at a time must not cost a Python object
        (some 40 bytes) per byte it has sent.
        """
        if self.eof:
            raise EOFError("stream ended")
        if not data:
            return
        last = self._chunks[-1] if self._chunks else None
        if len(data) >= _SMALL:
            self._chunks.append(data if isinstance(data, bytes) else bytes(data))
        elif isinstance(last, bytearray) and len(last) < _SMALL:
            last += data
        else:
            self._chunks.append(bytearray(data))
        self._size += len(data)

    def feed_eof(self) -> None:
        """End the stream."""
        if self.eof:
            raise EOFError("stream ended")
        self.eof = True

    def discard(self) -> None:
        """Drop every buffered byte without ending the stream."""
        self._chunks.clear()
        self._offset = self._size = 0

    def _take(self, n: int) -> bytes | bytearray:
        """The next ``n`` buffered bytes: a chunk itself when it is exactly those, else one join."""
        if not n:
            return b""
        chunks, offset = self._chunks, self._offset
        first = chunks[0]
        if offset == 0 and len(first) == n:
            chunks.popleft()
            self._size -= n
            return first
        parts: list[memoryview] = []
        need = n
        while need:
            chunk = chunks[0]
            available = len(chunk) - offset
            if available > need:
                parts.append(memoryview(chunk)[offset : offset + need])
                offset += need
                break
            parts.append(memoryview(chunk)[offset:])
            chunks.popleft()
            need -= available
            offset = 0
        self._offset = offset
        self._size -= n
        return b"".join(parts)


def adopt(protocol: Protocol) -> None:
    """Give a protocol that has received nothing yet a :class:`ChunkReader`, and restart its parser on it.

    A protocol whose reader is not websockets' own, or already holds bytes,
    keeps it: the parser would lose its place.
    """
    reader = protocol.reader
    if type(reader) is not StreamReader or reader.buffer or reader.eof:
        return
    protocol.reader = ChunkReader()  # type: ignore[assignment]  # StreamReader's interface, see the module
    protocol.parser = protocol.parse()
    next(protocol.parser)


class ChunkedClientConnection(client.ClientConnection):
    """websockets' client connection, receiving through a :class:`ChunkReader` (``connect(create_connection=)``)."""

    def __init__(self, protocol: ClientProtocol, *args: Any, **kwargs: Any) -> None:
        adopt(protocol)
        super().__init__(protocol, *args, **kwargs)


class ChunkedServerConnection(server.ServerConnection):
    """websockets' server connection, receiving through a :class:`ChunkReader` (``serve(create_connection=)``)."""

    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        adopt(protocol)
        super().__init__(protocol, *args, **kwargs)
