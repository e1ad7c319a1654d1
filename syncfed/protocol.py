"""The wire protocol: a versioned msgpack envelope around frozen messages.

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

This module does no I/O: it turns bytes into validated messages and back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import msgpack
import numpy as np

from .exceptions import MessageTooLarge, ProtocolError, describe
from .tensors import Weights, decode_weights, encode_weights

__all__ = [
    "PROTOCOL_VERSION",
    "ERROR_CODES",
    "Message",
    "Hello",
    "Info",
    "Ping",
    "Pong",
    "TrainingPlan",
    "Fit",
    "FitResult",
    "Evaluate",
    "EvalResult",
    "Error",
    "Envelope",
    "REQUESTS",
    "encode",
    "decode",
]

PROTOCOL_VERSION: Final = 1

#: Error codes a worker may answer with, and what they mean.
ERROR_CODES: Final[dict[str, str]] = {
    "malformed": "the message is not a valid msgpack envelope or a field is invalid",
    "too_large": "the message exceeds the receiver's size limit",
    "bad_tensor": "a tensor's dtype, shape or byte count is invalid",
    "unknown_kind": "the message kind is not a request this peer serves",
    "unsupported_version": "the envelope's protocol version is not supported",
    "out_of_order": "the request came before hello, or reuses an id still in flight",
    "unknown_model": "the named model is not registered on the worker",
    "incompatible": "the weights do not fit the model or the worker's data",
    "wrong_role": "the worker's role does not serve this request (e.g. fit on the evaluator)",
    "busy": "too many requests are in flight on this connection",
    "internal": "the worker failed while serving the request; details are in its log",
}

MAX_ID: Final = 2**63 - 1
MAX_NAME: Final = 256
MAX_CLASSES: Final = 100_000
#: The largest batch size and number of batches a request may ask for.
MAX_PLAN_SIZE: Final = 1_000_000


def _check(condition: bool, reason: str) -> None:
    if not condition:
        raise ProtocolError(reason)


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check_name(value: Any, what: str) -> None:
    _check(
        isinstance(value, str) and 0 < len(value) <= MAX_NAME,
        f"{what} must be a string of 1 to {MAX_NAME} characters, not {describe(value)}",
    )


def _check_weights(value: Any) -> None:
    _check(
        isinstance(value, Mapping)
        and all(isinstance(name, str) and isinstance(array, np.ndarray) for name, array in value.items()),
        "weights must be a map from tensor names to arrays",
    )


def _check_counts(value: Any, what: str) -> None:
    _check(
        isinstance(value, (list, tuple)) and len(value) <= MAX_CLASSES and all(_is_int(n) and n >= 0 for n in value),
        f"{what} must be a list of at most {MAX_CLASSES} non-negative integers",
    )


class Message:
    """Base class of every message: ``kind`` names it on the wire."""

    kind: ClassVar[str]

    def to_body(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Message:
        raise NotImplementedError


def _fields(body: Mapping[str, Any], kind: str, names: set[str]) -> None:
    _check(
        set(body) == names,
        f"{kind} body has fields {sorted(body)}, expected {sorted(names)}",
    )


@dataclass(frozen=True)
class Hello(Message):
    """Opens a session: the coordinator states its protocol version."""

    kind: ClassVar[str] = "hello"
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check(_is_int(self.protocol_version), "protocol_version must be an integer")

    def to_body(self) -> dict[str, Any]:
        return {"protocol_version": self.protocol_version}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Hello:
        _fields(body, cls.kind, {"protocol_version"})
        return cls(body["protocol_version"])


@dataclass(frozen=True)
class Info(Message):
    """What a worker holds, without the data itself."""

    kind: ClassVar[str] = "info"
    worker_id: str
    role: str  # "trainer" or "evaluator"
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    histogram: tuple[int, ...]  # examples per class
    models: tuple[str, ...]  # model names the worker can build
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_name(self.worker_id, "worker_id")
        _check(self.role in ("trainer", "evaluator"), f"role must be trainer or evaluator, not {describe(self.role)}")
        _check_name(self.dataset, "dataset")
        _check(
            isinstance(self.input_shape, (list, tuple))
            and 0 < len(self.input_shape) <= 8
            and all(_is_int(d) and d > 0 for d in self.input_shape),
            "input_shape must be a list of 1 to 8 positive sizes",
        )
        _check(
            _is_int(self.num_classes) and 0 < self.num_classes <= MAX_CLASSES,
            f"num_classes must be an integer from 1 to {MAX_CLASSES}",
        )
        _check_counts(self.histogram, "histogram")
        _check(len(self.histogram) == self.num_classes, "histogram must have num_classes entries")
        _check(isinstance(self.models, (list, tuple)) and len(self.models) <= 1000, "models must be a list")
        for name in self.models:
            _check_name(name, "model name")
        _check(_is_int(self.protocol_version), "protocol_version must be an integer")
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "histogram", tuple(self.histogram))
        object.__setattr__(self, "models", tuple(self.models))

    @property
    def num_examples(self) -> int:
        return sum(self.histogram)

    def to_body(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "histogram": list(self.histogram),
            "models": list(self.models),
            "protocol_version": self.protocol_version,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Info:
        _fields(
            body,
            cls.kind,
            {"worker_id", "role", "dataset", "input_shape", "num_classes", "histogram", "models", "protocol_version"},
        )
        return cls(**body)


@dataclass(frozen=True)
class Ping(Message):
    """Liveness check; answered even while the worker trains."""

    kind: ClassVar[str] = "ping"

    def to_body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Ping:
        _fields(body, cls.kind, set())
        return cls()


@dataclass(frozen=True)
class Pong(Message):
    """Answer to :class:`Ping`."""

    kind: ClassVar[str] = "pong"

    def to_body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Pong:
        _fields(body, cls.kind, set())
        return cls()


@dataclass(frozen=True)
class TrainingPlan:
    """How a worker trains in one round: plain SGD over ``num_batches`` batches."""

    round: int
    batch_size: int
    num_batches: int
    lr: float
    seed: int

    def __post_init__(self) -> None:
        _check(_is_int(self.round) and 1 <= self.round <= MAX_ID, "round must be a positive integer")
        _check(
            _is_int(self.batch_size) and 1 <= self.batch_size <= MAX_PLAN_SIZE,
            f"batch_size must be an integer from 1 to 1000000, not {describe(self.batch_size)}",
        )
        _check(
            _is_int(self.num_batches) and 1 <= self.num_batches <= MAX_PLAN_SIZE,
            f"num_batches must be an integer from 1 to 1000000, not {describe(self.num_batches)}",
        )
        _check(_is_number(self.lr) and self.lr > 0, f"lr must be a positive finite number, not {describe(self.lr)}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed must be a non-negative 63-bit integer")

    def to_body(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "lr": float(self.lr),
            "seed": self.seed,
        }

    @classmethod
    def from_body(cls, body: Any) -> TrainingPlan:
        _check(isinstance(body, Mapping), "plan must be a map")
        _fields(body, "plan", {"round", "batch_size", "num_batches", "lr", "seed"})
        return cls(**body)


def _weights_equal(a: Weights, b: Weights) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


@dataclass(frozen=True, eq=False)
class Fit(Message):
    """Train the named model, starting from ``weights``, on the worker's shard."""

    kind: ClassVar[str] = "fit"
    model: str
    weights: Weights
    plan: TrainingPlan

    def __post_init__(self) -> None:
        _check_name(self.model, "model")
        _check_weights(self.weights)
        _check(isinstance(self.plan, TrainingPlan), "plan must be a TrainingPlan")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fit):
            return NotImplemented
        return self.model == other.model and self.plan == other.plan and _weights_equal(self.weights, other.weights)

    def to_body(self) -> dict[str, Any]:
        return {"model": self.model, "weights": encode_weights(self.weights), "plan": self.plan.to_body()}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Fit:
        _fields(body, cls.kind, {"model", "weights", "plan"})
        return cls(body["model"], decode_weights(body["weights"]), TrainingPlan.from_body(body["plan"]))


@dataclass(frozen=True, eq=False)
class FitResult(Message):
    """A worker's trained weights, its example count and its mean training loss."""

    kind: ClassVar[str] = "fit_result"
    weights: Weights
    num_examples: int
    loss: float
    seconds: float = 0.0

    def __post_init__(self) -> None:
        _check_weights(self.weights)
        _check(_is_int(self.num_examples) and self.num_examples > 0, "num_examples must be a positive integer")
        _check(_is_number(self.loss), "loss must be a finite number")
        _check(_is_number(self.seconds) and self.seconds >= 0, "seconds must be a non-negative number")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FitResult):
            return NotImplemented
        return (self.num_examples, self.loss, self.seconds) == (
            other.num_examples,
            other.loss,
            other.seconds,
        ) and _weights_equal(self.weights, other.weights)

    def to_body(self) -> dict[str, Any]:
        return {
            "weights": encode_weights(self.weights),
            "num_examples": self.num_examples,
            "loss": float(self.loss),
            "seconds": float(self.seconds),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> FitResult:
        _fields(body, cls.kind, {"weights", "num_examples", "loss", "seconds"})
        return cls(decode_weights(body["weights"]), body["num_examples"], body["loss"], body["seconds"])


@dataclass(frozen=True, eq=False)
class Evaluate(Message):
    """Evaluate the named model with ``weights`` on the worker's data."""

    kind: ClassVar[str] = "evaluate"
    model: str
    weights: Weights
    batch_size: int

    def __post_init__(self) -> None:
        _check_name(self.model, "model")
        _check_weights(self.weights)
        _check(
            _is_int(self.batch_size) and 1 <= self.batch_size <= MAX_PLAN_SIZE,
            "batch_size must be an integer from 1 to 1000000",
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Evaluate):
            return NotImplemented
        return (self.model, self.batch_size) == (other.model, other.batch_size) and _weights_equal(
            self.weights, other.weights
        )

    def to_body(self) -> dict[str, Any]:
        return {"model": self.model, "weights": encode_weights(self.weights), "batch_size": self.batch_size}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Evaluate:
        _fields(body, cls.kind, {"model", "weights", "batch_size"})
        return cls(body["model"], decode_weights(body["weights"]), body["batch_size"])


@dataclass(frozen=True)
class EvalResult(Message):
    """Mean loss per example, number correct, and the histogram of predicted classes."""

    kind: ClassVar[str] = "eval_result"
    loss: float
    correct: int
    num_examples: int
    predictions: tuple[int, ...]

    def __post_init__(self) -> None:
        _check(_is_number(self.loss), "loss must be a finite number")
        _check(_is_int(self.num_examples) and self.num_examples > 0, "num_examples must be a positive integer")
        _check(
            _is_int(self.correct) and 0 <= self.correct <= self.num_examples,
            "correct must be an integer from 0 to num_examples",
        )
        _check_counts(self.predictions, "predictions")
        _check(sum(self.predictions) == self.num_examples, "predictions must sum to num_examples")
        object.__setattr__(self, "predictions", tuple(self.predictions))

    @property
    def accuracy(self) -> float:
        return self.correct / self.num_examples

    def to_body(self) -> dict[str, Any]:
        return {
            "loss": float(self.loss),
            "correct": self.correct,
            "num_examples": self.num_examples,
            "predictions": list(self.predictions),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> EvalResult:
        _fields(body, cls.kind, {"loss", "correct", "num_examples", "predictions"})
        return cls(**body)


@dataclass(frozen=True)
class Error(Message):
    """A request could not be served; ``code`` is one of :data:`ERROR_CODES`."""

    kind: ClassVar[str] = "error"
    code: str
    reason: str

    def __post_init__(self) -> None:
        _check(isinstance(self.code, str) and self.code in ERROR_CODES, f"error code {describe(self.code)} is unknown")
        _check(
            isinstance(self.reason, str) and len(self.reason) <= 1000,
            "reason must be a string of at most 1000 characters",
        )

    def to_body(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Error:
        _fields(body, cls.kind, {"code", "reason"})
        return cls(body["code"], body["reason"])


_KINDS: Final[dict[str, type[Message]]] = {
    cls.kind: cls for cls in (Hello, Info, Ping, Pong, Fit, FitResult, Evaluate, EvalResult, Error)
}

#: Message kinds a worker serves, and the reply kind each one gets on success.
REQUESTS: Final[dict[str, str]] = {"hello": "info", "ping": "pong", "fit": "fit_result", "evaluate": "eval_result"}


@dataclass(frozen=True)
class Envelope:
    """A message with the request id it belongs to."""

    id: int
    message: Message


def encode(request_id: int, message: Message) -> bytes:
    """Serialise ``message`` with its request id.

    Tensor data is passed to msgpack as memoryviews, so it is copied once,
    into the output buffer.
    """
    if not _is_int(request_id) or not 0 <= request_id <= MAX_ID:
        raise ValueError(f"request id {describe(request_id)} is not in 0..{MAX_ID}")
    envelope = {"v": PROTOCOL_VERSION, "id": request_id, "kind": message.kind, "body": message.to_body()}
    return msgpack.packb(envelope, use_bin_type=True)  # type: ignore[no-any-return]


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def decode(data: bytes, *, max_size: int | None = None) -> Envelope:
    """Parse and validate one message.

    Raises:
        MessageTooLarge: if ``data`` is longer than ``max_size``.
        ProtocolError: if the message is invalid; ``request_id`` holds the id
            when the envelope was readable, so the error reply can carry it.
    """
    if max_size is not None and len(data) > max_size:
        raise MessageTooLarge(len(data), max_size)
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext, timestamp=0)
    except ProtocolError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        # msgpack's errors do not share one base: catch them all here.
        raise ProtocolError(f"invalid msgpack: {type(exc).__name__}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"v", "id", "kind", "body"}:
        raise ProtocolError("envelope must be a map with keys v, id, kind and body")
    request_id, kind, body = envelope["id"], envelope["kind"], envelope["body"]
    if not _is_int(request_id) or not 0 <= request_id <= MAX_ID:
        raise ProtocolError(f"request id {describe(request_id)} is not an integer in 0..{MAX_ID}")
    try:
        if not _is_int(envelope["v"]) or envelope["v"] != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {describe(envelope['v'])} is not supported (this peer speaks {PROTOCOL_VERSION})",
                code="unsupported_version",
            )
        if not isinstance(kind, str) or kind not in _KINDS:
            raise ProtocolError(f"message kind {describe(kind)} is unknown", code="unknown_kind")
        if not isinstance(body, dict):
            raise ProtocolError(f"{kind} body must be a map")
        try:
            message = _KINDS[kind].from_body(body)
        except (TypeError, ValueError, OverflowError) as exc:  # a field of the wrong type reached a constructor
            raise ProtocolError(f"{kind} has an invalid field: {str(exc)[:200]}") from None
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    return Envelope(request_id, message)
