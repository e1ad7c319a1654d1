"""Bounded msgpack decoding: what a message of N bytes may cost to decode, checked before anything is built.

msgpack turns one byte into a whole Python object (``0x80`` is an empty map,
64 bytes) and a five-byte array header into an allocation of 8 bytes per
declared element, so its container limits alone do not bound memory. Here a
scan of the bytes, which allocates nothing, adds up an upper bound of what
decoding and building the message will hold (:func:`decoded_cost`), and the
message is refused when that passes :func:`budget`: 8 bytes per byte
received, plus :data:`BUDGET_FLOOR` so small legal messages dense in
integers still pass. Container, string and nesting limits come from the
protocol's own bounds: tensor data is one ``bin``, every container is small.

No I/O, no asyncio: the message decoder calls :func:`unpack` and :func:`peek_id`.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

from ..exceptions import RemoteProtocolError

__all__ = [
    "AMPLIFICATION",
    "BUDGET_FLOOR",
    "MAX_ARRAY",
    "MAX_MAP",
    "MAX_STR",
    "MAX_DEPTH",
    "MAX_OBJECTS",
    "budget",
    "decoded_cost",
    "unpack",
    "HEAD_SIZE",
    "peek_id",
]

# Limits
#: Bytes of Python memory a decoded message may hold per byte received.
AMPLIFICATION: Final = 8
#: Bytes any message may decode to, whatever its size: lists of about 9,000 integers above 255 fit in it.
BUDGET_FLOOR: Final = 2**20
#: Longest array: a histogram (100,000 classes), a query's features, a list of clients (65,536).
MAX_ARRAY: Final = 2**18
#: Largest map: weights of at most 100,000 tensors.
MAX_MAP: Final = 100_000
#: Longest string in UTF-8 bytes: names of up to 1,024 characters, reasons of up to 1,000.
MAX_STR: Final = 4096
#: Deepest nesting: a secure-aggregation mask's fit's weights' tensor's shape is at depth 6.
MAX_DEPTH: Final = 16
#: Most objects in one message: a 100,000-class histogram, 65,536 [client, key] pairs. The scan reads about
#: one object per microsecond, so this bounds its time too.
MAX_OBJECTS: Final = 2**18

# Upper bounds of CPython's allocations (3.11+, 64-bit), rounded up to pymalloc's 16-byte steps.
_SMALL_INT: Final = 32  # an int below 2**30 that is not cached
_LARGE_INT: Final = 48
_FLOAT: Final = 32
_STR: Final = 96  # plus 4 bytes per UTF-8 byte: a str may widen to UCS-4; map keys are interned too
_BIN: Final = 48
# A container is counted twice: building a message may copy it (tuple(), dict()); an array's entries
# may also go into a set (distinct client ids), up to 64 bytes each.
_ARRAY: Final = 2 * 80 + 256
_ARRAY_SLOT: Final = 2 * 8 + 64
_MAP: Final = 2 * 232
_MAP_ENTRY: Final = 2 * 48
_BASE: Final = 16 * 1024  # the envelope, the message object and its fields

_STRING, _BINARY, _ARRAY_KIND, _MAP_KIND, _EXT = range(5)
#: Scalars' first bytes, and the bytes that follow.
_FIXED: Final = {
    0xC0: 0,  # nil
    0xC2: 0,  # false
    0xC3: 0,  # true
    0xCA: 4,
    0xCB: 8,
    0xCC: 1,
    0xCD: 2,
    0xCE: 4,
    0xCF: 8,
    0xD0: 1,
    0xD1: 2,
    0xD2: 4,
    0xD3: 8,
}
#: Types whose length follows the first byte: their kind and the length's size.
_SIZED: Final = {
    0xD9: (_STRING, 1),
    0xDA: (_STRING, 2),
    0xDB: (_STRING, 4),
    0xC4: (_BINARY, 1),
    0xC5: (_BINARY, 2),
    0xC6: (_BINARY, 4),
    0xDC: (_ARRAY_KIND, 2),
    0xDD: (_ARRAY_KIND, 4),
    0xDE: (_MAP_KIND, 2),
    0xDF: (_MAP_KIND, 4),
    0xC7: (_EXT, 1),
    0xC8: (_EXT, 2),
    0xC9: (_EXT, 4),
}
#: Fixed-size extensions: their data's size.
_FIXEXT: Final = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_LENGTHS: Final = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}


def _scalar_cost(first: int) -> int:
    if first in (0xC0, 0xC2, 0xC3, 0xCC):  # singletons, and uint8, which CPython caches up to 256
        return 0
    if first in (0xCA, 0xCB):
        return _FLOAT
    if first in (0xCF, 0xD3):
        return _LARGE_INT
    return _SMALL_INT


def budget(size: int) -> int:
    """Bytes a message of ``size`` bytes may decode to."""
    return AMPLIFICATION * size + BUDGET_FLOOR


def decoded_cost(data: bytes | memoryview, *, max_bin: int | None = None) -> int:
    """An upper bound of the memory that decoding and building ``data`` holds, read without allocating.

    Raises:
        RemoteProtocolError: if the bytes are not one msgpack object (named after msgpack's own
            error: ``OutOfData``, ``FormatError``, ``StackError`` past :data:`MAX_DEPTH`,
            ``ExtraData``), or break a limit (lengths, object count, :func:`budget`).
    """
    view = memoryview(data).cast("B")
    end = len(view)
    limit = budget(end)
    max_bin = end if max_bin is None else max_bin
    cost, objects = _BASE, 0
    position = 0
    remaining = [1]  # objects still to read in each open container; the outermost holds the message
    while remaining:
        if remaining[-1] == 0:
            remaining.pop()
            continue
        remaining[-1] -= 1
        if position >= end:
            raise RemoteProtocolError("invalid msgpack: OutOfData")
        first = view[position]
        position += 1
        objects += 1
        if objects > MAX_OBJECTS:
            raise RemoteProtocolError(f"message with more than {MAX_OBJECTS} objects exceeds limit of {MAX_OBJECTS}")
        if first <= 0x7F:  # positive fixint: cached
            continue
        if first >= 0xE0:  # negative fixint
            cost += _SMALL_INT
            continue
        if first in _FIXED:
            position += _FIXED[first]
            cost += _scalar_cost(first)
        else:
            kind, length, size = _header(first, view, position, end)
            position += size
            if kind == _EXT:  # msgpack refuses it with its type code (ext_hook), or builds a Timestamp
                cost += _BIN + length
                position += 1 + length
            elif kind == _STRING:
                if length > MAX_STR:
                    raise RemoteProtocolError(f"string of {length} bytes exceeds limit of {MAX_STR} bytes")
                cost += _STR + 4 * length
                position += length
            elif kind == _BINARY:
                if length > max_bin:
                    raise RemoteProtocolError(f"bin of {length} bytes exceeds limit of {max_bin} bytes")
                cost += _BIN + length
                position += length
            else:
                is_map = kind == _MAP_KIND
                if length > (MAX_MAP if is_map else MAX_ARRAY):
                    what = "map" if is_map else "array"
                    raise RemoteProtocolError(
                        f"{what} of {length} entries exceeds limit of {MAX_MAP if is_map else MAX_ARRAY} entries"
                    )
                if len(remaining) > MAX_DEPTH:
                    raise RemoteProtocolError("invalid msgpack: StackError")
                cost += _MAP + _MAP_ENTRY * length if is_map else _ARRAY + _ARRAY_SLOT * length
                remaining.append(2 * length if is_map else length)
        if cost > limit:
            raise RemoteProtocolError(
                f"message of {end} bytes would decode to more than {limit} bytes, exceeding limit of"
                f" {AMPLIFICATION} bytes per byte plus {BUDGET_FLOOR}"
            )
    if position != end:
        raise RemoteProtocolError("invalid msgpack: ExtraData")
    return cost


def _header(first: int, view: memoryview, position: int, end: int) -> tuple[int, int, int]:
    """The kind and length of a string, bin, extension, array or map whose first byte is ``first``, and
    the bytes its length takes after that byte."""
    if 0x80 <= first <= 0x8F:
        return _MAP_KIND, first & 0x0F, 0
    if 0x90 <= first <= 0x9F:
        return _ARRAY_KIND, first & 0x0F, 0
    if 0xA0 <= first <= 0xBF:
        return _STRING, first & 0x1F, 0
    if first in _FIXEXT:
        return _EXT, _FIXEXT[first], 0
    if first not in _SIZED:  # 0xc1, which msgpack never uses
        raise RemoteProtocolError("invalid msgpack: FormatError")
    kind, size = _SIZED[first]
    if position + size > end:
        raise RemoteProtocolError("invalid msgpack: OutOfData")
    (length,) = _LENGTHS[size].unpack_from(view, position)
    return kind, length, size


def _reject_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def unpack(data: bytes) -> Any:
    """Decode one msgpack object from an untrusted peer, refusing it first if it would cost too much.

    Raises:
        RemoteProtocolError: if it is not valid msgpack, breaks a limit or would exceed its :func:`budget`.
    """
    decoded_cost(data)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            timestamp=0,
            max_str_len=MAX_STR,
            max_bin_len=len(data),
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
            max_ext_len=MAX_STR,
        )
    except RemoteProtocolError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        # msgpack's errors do not share one base: catch them all here.
        raise RemoteProtocolError(f"invalid msgpack: {type(exc).__name__}") from None


#: Bytes of a message kept to read its envelope's id when the rest is dropped (``too_large``).
HEAD_SIZE: Final = 4096


def peek_id(head: bytes) -> int | None:
    """The request id of an envelope from its first bytes, or None if it is not among them.

    Reads the envelope's map entries in order until ``id``, skipping others
    within ``head`` only: nothing past the first :data:`HEAD_SIZE` bytes is read.
    """
    unpacker = msgpack.Unpacker(
        max_buffer_size=HEAD_SIZE,
        raw=False,
        strict_map_key=True,
        ext_hook=_reject_ext,
        max_str_len=MAX_STR,
        max_bin_len=HEAD_SIZE,
        max_array_len=MAX_ARRAY,
        max_map_len=16,
        max_ext_len=0,
    )
    try:
        unpacker.feed(head[:HEAD_SIZE])
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "id":
                value = unpacker.unpack()
                return value if type(value) is int and value > 0 else None
            unpacker.skip()
    except (RemoteProtocolError, ValueError, TypeError, RecursionError, msgpack.UnpackException, msgpack.OutOfData):
        return None
    return None
