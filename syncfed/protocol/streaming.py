"""The streamed format: a large message sent in fragments and read as they arrive, and :func:`decode`.

A streamed message is :data:`STREAM_MAGIC`, its header's length, a msgpack
header (the envelope with each tensor's bytes replaced by their count), then
the tensors' bytes. The header is read and checked before anything is
allocated, so a receiver never holds more than its limit. :func:`decode`
lives here rather than beside :func:`~syncfed.protocol.envelope.encode`
because it reads either format.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

from ..exceptions import ConfigError, MessageTooLarge, RemoteProtocolError, describe
from ..tensors import MAX_NAME as MAX_TENSOR_NAME
from ..tensors import tensor_nbytes
from . import unpacking
from .base import Message, _is_int
from .envelope import Envelope, Opened, _decode_frame, _envelope, _map_tensors, _open, _pack

__all__ = [
    "STREAM_MAGIC",
    "DEFAULT_CHUNK_SIZE",
    "Buffer",
    "Outgoing",
    "encode_fragments",
    "decode",
    "MessageDecoder",
    "Route",
    "Sink",
]

#: A streamed message starts with these four bytes. 0xC7 opens a msgpack
#: extension, which a single-frame message can never start with (it is a map,
#: and extensions are refused), so the two formats cannot be confused.
STREAM_MAGIC: Final = b"\xc7SF1"
_PREFIX: Final = struct.Struct(">4sI")  # the magic, then the header's length
#: Messages larger than this go streamed, in fragments of at most this many bytes. 1 MiB, not 4: websockets
#: copies each frame several times, and 1 MiB frames stay in cache (docs/performance.md).
DEFAULT_CHUNK_SIZE: Final = 2**20

Buffer = bytes | memoryview


class Sink(Protocol):
    """Takes a streamed message's tensor bytes as they arrive, in place of the buffers a decoder would fill."""

    def write(self, index: int, data: memoryview) -> None:
        """The next bytes of tensor ``index`` (the header's order), following the bytes written before.

        It must not raise: a decoder's :meth:`~MessageDecoder.feed` never does.
        """
        ...

    def message(self) -> Message:
        """The message, once every byte was written."""
        ...


#: Chooses a sink for a streamed message once its header is checked: given the opened envelope (each
#: tensor map holds ``nbytes`` in place of ``data``) and those maps in the order their bytes come.
Route = Callable[[Opened, Sequence[dict[str, Any]]], Sink | None]


@dataclass(frozen=True, eq=False)
class Outgoing:
    """An encoded message: one frame, or the pieces of a streamed one.

    :meth:`fragments` cuts a streamed message into fragments of at most
    ``chunk_size`` bytes. A fragment inside one tensor is a memoryview of the
    tensor itself; only a fragment that straddles pieces is joined (a copy of
    at most ``chunk_size`` bytes), so sending never builds the whole message.
    The tensors are read while the fragments are sent: leave them unchanged
    until the send is done.
    """

    size: int
    pieces: tuple[Buffer, ...]
    chunk_size: int
    streamed: bool

    def fragments(self) -> Generator[Buffer, None, None]:
        """The message's fragments, in order; a single-frame message is one."""
        if not self.streamed:
            yield from self.pieces
            return
        pending: list[memoryview] = []
        room = self.chunk_size
        for piece in self.pieces:
            view = memoryview(piece)
            while view:
                take, view = view[:room], view[room:]
                if len(take) == self.chunk_size:
                    yield take
                    continue
                pending.append(take)
                room -= len(take)
                if room == 0:
                    yield b"".join(pending)
                    pending.clear()
                    room = self.chunk_size
        if pending:
            yield b"".join(pending)

    def __bytes__(self) -> bytes:
        return b"".join(self.fragments())


def encode_fragments(
    request_id: int, message: Message, *, chunk_size: int = DEFAULT_CHUNK_SIZE, compression: str = "none"
) -> Outgoing:
    """Encode ``message`` for sending in fragments of at most ``chunk_size`` bytes.

    A message that fits in ``chunk_size`` is the single frame :func:`encode`
    makes. A larger one is streamed: :data:`STREAM_MAGIC`, the header's length
    (4 bytes, big-endian), a msgpack header (the envelope, each tensor's
    ``data`` replaced by its byte count ``nbytes``), then the tensors' bytes
    in the order their entries appear in the header, with no copy made.

    Raises:
        ValueError: if ``request_id`` is out of range.
        ConfigError: if ``chunk_size`` is not a positive integer or ``compression`` is unknown.
        TensorError: if a tensor's dtype is not whitelisted.
    """
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ConfigError(f"chunk size {describe(chunk_size)} is not a positive number of bytes")
    envelope = _envelope(request_id, message, compression)
    views: list[memoryview] = []

    def detach(tensor: dict[str, Any]) -> dict[str, Any]:
        views.append(tensor["data"])
        return {**{key: value for key, value in tensor.items() if key != "data"}, "nbytes": tensor["data"].nbytes}

    header = _pack({**envelope, "body": _map_tensors(envelope["body"], detach)})
    size = _PREFIX.size + len(header) + sum(view.nbytes for view in views)
    if size <= chunk_size:
        data = _pack(envelope)
        return Outgoing(len(data), (data,), chunk_size, streamed=False)
    if len(header) >= 2**32:
        raise ValueError(f"header of {len(header)} bytes exceeds limit of {2**32 - 1} bytes")
    prefix = _PREFIX.pack(STREAM_MAGIC, len(header))
    return Outgoing(size, (prefix + header, *views), chunk_size, streamed=True)


def decode(data: bytes, *, max_size: int | None = None) -> Envelope:
    """Parse and validate one message, single-frame or streamed.

    Single-frame tensors are read-only views of ``data``; streamed ones are
    copied out of it (:class:`MessageDecoder` reads them as they arrive).

    Raises:
        MessageTooLarge: if ``data`` is longer than ``max_size``.
        RemoteProtocolError: if the message is invalid; ``request_id`` holds the id
            when the envelope was readable, so the error reply can carry it.
    """
    if max_size is not None and len(data) > max_size:
        raise MessageTooLarge(len(data), max_size)
    if data[: len(STREAM_MAGIC)] == STREAM_MAGIC:
        decoder = MessageDecoder(max_size=max_size)
        decoder.feed(data)
        return decoder.finish()
    return _decode_frame(data)


def _tensor_name(name: Any) -> str:
    return f"tensor {name}" if isinstance(name, str) and len(name) <= MAX_TENSOR_NAME else f"tensor {describe(name)}"


def _detached(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A streamed header's tensor entries (maps with ``nbytes``), named and in document order.

    The walk keeps its own stack: a peer's nesting must not reach Python's recursion limit.
    """
    found: list[tuple[str, dict[str, Any]]] = []
    stack: list[tuple[Any, Any]] = [("body", body)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, dict):
            if "nbytes" in value:
                found.append((_tensor_name(name), value))
            else:
                stack.extend(reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((name, item) for item in reversed(value))
    return found


class _State(enum.Enum):
    START = "start"  # fewer bytes than the magic so far
    FRAME = "frame"  # a single-frame message: fragments are kept and decoded at the end
    PREFIX = "prefix"  # streamed: reading the header's length
    HEADER = "header"  # streamed: reading the header
    PAYLOAD = "payload"  # streamed: copying tensor bytes into their arrays
    DISCARD = "discard"  # too large or invalid: bytes are only counted


class MessageDecoder:
    """Reads one message, single-frame or streamed, as its fragments arrive; no I/O.

    Usage::

        decoder = MessageDecoder(max_size=limit)
        async for fragment in connection.recv_streaming(decode=False):
            decoder.feed(fragment)
        envelope = decoder.finish()

    It never holds more than ``max_size`` bytes. A single-frame message is
    kept and decoded by :meth:`finish`. A streamed message's header is read and
    checked first (envelope, id, version, kind, each tensor's dtype, shape
    and byte count, the declared total against ``max_size``); only then is
    one buffer allocated per tensor, and later fragments are copied straight
    into them. With a ``route``, the header is offered to it first, and a
    :class:`Sink` it returns takes the tensors' bytes instead: nothing the
    size of a tensor is allocated. :meth:`feed` never raises: once a message is too large or
    invalid, the rest is only counted, so the caller reads it to its end and
    the connection goes on. :meth:`finish` raises what was found.
    """

    def __init__(self, *, max_size: int | None = None, route: Route | None = None) -> None:
        self.max_size = max_size
        self._route = route
        #: Bytes fed so far.
        self.size = 0
        self._state = _State.START
        self._kept: list[bytes] = []
        self._header = bytearray()
        self._header_size = 0
        self._expected = 0  # the streamed message's total size, once its header is read
        self._opened: tuple[int, str, dict[str, Any]] | None = None
        self._entries: list[tuple[str, dict[str, Any]]] = []
        self._sizes: list[int] = []  # each tensor's byte count
        self._buffers: list[np.ndarray] = []
        self._sink: Sink | None = None
        self._current = 0  # the tensor being filled
        self._filled = 0  # its bytes so far
        self._error: RemoteProtocolError | None = None
        self._frame: bytes | None = None
        self._head = b""  # the first bytes of a dropped single-frame message, to read its id from
        self._finished = False

    @property
    def frame(self) -> bytes | None:
        """The whole message once :meth:`finish` ran, if it was single-frame and within the limit."""
        return self._frame

    def feed(self, fragment: bytes | bytearray | memoryview) -> None:
        """Take the next fragment of the message."""
        if self._finished:
            raise ConfigError("feed after finish: a message decoder reads one message")
        self.size += len(fragment)
        if self._state is _State.DISCARD:
            return
        if self.max_size is not None and self.size > self.max_size:
            if self._state in (_State.START, _State.FRAME):
                self._kept.append(bytes(fragment[: unpacking.HEAD_SIZE]))  # the envelope's id may be in it
            self._discard()
            return
        if self._state in (_State.START, _State.FRAME):
            self._kept.append(bytes(fragment))
            if self._state is _State.START and self.size >= len(STREAM_MAGIC):
                self._choose_format()
            return
        self._stream(memoryview(fragment).cast("B"))

    def _choose_format(self) -> None:
        head = b"".join(piece[: len(STREAM_MAGIC)] for piece in self._kept)
        if head[: len(STREAM_MAGIC)] != STREAM_MAGIC:
            self._state = _State.FRAME
            return
        kept, self._kept = self._kept, []
        self._state = _State.PREFIX
        for piece in kept:
            self._stream(memoryview(piece))

    def _stream(self, view: memoryview) -> None:
        while view and self._state is not _State.DISCARD:
            if self._state is _State.PREFIX:
                take = _PREFIX.size - len(self._header)
                self._header += view[:take]
                view = view[take:]
                if len(self._header) == _PREFIX.size:
                    self._header_size = _PREFIX.unpack(self._header)[1]
                    self._expected = _PREFIX.size + self._header_size
                    self._header.clear()
                    self._state = _State.HEADER
                    if self.max_size is not None and self._expected > self.max_size:
                        self._discard()
                    elif self._header_size == 0:
                        self._open_header()
            elif self._state is _State.HEADER:
                take = self._header_size - len(self._header)
                self._header += view[:take]
                view = view[take:]
                if len(self._header) == self._header_size:
                    self._open_header()
            else:  # PAYLOAD, or past its end, which finish reports
                if self._current == len(self._sizes):
                    return
                take = min(self._sizes[self._current] - self._filled, len(view))
                if self._sink is not None:
                    self._sink.write(self._current, view[:take])
                else:
                    buffer = self._buffers[self._current]
                    buffer[self._filled : self._filled + take] = np.frombuffer(view[:take], dtype=np.uint8)
                view = view[take:]
                self._filled += take
                self._next_tensor()

    def _open_header(self) -> None:
        """Check the header and allocate the tensors' buffers, or discard the message."""
        header, self._header = bytes(self._header), bytearray()
        try:
            self._opened = _open(unpacking.unpack(header))
            request_id, _, body = self._opened
            self._entries = _detached(body)
            try:
                sizes = [tensor_nbytes(entry, name=name) for name, entry in self._entries]
            except RemoteProtocolError as exc:
                exc.request_id = request_id
                raise
        except RemoteProtocolError as exc:
            self._error = exc
            self._discard()
            return
        self._expected += sum(sizes)
        if self.max_size is not None and self._expected > self.max_size:
            self._discard()
            return
        self._sizes = sizes
        if self._route is not None:
            self._sink = self._route(Opened(request_id, self._opened[1], body), [entry for _, entry in self._entries])
        if self._sink is None:
            self._buffers = [np.empty(size, dtype=np.uint8) for size in sizes]
        self._state = _State.PAYLOAD
        self._next_tensor()

    def _next_tensor(self) -> None:
        while self._current < len(self._sizes) and self._filled == self._sizes[self._current]:
            self._current += 1
            self._filled = 0

    def _discard(self) -> None:
        if self._state in (_State.START, _State.FRAME):
            self._head = b"".join(itertools.islice(self._kept, unpacking.HEAD_SIZE))[: unpacking.HEAD_SIZE]
        self._state = _State.DISCARD
        self._kept, self._header, self._sizes, self._buffers = [], bytearray(), [], []

    def _readable_id(self) -> int | None:
        """The id of a dropped message, when its envelope was read or its first bytes hold it."""
        if self._opened is not None:
            return self._opened[0]
        return unpacking.peek_id(self._head) if self._head else None

    def finish(self) -> Envelope:
        """Decode the message, once its last fragment was fed: :meth:`open`, then build it (or the sink's).

        Raises:
            MessageTooLarge: if it was longer than ``max_size`` (it was counted, not kept).
            RemoteProtocolError: if it is invalid; ``request_id`` holds the id when the envelope was readable.
        """
        opened = self.open()
        if self._sink is not None:
            return Envelope(opened.id, self._sink.message())
        return opened.build()

    def open(self) -> Opened:
        """Read the message's envelope, once its last fragment was fed, leaving its body a plain map.

        Decoding is bounded by the message's size (see :mod:`syncfed.protocol.unpacking`);
        building the message from its body is left to :meth:`Opened.build`. When a sink took the
        tensors, their maps still hold ``nbytes``: :meth:`finish` builds the sink's message instead.

        Raises:
            MessageTooLarge: if it was longer than ``max_size`` (it was counted, not kept); ``request_id``
                holds the id when the envelope's id was among the first bytes, or in a streamed header.
            RemoteProtocolError: if it is invalid; ``request_id`` holds the id when the envelope was readable.
        """
        if self._finished:
            raise ConfigError("finish called twice: a message decoder reads one message")
        self._finished = True
        if self.max_size is not None and self.size > self.max_size:
            error = MessageTooLarge(self.size, self.max_size)
            error.request_id = self._readable_id()
            raise error
        if self._error is not None:
            raise self._error
        if self._state in (_State.START, _State.FRAME):
            self._frame = self._kept[0] if len(self._kept) == 1 else b"".join(self._kept)
            self._kept = []
            return Opened(*_open(unpacking.unpack(self._frame)))
        if self._opened is None:  # still in the prefix or the header, or the header declares too much
            raise RemoteProtocolError(f"streamed message ends after {self.size} bytes, inside its header")
        request_id, kind, body = self._opened
        if self.size != self._expected:
            raise RemoteProtocolError(
                f"streamed message has {self.size} bytes, not the {self._expected} its header declares",
                request_id=request_id,
            )
        if self._sink is None:
            for (_, entry), buffer in zip(self._entries, self._buffers, strict=True):
                del entry["nbytes"]
                entry["data"] = buffer
        self._buffers = []
        return Opened(request_id, kind, body)
