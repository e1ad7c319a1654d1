"""Kept for one release: the msgpack cost scan moved to :mod:`syncfed.protocol.unpacking`.

It is part of the wire's decode path, so it lives with the protocol now; import it from there.
"""

from __future__ import annotations

from .protocol.unpacking import (
    AMPLIFICATION,
    BUDGET_FLOOR,
    HEAD_SIZE,
    MAX_ARRAY,
    MAX_DEPTH,
    MAX_MAP,
    MAX_OBJECTS,
    MAX_STR,
    budget,
    decoded_cost,
    peek_id,
    unpack,
)

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
