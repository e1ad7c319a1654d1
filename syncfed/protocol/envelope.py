"""The envelope: a versioned msgpack map around one message, and the single-frame format.

Rules (``docs/protocol.md`` has the full text):

- Every websocket message is one binary frame (or one fragmented message)
  holding a msgpack map ``{"v": 1, "id": <int>, "kind": <str>, "body": <map>}``.
- The coordinator sends requests with a fresh positive ``id``; the worker
  answers each one with a reply carrying the same ``id``, in any order, so
  several requests can be in flight on one connection.
- The first request on a connection must be ``hello``; anything else before
  it is answered with an ``out_of_order`` error.
- A request that cannot be served is answered with an ``error`` reply
  (``code``, ``reason``). Id 0 marks an error that cannot be attributed to a
  request because the envelope itself was unreadable.

Reading an envelope is where a peer's bytes become messages, so everything
found wrong here is a :class:`~syncfed.exceptions.RemoteProtocolError`,
including the field checks a body fails (which, building a message here,
raise :class:`~syncfed.exceptions.LocalProtocolError`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np

from ..compression import check_method
from ..exceptions import ProtocolError, RemoteProtocolError, describe
from ..tensors import DTYPES, encode_tensor
from . import unpacking
from .base import MAX_ID, PROTOCOL_VERSION, Message, _is_int
from .messages import Describe, Error, Hello, Info, ModelLayout, Ping, Pong
from .queries import Query, QueryResult
from .secagg_messages import (
    SecAggKeys,
    SecAggMask,
    SecAggMasked,
    SecAggShare,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmasked,
)
from .terms import Accepted, Propose
from .training_messages import EvalResult, Evaluate, Fetch, Fit, FitHeld, FitResult

__all__ = ["REQUESTS", "reply_kind", "Envelope", "Opened", "encode"]


_KINDS: Final[dict[str, type[Message]]] = {
    cls.kind: cls
    for cls in (Hello, Info, Ping, Pong, Fit, FitResult, FitHeld, Fetch, Evaluate, EvalResult, Error)
    + (
        Describe,
        ModelLayout,
        Query,
        QueryResult,
        SecAggStart,
        SecAggKeys,
        SecAggShare,
        SecAggShares,
        SecAggMask,
        SecAggMasked,
        SecAggUnmask,
        SecAggUnmasked,
        Propose,
        Accepted,
    )
}

#: Message kinds a worker serves, and the reply kind each one gets on success.
REQUESTS: Final[dict[str, str]] = {
    "hello": "info",
    "ping": "pong",
    "fit": "fit_result",
    "fetch": "fit_result",
    "evaluate": "eval_result",
    "describe": "model_layout",
    "query": "query_result",
    "secagg_start": "secagg_keys",
    "secagg_share": "secagg_shares",
    "secagg_mask": "secagg_masked",
    "secagg_unmask": "secagg_unmasked",
    "propose": "accepted",
}


def reply_kind(message: Message) -> str:
    """The kind of a successful reply to the request ``message``: a fit whose plan holds it gets ``fit_held``."""
    if isinstance(message, Fit) and message.plan.hold:
        return FitHeld.kind
    return REQUESTS[message.kind]


@dataclass(frozen=True)
class Envelope:
    """A message with the request id it belongs to."""

    id: int
    message: Message


def _envelope(request_id: int, message: Message, compression: str) -> dict[str, Any]:
    if not _is_int(request_id) or not 0 <= request_id <= MAX_ID:
        raise ValueError(f"request id {describe(request_id)} is not in 0..{MAX_ID}")
    check_method(compression)
    body = message.to_body()
    if compression != "none":
        body = _map_tensors(body, lambda tensor: _compressed(tensor, compression))
    return {"v": PROTOCOL_VERSION, "id": request_id, "kind": message.kind, "body": body}


def _map_tensors(value: Any, convert: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """``value`` (a body made by ``to_body``) with each tensor map replaced by ``convert(map)``.

    Tensor maps are the only places a body holds memoryviews: ``encode_tensor`` makes them.
    """
    if isinstance(value, dict):
        if isinstance(value.get("data"), memoryview):
            return convert(value)
        return {key: _map_tensors(item, convert) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_tensors(item, convert) for item in value]
    return value


def _compressed(tensor: dict[str, Any], compression: str) -> dict[str, Any]:
    if "encoding" in tensor:
        return tensor
    array = np.frombuffer(tensor["data"], dtype=DTYPES[tensor["dtype"]]).reshape(tensor["shape"])
    return encode_tensor(array, compression=compression)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def encode(request_id: int, message: Message, *, compression: str = "none") -> bytes:
    """Serialise ``message`` with its request id into one single-frame message.

    Tensor data is passed to msgpack as memoryviews, so it is copied once,
    into the output buffer. ``compression`` (``none``, ``fp16`` or ``int8``,
    see :mod:`syncfed.compression`) encodes every float tensor of the body.

    Raises:
        ValueError: if ``request_id`` is out of range.
        ConfigError: if ``compression`` is unknown.
        TensorError: if a tensor's dtype is not whitelisted.
    """
    return _pack(_envelope(request_id, message, compression))


def _open(envelope: Any) -> tuple[int, str, dict[str, Any]]:
    """Check an unpacked envelope up to its body's fields: the id, version and kind."""
    if not isinstance(envelope, dict) or set(envelope) != {"v", "id", "kind", "body"}:
        raise RemoteProtocolError("envelope must be a map with keys v, id, kind and body")
    request_id, kind, body = envelope["id"], envelope["kind"], envelope["body"]
    if not _is_int(request_id) or not 0 <= request_id <= MAX_ID:
        raise RemoteProtocolError(f"request id {describe(request_id)} is not an integer in 0..{MAX_ID}")
    if not _is_int(envelope["v"]) or envelope["v"] != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"protocol version {describe(envelope['v'])} is not supported (this peer speaks {PROTOCOL_VERSION})",
            code="unsupported_version",
            request_id=request_id,
        )
    if not isinstance(kind, str) or kind not in _KINDS:
        raise RemoteProtocolError(
            f"message kind {describe(kind)} is unknown", code="unknown_kind", request_id=request_id
        )
    if not isinstance(body, dict):
        raise RemoteProtocolError(f"{kind} body must be a map", request_id=request_id)
    return request_id, kind, body


def _build(request_id: int, kind: str, body: dict[str, Any]) -> Envelope:
    """The message a peer's body makes: whatever it fails is the peer's, with the request id to answer."""
    try:
        message = _KINDS[kind].from_body(body)
    except RemoteProtocolError as exc:  # a tensor's bytes, dtype or shape
        exc.request_id = request_id
        raise
    except ProtocolError as exc:  # a field check, which raises as if the message were built here
        raise RemoteProtocolError(exc.reason, code=exc.code, request_id=request_id) from None
    except (TypeError, ValueError, OverflowError) as exc:  # a field of the wrong type reached a constructor
        raise RemoteProtocolError(f"{kind} has an invalid field: {str(exc)[:200]}", request_id=request_id) from None
    return Envelope(request_id, message)


def _decode_frame(data: bytes) -> Envelope:
    return _build(*_open(unpacking.unpack(data)))


@dataclass(frozen=True)
class Opened:
    """A received message whose envelope is read (id, version, kind) and whose body is still a plain map.

    The receiver applies its session rules (hello first, id, role) to ``id``
    and ``kind`` before :meth:`build` runs the body's validation, which may
    cost more than reading the map did.
    """

    id: int
    kind: str
    body: dict[str, Any]

    def build(self) -> Envelope:
        """The validated message.

        Raises:
            RemoteProtocolError: if the body is invalid; ``request_id`` holds the id.
        """
        return _build(self.id, self.kind, self.body)
