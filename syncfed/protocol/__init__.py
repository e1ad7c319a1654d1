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

import enum
import itertools
import math
import struct
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self

import msgpack
import numpy as np

from . import unpacking
from ..compression import COMPRESSIONS, check_method
from ..exceptions import ConfigError, MessageTooLarge, ProtocolError, describe
from ..secagg import (
    MAX_CLIENTS,
    AdvertiseKeys,
    ForwardedShares,
    MaskedInput,
    NeighbourKeys,
    SecAggConfig,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from ..tensors import DTYPES, Weights, decode_tensor, decode_weights, encode_tensor, encode_weights, tensor_nbytes
from ..tensors import MAX_DIM as MAX_TENSOR_DIM
from ..tensors import MAX_DIMS as MAX_TENSOR_DIMS
from ..tensors import MAX_NAME as MAX_TENSOR_NAME

__all__ = [
    "PROTOCOL_VERSION",
    "ERROR_CODES",
    "Message",
    "Hello",
    "DATA_SPLITS",
    "EVAL_SPLITS",
    "DatasetInfo",
    "Info",
    "Ping",
    "Pong",
    "COMPRESSIONS",
    "TrainingPlan",
    "Fit",
    "FitResult",
    "FitHeld",
    "Fetch",
    "Evaluate",
    "EvalResult",
    "Describe",
    "ModelLayout",
    "Error",
    "QUERIES",
    "Query",
    "QueryResult",
    "SecAggStart",
    "SecAggKeys",
    "SecAggShare",
    "SecAggShares",
    "SecAggMask",
    "SecAggMasked",
    "SecAggUnmask",
    "SecAggUnmasked",
    "Envelope",
    "REQUESTS",
    "reply_kind",
    "STREAM_MAGIC",
    "DEFAULT_CHUNK_SIZE",
    "Outgoing",
    "MessageDecoder",
    "Opened",
    "encode",
    "encode_fragments",
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
    "refused": "the answer would describe a group smaller than the worker's minimum group size,"
    " or a secure aggregation step has fewer clients than the round's threshold",
}

MAX_ID: Final = 2**63 - 1
MAX_NAME: Final = 256
MAX_CLASSES: Final = 100_000
#: The most examples a worker may say it holds, trained on or answers for (a histogram's total, a validation
#: split, a fit result's or a query answer's count): the coordinator weighs updates and sizes secure rounds
#: by these claims, and it keeps every histogram sum within int64.
MAX_SHARD: Final = 2**32
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


def _fields(body: Mapping[str, Any], kind: str, names: set[str], optional: frozenset[str] = frozenset()) -> None:
    """Require exactly ``names``, plus any of ``optional`` (fields a newer peer may add with a default)."""
    _check(
        names <= set(body) <= names | optional,
        f"{kind} body has fields {sorted(body)}, expected {sorted(names)}"
        + (f" and optionally {sorted(optional)}" if optional else ""),
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


#: The most named data sets one worker may advertise.
MAX_DATASETS: Final = 64
#: The splits of a source data set a named data set may hold.
DATA_SPLITS: Final = ("train", "test")
#: What an evaluation may ask a worker to score on instead of its own data: its held-out validation split.
EVAL_SPLITS: Final = ("validation",)


def _check_schema(input_shape: Any, num_classes: Any, histogram: Any, max_examples: Any = None) -> None:
    """Shape and classes; then the class histogram, or, when a worker withholds it, a bound on its size."""
    _check(
        isinstance(input_shape, (list, tuple))
        and 0 < len(input_shape) <= 8
        and all(_is_int(d) and d > 0 for d in input_shape),
        "input_shape must be a list of 1 to 8 positive sizes",
    )
    _check(
        _is_int(num_classes) and 0 < num_classes <= MAX_CLASSES,
        f"num_classes must be an integer from 1 to {MAX_CLASSES}",
    )
    if histogram is None:
        _check(
            _is_int(max_examples) and 0 < max_examples <= MAX_SHARD,
            f"a withheld histogram needs max_examples from 1 to {MAX_SHARD}, not {describe(max_examples)}",
        )
        return
    _check(max_examples is None, "max_examples goes only with a withheld histogram")
    _check_counts(histogram, "histogram")
    _check(len(histogram) == num_classes, "histogram must have num_classes entries")
    _check(sum(histogram) <= MAX_SHARD, f"histogram of {sum(histogram)} examples exceeds limit of {MAX_SHARD}")


def _check_validation_size(value: Any) -> None:
    _check(
        _is_int(value) and 0 <= value <= MAX_SHARD,
        f"validation_size must be a non-negative integer up to {MAX_SHARD}, not {describe(value)}",
    )


def _check_optional_name(value: Any, what: str) -> None:
    if value is not None:
        _check_name(value, what)


@dataclass(frozen=True)
class DatasetInfo:
    """One named data set of a worker's registry (``--dataset-spec``), as :class:`Info` advertises it.

    ``version`` is a digest of the examples held under ``key``, never the
    data; ``histogram`` counts per class the examples the worker trains on
    (the evaluator: scores on), ``validation_size`` those it holds out.
    """

    key: str
    dataset: str  # the source data set, e.g. digits
    split: str  # the source data set's split: train or test
    version: str
    input_shape: tuple[int, ...]
    dtype: str
    num_classes: int
    histogram: tuple[int, ...] | None  # None: withheld (--withhold-histogram), and max_examples bounds its sum
    validation_size: int = 0
    max_examples: int | None = None

    def __post_init__(self) -> None:
        _check_name(self.key, "data set key")
        _check_name(self.dataset, "dataset")
        _check(self.split in DATA_SPLITS, f"split must be train or test, not {describe(self.split)}")
        _check_name(self.version, "version")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, not {describe(self.dtype)}")
        _check_schema(self.input_shape, self.num_classes, self.histogram, self.max_examples)
        _check_validation_size(self.validation_size)
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.histogram is not None:
            object.__setattr__(self, "histogram", tuple(self.histogram))

    @property
    def num_examples(self) -> int:
        """The examples held, or the upper bound a worker that withholds its histogram gives."""
        return sum(self.histogram) if self.histogram is not None else _withheld(self.max_examples)

    def to_body(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dataset": self.dataset,
            "split": self.split,
            "version": self.version,
            "input_shape": list(self.input_shape),
            "dtype": self.dtype,
            "num_classes": self.num_classes,
            **_histogram_fields(self.histogram, self.max_examples),
            **({"validation_size": self.validation_size} if self.validation_size else {}),
        }

    @classmethod
    def from_body(cls, body: Any) -> DatasetInfo:
        _check(isinstance(body, Mapping), "a data set entry must be a map")
        _fields(
            body,
            "data set entry",
            {"key", "dataset", "split", "version", "input_shape", "dtype", "num_classes"},
            frozenset({"histogram", "validation_size", "max_examples"}),
        )
        return cls(**{"histogram": None, **body})


@dataclass(frozen=True)
class Info(Message):
    """What a worker holds, without the data itself.

    The top-level fields describe the data it serves by default (its first
    named data set, if it has any); ``validation_size`` counts the examples
    it holds out for validation and never trains on.
    """

    kind: ClassVar[str] = "info"
    worker_id: str
    role: str  # "trainer" or "evaluator"
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    histogram: tuple[int, ...] | None  # examples per class; None: withheld, and max_examples bounds their sum
    models: tuple[str, ...]  # model names the worker can build
    protocol_version: int = PROTOCOL_VERSION
    validation_size: int = 0
    datasets: tuple[DatasetInfo, ...] = ()  # the worker's named data sets; empty without --dataset-spec
    max_examples: int | None = None  # with a withheld histogram: a power of two at least the examples held

    def __post_init__(self) -> None:
        _check_name(self.worker_id, "worker_id")
        _check(self.role in ("trainer", "evaluator"), f"role must be trainer or evaluator, not {describe(self.role)}")
        _check_name(self.dataset, "dataset")
        _check_schema(self.input_shape, self.num_classes, self.histogram, self.max_examples)
        _check(isinstance(self.models, (list, tuple)) and len(self.models) <= 1000, "models must be a list")
        for name in self.models:
            _check_name(name, "model name")
        _check(_is_int(self.protocol_version), "protocol_version must be an integer")
        _check_validation_size(self.validation_size)
        _check(
            isinstance(self.datasets, (list, tuple))
            and len(self.datasets) <= MAX_DATASETS
            and all(isinstance(entry, DatasetInfo) for entry in self.datasets),
            f"datasets must be a list of at most {MAX_DATASETS} data set entries",
        )
        keys = [entry.key for entry in self.datasets]
        _check(len(set(keys)) == len(keys), f"data set keys {describe(keys)} must be distinct")
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.histogram is not None:
            object.__setattr__(self, "histogram", tuple(self.histogram))
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "datasets", tuple(self.datasets))

    @property
    def num_examples(self) -> int:
        """The examples held, or the upper bound a worker that withholds its histogram gives."""
        return sum(self.histogram) if self.histogram is not None else _withheld(self.max_examples)

    def to_body(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            **_histogram_fields(self.histogram, self.max_examples),
            "models": list(self.models),
            "protocol_version": self.protocol_version,
            # Defaults stay off the wire: a worker without a validation split or named data sets reads as before.
            **({"validation_size": self.validation_size} if self.validation_size else {}),
            **({"datasets": [entry.to_body() for entry in self.datasets]} if self.datasets else {}),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Info:
        _fields(
            body,
            cls.kind,
            {"worker_id", "role", "dataset", "input_shape", "num_classes", "models", "protocol_version"},
            frozenset({"histogram", "validation_size", "datasets", "max_examples"}),
        )
        entries = body.get("datasets", [])
        _check(
            isinstance(entries, list) and len(entries) <= MAX_DATASETS,
            f"datasets must be a list of at most {MAX_DATASETS} data set entries",
        )
        return cls(**{"histogram": None, **body, "datasets": tuple(DatasetInfo.from_body(entry) for entry in entries)})


def _histogram_fields(histogram: tuple[int, ...] | None, max_examples: int | None) -> dict[str, Any]:
    """The histogram on the wire, or in its place the bound of a worker that withholds it."""
    return {"histogram": list(histogram)} if histogram is not None else {"max_examples": max_examples}


def _withheld(max_examples: int | None) -> int:
    assert max_examples is not None, "validated on construction"
    return max_examples


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
    """How a worker trains in one round: plain SGD over ``num_batches`` batches.

    Zero batches send the weights straight back: a round of pure transfer,
    for benchmarks and link checks.

    ``mu`` adds FedProx's proximal term ``mu/2 * ||w - w_global||^2`` to the
    loss (Li et al. 2020). With ``delta`` the worker sends back its update
    ``w - w_global`` instead of ``w``: asynchronous rounds need it (the
    coordinator has moved on from the worker's base model) and it compresses
    far better. ``compress`` names the encoding of the reply's tensors.

    Differential privacy (DP-FedAvg, McMahan et al. 2018): with ``clip`` the
    worker sends only its float tensors' update, scaled down to L2 norm at
    most ``clip``, plus Gaussian noise of standard deviation ``noise_std``
    per value (its share of distributed noise; 0 in central mode).

    With ``hold`` the worker keeps its reply and answers :class:`FitHeld`;
    the coordinator takes the update with :class:`Fetch` when it has room for
    it. This is flow control: the coordinator bounds how many updates it
    receives at once without leaving any connection unread.
    """

    round: int
    batch_size: int
    num_batches: int
    lr: float
    seed: int
    mu: float = 0.0
    delta: bool = False
    compress: str = "none"
    clip: float | None = None
    noise_std: float = 0.0
    hold: bool = False

    def __post_init__(self) -> None:
        _check(_is_int(self.round) and 1 <= self.round <= MAX_ID, "round must be a positive integer")
        _check(
            _is_int(self.batch_size) and 1 <= self.batch_size <= MAX_PLAN_SIZE,
            f"batch_size must be an integer from 1 to 1000000, not {describe(self.batch_size)}",
        )
        _check(
            _is_int(self.num_batches) and 0 <= self.num_batches <= MAX_PLAN_SIZE,
            f"num_batches must be an integer from 0 to 1000000, not {describe(self.num_batches)}",
        )
        _check(_is_number(self.lr) and self.lr > 0, f"lr must be a positive finite number, not {describe(self.lr)}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed must be a non-negative 63-bit integer")
        _check(
            _is_number(self.mu) and self.mu >= 0, f"mu must be a non-negative finite number, not {describe(self.mu)}"
        )
        _check(type(self.delta) is bool, f"delta must be true or false, not {describe(self.delta)}")
        _check(
            self.compress in COMPRESSIONS,
            f"compress must be one of {', '.join(COMPRESSIONS)}, not {describe(self.compress)}",
        )
        _check(
            self.clip is None or (_is_number(self.clip) and self.clip > 0),
            f"clip must be a positive finite number, not {describe(self.clip)}",
        )
        _check(
            _is_number(self.noise_std) and self.noise_std >= 0,
            f"noise_std must be a non-negative finite number, not {describe(self.noise_std)}",
        )
        _check(type(self.hold) is bool, f"hold must be true or false, not {describe(self.hold)}")
        _check(self.clip is None or self.delta, "clip needs delta: it bounds the update, not the weights")
        _check(self.clip is not None or not self.noise_std, "noise_std needs clip: the noise is scaled to the clip")

    def to_body(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "lr": float(self.lr),
            "seed": self.seed,
            # Defaults stay off the wire, so a plain FedAvg plan reads the same to any version-1 peer.
            **({"mu": float(self.mu)} if self.mu else {}),
            **({"delta": True} if self.delta else {}),
            **({"compress": self.compress} if self.compress != "none" else {}),
            **({"clip": float(self.clip)} if self.clip is not None else {}),
            **({"noise_std": float(self.noise_std)} if self.noise_std else {}),
            **({"hold": True} if self.hold else {}),
        }

    @classmethod
    def from_body(cls, body: Any) -> TrainingPlan:
        _check(isinstance(body, Mapping), "plan must be a map")
        _fields(
            body,
            "plan",
            {"round", "batch_size", "num_batches", "lr", "seed"},
            frozenset({"mu", "delta", "compress", "clip", "noise_std", "hold"}),
        )
        return cls(**body)


def _weights_equal(a: Weights, b: Weights) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _optional_weights_equal(a: Weights | None, b: Weights | None) -> bool:
    return a is b if a is None or b is None else _weights_equal(a, b)


@dataclass(frozen=True, eq=False)
class Fit(Message):
    """Train the named model, starting from ``weights``, on the worker's shard.

    ``control`` is SCAFFOLD's server control variate (Karimireddy et al.
    2020): with it, the worker corrects each gradient by ``control - c_i``
    and returns how its own variate ``c_i`` moved.
    """

    kind: ClassVar[str] = "fit"
    model: str
    weights: Weights
    plan: TrainingPlan
    control: Weights | None = None
    dataset_key: str | None = None  # which named data set to train on; None: the worker's default

    def __post_init__(self) -> None:
        _check_name(self.model, "model")
        _check_weights(self.weights)
        _check(isinstance(self.plan, TrainingPlan), "plan must be a TrainingPlan")
        if self.control is not None:
            _check_weights(self.control)
        _check_optional_name(self.dataset_key, "dataset_key")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fit):
            return NotImplemented
        return (
            self.model == other.model
            and self.plan == other.plan
            and self.dataset_key == other.dataset_key
            and _weights_equal(self.weights, other.weights)
            and _optional_weights_equal(self.control, other.control)
        )

    def to_body(self) -> dict[str, Any]:
        body = {"model": self.model, "weights": encode_weights(self.weights), "plan": self.plan.to_body()}
        if self.control is not None:
            body["control"] = encode_weights(self.control)
        if self.dataset_key is not None:
            body["dataset_key"] = self.dataset_key
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Fit:
        _fields(body, cls.kind, {"model", "weights", "plan"}, frozenset({"control", "dataset_key"}))
        control = decode_weights(body["control"]) if "control" in body else None
        return cls(
            body["model"],
            decode_weights(body["weights"]),
            TrainingPlan.from_body(body["plan"]),
            control,
            body.get("dataset_key"),
        )


@dataclass(frozen=True, eq=False)
class FitResult(Message):
    """A worker's trained weights (or update, when the plan asked for a delta), its example count and loss.

    ``control_delta`` is how the worker's SCAFFOLD control variate moved,
    when the request carried a server control variate. ``dp_epsilon`` is the
    epsilon a worker that trains with example-level DP-SGD has spent on its
    examples so far, at its own delta; ``None`` (and off the wire) without.
    """

    kind: ClassVar[str] = "fit_result"
    weights: Weights
    num_examples: int
    loss: float
    seconds: float = 0.0
    control_delta: Weights | None = None
    compression_error: float = 0.0  # relative L2 error the reply's compression put into its tensors
    dp_epsilon: float | None = None

    def __post_init__(self) -> None:
        _check_weights(self.weights)
        _check(
            _is_int(self.num_examples) and 0 < self.num_examples <= MAX_SHARD,
            f"num_examples must be a positive integer up to {MAX_SHARD}, not {describe(self.num_examples)}",
        )
        _check(_is_number(self.loss), "loss must be a finite number")
        _check(_is_number(self.seconds) and self.seconds >= 0, "seconds must be a non-negative number")
        if self.control_delta is not None:
            _check_weights(self.control_delta)
        _check(
            _is_number(self.compression_error) and self.compression_error >= 0,
            "compression_error must be a non-negative number",
        )
        _check(
            self.dp_epsilon is None or (_is_number(self.dp_epsilon) and self.dp_epsilon >= 0),
            "dp_epsilon must be a non-negative number",
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FitResult):
            return NotImplemented
        return (
            (self.num_examples, self.loss, self.seconds) == (other.num_examples, other.loss, other.seconds)
            and _weights_equal(self.weights, other.weights)
            and _optional_weights_equal(self.control_delta, other.control_delta)
        )

    def to_body(self) -> dict[str, Any]:
        body = {
            "weights": encode_weights(self.weights),
            "num_examples": self.num_examples,
            "loss": float(self.loss),
            "seconds": float(self.seconds),
        }
        if self.control_delta is not None:
            body["control_delta"] = encode_weights(self.control_delta)
        if self.compression_error:
            body["compression_error"] = float(self.compression_error)
        if self.dp_epsilon is not None:
            body["dp_epsilon"] = float(self.dp_epsilon)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> FitResult:
        _fields(
            body,
            cls.kind,
            {"weights", "num_examples", "loss", "seconds"},
            frozenset({"control_delta", "compression_error", "dp_epsilon"}),
        )
        control_delta = decode_weights(body["control_delta"]) if "control_delta" in body else None
        return cls(
            decode_weights(body["weights"]),
            body["num_examples"],
            body["loss"],
            body["seconds"],
            control_delta,
            body.get("compression_error", 0.0),
            body.get("dp_epsilon"),
        )


@dataclass(frozen=True)
class _Token(Message):
    """A message whose body is one token: the handle of an update a worker holds (flow control)."""

    token: int

    def __post_init__(self) -> None:
        _check(
            _is_int(self.token) and 1 <= self.token <= MAX_ID,
            f"token must be a positive integer, not {describe(self.token)}",
        )

    def to_body(self) -> dict[str, Any]:
        return {"token": self.token}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        _fields(body, cls.kind, {"token"})
        return cls(body["token"])


@dataclass(frozen=True)
class FitHeld(_Token):
    """The answer to a fit whose plan holds the reply: the worker trained and keeps the update under ``token``."""

    kind: ClassVar[str] = "fit_held"


@dataclass(frozen=True)
class Fetch(_Token):
    """Send the update held under ``token`` (see :class:`FitHeld`); answered with :class:`FitResult`."""

    kind: ClassVar[str] = "fetch"


@dataclass(frozen=True, eq=False)
class Evaluate(Message):
    """Evaluate the named model with ``weights`` on the worker's data.

    By default a worker scores on the examples it holds (the evaluator's test
    set, a trainer's training shard); ``split="validation"`` asks a trainer
    for its held-out validation split instead (federated evaluation).
    ``dataset_key`` picks one of its named data sets.
    """

    kind: ClassVar[str] = "evaluate"
    model: str
    weights: Weights
    batch_size: int
    split: str | None = None
    dataset_key: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.model, "model")
        _check_weights(self.weights)
        _check(
            _is_int(self.batch_size) and 1 <= self.batch_size <= MAX_PLAN_SIZE,
            "batch_size must be an integer from 1 to 1000000",
        )
        _check(
            self.split is None or self.split in EVAL_SPLITS,
            f"split must be one of {', '.join(EVAL_SPLITS)}, not {describe(self.split)}",
        )
        _check_optional_name(self.dataset_key, "dataset_key")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Evaluate):
            return NotImplemented
        return (self.model, self.batch_size, self.split, self.dataset_key) == (
            other.model,
            other.batch_size,
            other.split,
            other.dataset_key,
        ) and _weights_equal(self.weights, other.weights)

    def to_body(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "weights": encode_weights(self.weights),
            "batch_size": self.batch_size,
            **({"split": self.split} if self.split is not None else {}),
            **({"dataset_key": self.dataset_key} if self.dataset_key is not None else {}),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Evaluate:
        _fields(body, cls.kind, {"model", "weights", "batch_size"}, frozenset({"split", "dataset_key"}))
        return cls(
            body["model"],
            decode_weights(body["weights"]),
            body["batch_size"],
            body.get("split"),
            body.get("dataset_key"),
        )


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


#: The most tensors a model layout may list (as many as weights may hold).
MAX_LAYOUT_TENSORS: Final = 100_000


@dataclass(frozen=True)
class Describe(Message):
    """Ask for the parameter layout of a named model, so a client in any language can build its initial weights."""

    kind: ClassVar[str] = "describe"
    model: str

    def __post_init__(self) -> None:
        _check_name(self.model, "model")

    def to_body(self) -> dict[str, Any]:
        return {"model": self.model}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Describe:
        _fields(body, cls.kind, {"model"})
        return cls(body["model"])


def _check_spec(entry: Any) -> None:
    _check(
        isinstance(entry, (list, tuple))
        and len(entry) == 3
        and isinstance(entry[0], str)
        and 0 < len(entry[0]) <= MAX_TENSOR_NAME
        and entry[1] in DTYPES
        and isinstance(entry[2], (list, tuple))
        and len(entry[2]) <= MAX_TENSOR_DIMS
        and all(_is_int(dim) and 0 <= dim <= MAX_TENSOR_DIM for dim in entry[2]),
        f"a tensor must be [name of 1 to {MAX_TENSOR_NAME} characters, one of {', '.join(DTYPES)},"
        f" shape of at most {MAX_TENSOR_DIMS} sizes up to {MAX_TENSOR_DIM}], not {describe(entry)}",
    )


@dataclass(frozen=True)
class ModelLayout(Message):
    """The answer to :class:`Describe`: the model's state as ``(name, dtype, shape)``, in the model's order.

    A fit or evaluate request must carry exactly these tensors (in any order).
    """

    kind: ClassVar[str] = "model_layout"
    model: str
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        _check_name(self.model, "model")
        _check(
            isinstance(self.tensors, (list, tuple)) and len(self.tensors) <= MAX_LAYOUT_TENSORS,
            f"tensors must be a list of at most {MAX_LAYOUT_TENSORS} entries",
        )
        for entry in self.tensors:
            _check_spec(entry)
        tensors = tuple((name, dtype, tuple(shape)) for name, dtype, shape in self.tensors)
        _check(len({name for name, _, _ in tensors}) == len(tensors), "tensor names must be distinct")
        object.__setattr__(self, "tensors", tensors)

    def to_body(self) -> dict[str, Any]:
        return {"model": self.model, "tensors": [[name, dtype, list(shape)] for name, dtype, shape in self.tensors]}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ModelLayout:
        _fields(body, cls.kind, {"model", "tensors"})
        return cls(body["model"], body["tensors"])


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


#: Federated analytics queries a worker answers over the data it holds (see ``syncfed.analytics``).
QUERIES: Final = ("label-histogram", "feature-stats", "quantiles")
#: Bounds of a query: feature indices (into the flattened input), histogram
#: bins, and histogram cells (selected features times bins plus two).
MAX_FEATURES: Final = 2**24
MAX_BINS: Final = 4096
MAX_CELLS: Final = 2**22


@dataclass(frozen=True)
class Query(Message):
    """Ask for statistics over the worker's data, never its rows.

    ``features`` are indices into the flattened input, sorted and distinct.
    A ``quantiles`` query fixes the histogram every worker fills: ``bins``
    equal bins over ``value_range``, plus a cell below it and one above; the
    other queries leave both ``None``.
    """

    kind: ClassVar[str] = "query"
    query: str
    features: tuple[int, ...] = ()
    bins: int | None = None
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check(self.query in QUERIES, f"query must be one of {', '.join(QUERIES)}, not {describe(self.query)}")
        _check(
            isinstance(self.features, (list, tuple))
            and len(self.features) <= MAX_FEATURES
            and all(_is_int(index) and 0 <= index < MAX_FEATURES for index in self.features),
            f"features must be a list of at most {MAX_FEATURES} indices in 0..{MAX_FEATURES - 1}",
        )
        features = tuple(self.features)
        # Linear and without copies: a peer picks the list's length.
        _check(all(a < b for a, b in itertools.pairwise(features)), "features must be sorted and distinct")
        _check(self.query != "label-histogram" or not features, "label-histogram takes no features")
        if self.query == "quantiles":
            bins, value_range = self.bins, self.value_range
            _check(
                type(bins) is int and 1 <= bins <= MAX_BINS,
                f"bins must be an integer from 1 to {MAX_BINS}, not {describe(bins)}",
            )
            _check(
                isinstance(value_range, (list, tuple))
                and len(value_range) == 2
                and all(_is_number(bound) for bound in value_range)
                and math.isfinite(float(value_range[1]) - float(value_range[0]))
                and value_range[0] < value_range[1],
                f"range must be two finite numbers low < high, not {describe(value_range)}",
            )
            assert bins is not None and value_range is not None
            _check(
                len(features) * (bins + 2) <= MAX_CELLS,
                f"{len(features)} features of {bins} bins exceed limit of {MAX_CELLS} histogram cells",
            )
            object.__setattr__(self, "value_range", (float(value_range[0]), float(value_range[1])))
            _check(
                bool((np.diff(self.edges) > 0).all()),
                f"range {describe(value_range)} is too narrow for {bins} distinct bins",
            )
        elif self.query == "feature-stats" and self.value_range is not None:
            # A clipping range: workers clip every value to it (bounded sensitivity for --dp-epsilon).
            value_range = self.value_range
            _check(self.bins is None, "feature-stats takes no bins")
            _check(
                isinstance(value_range, (list, tuple))
                and len(value_range) == 2
                and all(_is_number(bound) for bound in value_range)
                and math.isfinite(float(value_range[1]) - float(value_range[0]))
                and value_range[0] < value_range[1],
                f"clipping range must be two finite numbers low < high, not {describe(value_range)}",
            )
            object.__setattr__(self, "value_range", (float(value_range[0]), float(value_range[1])))
        else:
            _check(self.bins is None and self.value_range is None, f"{self.query} takes no bins or range")
        object.__setattr__(self, "features", features)

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` edges of a quantiles query's bins; the last bin includes its right edge."""
        assert self.bins is not None and self.value_range is not None, f"{self.query} has no bins"
        return np.linspace(*self.value_range, self.bins + 1)

    def to_body(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "features": list(self.features),
            "bins": self.bins,
            "range": None if self.value_range is None else list(self.value_range),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Query:
        _fields(body, cls.kind, {"query", "features", "bins", "range"})
        return cls(body["query"], body["features"], body["bins"], body["range"])


#: The tensors of each query's answer and their dtypes.
_QUERY_TENSORS: Final[dict[str, dict[str, str]]] = {
    "label-histogram": {"labels": "int64"},
    "feature-stats": {"mean": "float64", "m2": "float64", "pooled": "float64"},
    "quantiles": {"histogram": "int64", "pooled": "int64"},
}


@dataclass(frozen=True, eq=False)
class QueryResult(Message):
    """A worker's local statistics for a :class:`Query`, which the coordinator combines.

    ``num_examples`` is the number of examples the answer covers (the
    worker's data), ``num_features`` the size of one flattened example.
    ``tensors`` by query:

    - ``label-histogram``: ``labels`` int64 [classes], examples per class;
    - ``feature-stats``: ``mean`` and ``m2`` float64 [features], each selected
      feature's mean and sum of squared deviations from it; ``pooled``
      float64 [2], the same over every value of every feature;
    - ``quantiles``: ``histogram`` int64 [features, bins + 2], each selected
      feature's cells (below the range, the bins, above it); ``pooled``
      int64 [bins + 2], the cells of every value of every feature.
    """

    kind: ClassVar[str] = "query_result"
    query: str
    num_examples: int
    num_features: int
    tensors: Weights

    def __post_init__(self) -> None:
        _check(self.query in QUERIES, f"query must be one of {', '.join(QUERIES)}, not {describe(self.query)}")
        _check(
            _is_int(self.num_examples) and 0 < self.num_examples <= MAX_SHARD,
            f"num_examples must be an integer from 1 to {MAX_SHARD}, not {describe(self.num_examples)}",
        )
        _check(
            _is_int(self.num_features) and 0 < self.num_features <= MAX_FEATURES,
            f"num_features must be an integer from 1 to {MAX_FEATURES}, not {describe(self.num_features)}",
        )
        _check_weights(self.tensors)
        expected = _QUERY_TENSORS[self.query]
        _check(
            list(self.tensors) == list(expected),
            f"{self.query} answer has tensors {describe(list(self.tensors))}, expected {list(expected)}",
        )
        for name, dtype in expected.items():
            _check(self.tensors[name].dtype == np.dtype(dtype), f"tensor {name} must be {dtype}")
        if self.query == "label-histogram":
            labels = self.tensors["labels"]
            _check(labels.ndim == 1 and 0 < len(labels) <= MAX_CLASSES, f"labels must hold 1 to {MAX_CLASSES} counts")
            _check_histogram(labels, self.num_examples, "labels")
        elif self.query == "feature-stats":
            mean, m2, pooled = self.tensors["mean"], self.tensors["m2"], self.tensors["pooled"]
            _check(
                mean.ndim == 1 and mean.shape == m2.shape and len(mean) <= self.num_features and pooled.shape == (2,),
                "mean and m2 must have one entry per selected feature, and pooled two",
            )
            _check(all(np.isfinite(array).all() for array in (mean, m2, pooled)), "feature statistics must be finite")
            _check(bool((m2 >= 0).all()) and pooled[1] >= 0, "m2 must not be negative")
        else:
            histogram, pooled = self.tensors["histogram"], self.tensors["pooled"]
            _check(
                histogram.ndim == 2
                and histogram.shape[0] <= self.num_features
                and 3 <= histogram.shape[1] <= MAX_BINS + 2
                and pooled.shape == histogram.shape[1:],
                f"histogram must be [features, bins + 2] with 1 to {MAX_BINS} bins, and pooled [bins + 2]",
            )
            _check_histogram(histogram, self.num_examples, "histogram")
            _check_histogram(pooled, self.num_examples * self.num_features, "pooled")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueryResult):
            return NotImplemented
        return (self.query, self.num_examples, self.num_features) == (
            other.query,
            other.num_examples,
            other.num_features,
        ) and _weights_equal(self.tensors, other.tensors)

    def to_body(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "num_examples": self.num_examples,
            "num_features": self.num_features,
            "tensors": encode_weights(self.tensors),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> QueryResult:
        _fields(body, cls.kind, {"query", "num_examples", "num_features", "tensors"})
        return cls(body["query"], body["num_examples"], body["num_features"], decode_weights(body["tensors"]))


def _check_histogram(counts: np.ndarray, total: int, what: str) -> None:
    """Every row of ``counts`` is non-negative and sums to ``total``.

    Entries are bounded before they are summed, and a sum that could pass
    int64 is taken in Python integers, so a peer cannot make it wrap around.
    """
    _check(bool(((counts >= 0) & (counts <= total)).all()), f"{what} counts must be from 0 to {total}")
    if total * counts.shape[-1] < 2**63:
        exact = bool((counts.sum(axis=-1) == total).all())
    else:
        exact = all(sum(row) == total for row in counts.reshape(-1, counts.shape[-1]).tolist())
    _check(exact, f"{what} counts must sum to {total}")


# Secure aggregation (Bonawitz et al. 2017; the rules are in ``syncfed.secagg``)
#
# The coordinator carries each step's messages between the workers; maps keyed
# by client id travel as lists of [id, value] pairs, since msgpack map keys are
# strings here. A request names the round's session so that a worker never
# mixes two rounds.

#: Bytes of a round's session string (see ``SecAggConfig``).
MAX_SESSION: Final = 64
_SECAGG_INTS: Final = ("num_clients", "threshold", "length", "graph_seed", "bits", "max_count")


def _check_session(value: Any) -> None:
    _check(
        isinstance(value, bytes) and 0 < len(value) <= MAX_SESSION,
        f"session must be 1 to {MAX_SESSION} bytes, not {describe(value)}",
    )


def _check_client(value: Any, what: str) -> None:
    _check(_is_int(value) and 0 <= value < MAX_CLIENTS, f"{what} must be a client id below {MAX_CLIENTS}")


def _pairs(by_client: Mapping[int, Any]) -> list[list[Any]]:
    return [[client, value] for client, value in sorted(by_client.items())]


def _by_client(value: Any, what: str) -> dict[int, Any]:
    """A map keyed by client id from its wire form; the secagg message built from it checks the values."""
    _check(
        isinstance(value, list)
        and len(value) <= MAX_CLIENTS
        and all(isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0]) for pair in value),
        f"{what} must be a list of at most {MAX_CLIENTS} [client id, value] pairs",
    )
    result = {pair[0]: pair[1] for pair in value}
    _check(len(result) == len(value), f"{what} lists a client twice")
    return result


def _secagg_config_body(config: SecAggConfig) -> dict[str, Any]:
    return {
        **{name: getattr(config, name) for name in _SECAGG_INTS},
        "clip": float(config.clip),
        "session": config.session,
        **({"neighbours": config.neighbours} if config.neighbours is not None else {}),
    }


def _secagg_config(body: Any) -> SecAggConfig:
    """A round's settings from the wire: a setting out of range is the peer's fault, so a ProtocolError."""
    _check(isinstance(body, Mapping), "secure aggregation config must be a map")
    _fields(body, "secure aggregation config", {*_SECAGG_INTS, "clip", "session"}, frozenset({"neighbours"}))
    for name in (*_SECAGG_INTS, *(("neighbours",) if "neighbours" in body else ())):
        _check(_is_int(body[name]), f"{name} must be an integer, not {describe(body[name])}")
    _check(_is_number(body["clip"]), f"clip must be a finite number, not {describe(body['clip'])}")
    _check_session(body["session"])
    try:
        return SecAggConfig(**body)
    except ConfigError as exc:
        raise ProtocolError(f"invalid secure aggregation config: {exc}") from None


@dataclass(frozen=True)
class SecAggStart(Message):
    """Open a secure aggregation round on this connection as client ``client``; answered with :class:`SecAggKeys`."""

    kind: ClassVar[str] = "secagg_start"
    config: SecAggConfig
    client: int

    def __post_init__(self) -> None:
        _check(isinstance(self.config, SecAggConfig), "config must be a SecAggConfig")
        _check(
            _is_int(self.client) and 0 <= self.client < self.config.num_clients,
            f"client id {describe(self.client)} must be below the {self.config.num_clients} clients",
        )

    def to_body(self) -> dict[str, Any]:
        return {"config": _secagg_config_body(self.config), "client": self.client}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggStart:
        _fields(body, cls.kind, {"config", "client"})
        return cls(_secagg_config(body["config"]), body["client"])


@dataclass(frozen=True)
class SecAggKeys(Message):
    """Step 0's answer: the worker's two public keys."""

    kind: ClassVar[str] = "secagg_keys"
    keys: AdvertiseKeys

    def __post_init__(self) -> None:
        _check(isinstance(self.keys, AdvertiseKeys), "keys must be AdvertiseKeys")

    def to_body(self) -> dict[str, Any]:
        return {"client": self.keys.client, "c_public": self.keys.c_public, "s_public": self.keys.s_public}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggKeys:
        _fields(body, cls.kind, {"client", "c_public", "s_public"})
        return cls(AdvertiseKeys(body["client"], body["c_public"], body["s_public"]))


@dataclass(frozen=True)
class SecAggShare(Message):
    """Step 1: the public keys of the worker's neighbours; answered with :class:`SecAggShares`."""

    kind: ClassVar[str] = "secagg_share"
    session: bytes
    keys: NeighbourKeys

    def __post_init__(self) -> None:
        _check_session(self.session)
        _check(isinstance(self.keys, NeighbourKeys), "keys must be NeighbourKeys")

    def to_body(self) -> dict[str, Any]:
        return {"session": self.session, "c_public": _pairs(self.keys.c_public), "s_public": _pairs(self.keys.s_public)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggShare:
        _fields(body, cls.kind, {"session", "c_public", "s_public"})
        keys = NeighbourKeys(
            _by_client(body["c_public"], "encryption public keys"), _by_client(body["s_public"], "masking public keys")
        )
        return cls(body["session"], keys)


@dataclass(frozen=True)
class SecAggShares(Message):
    """Step 1's answer: the worker's shares, encrypted for each neighbour (the coordinator cannot read them)."""

    kind: ClassVar[str] = "secagg_shares"
    shares: ShareKeys

    def __post_init__(self) -> None:
        _check(isinstance(self.shares, ShareKeys), "shares must be ShareKeys")

    def to_body(self) -> dict[str, Any]:
        return {"client": self.shares.client, "ciphertexts": _pairs(self.shares.ciphertexts)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggShares:
        _fields(body, cls.kind, {"client", "ciphertexts"})
        return cls(ShareKeys(body["client"], _by_client(body["ciphertexts"], "ciphertexts")))


@dataclass(frozen=True, eq=False)
class SecAggMask(Message):
    """Step 2: the shares addressed to the worker, and the task whose result it masks.

    For a :class:`Fit` the worker trains as asked, then masks its float
    tensors' update and its example count (or 1, when not ``weighted``). For
    a :class:`Query` it masks its answer as sums (see
    :func:`syncfed.analytics.sums`) and a count of 1: answers are summed
    unweighted. Answered with :class:`SecAggMasked`; on the wire the task
    travels under its kind, ``fit`` or ``query``.
    """

    kind: ClassVar[str] = "secagg_mask"
    session: bytes
    shares: ForwardedShares
    task: Fit | Query
    weighted: bool = True

    def __post_init__(self) -> None:
        _check_session(self.session)
        _check(isinstance(self.shares, ForwardedShares), "shares must be ForwardedShares")
        _check(isinstance(self.task, (Fit, Query)), "task must be a Fit or a Query")
        _check(type(self.weighted) is bool, f"weighted must be true or false, not {describe(self.weighted)}")
        _check(isinstance(self.task, Fit) or not self.weighted, "a query's answers are summed unweighted")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecAggMask):
            return NotImplemented
        return (self.session, self.shares, self.weighted) == (other.session, other.shares, other.weighted) and (
            self.task == other.task
        )

    def to_body(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "ciphertexts": _pairs(self.shares.ciphertexts),
            self.task.kind: self.task.to_body(),
            "weighted": self.weighted,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggMask:
        _fields(body, cls.kind, {"session", "ciphertexts", "weighted"}, frozenset({"fit", "query"}))
        tasks = [kind for kind in ("fit", "query") if kind in body]
        _check(len(tasks) == 1, f"{cls.kind} must carry one task, a fit or a query, not {describe(tasks)}")
        (kind,) = tasks
        _check(isinstance(body[kind], dict), f"{kind} must be a map")
        task = Fit.from_body(body[kind]) if kind == "fit" else Query.from_body(body[kind])
        shares = ForwardedShares(_by_client(body["ciphertexts"], "ciphertexts"))
        return cls(body["session"], shares, task, body["weighted"])


@dataclass(frozen=True, eq=False)
class SecAggMasked(Message):
    """Step 2's answer: the masked ring vector, and the training loss and time (in the clear, like a fit's)."""

    kind: ClassVar[str] = "secagg_masked"
    masked: MaskedInput
    loss: float
    seconds: float = 0.0

    def __post_init__(self) -> None:
        _check(isinstance(self.masked, MaskedInput), "masked must be a MaskedInput")
        _check(_is_number(self.loss), "loss must be a finite number")
        _check(_is_number(self.seconds) and self.seconds >= 0, "seconds must be a non-negative number")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecAggMasked):
            return NotImplemented
        mine, theirs = self.masked, other.masked
        return (
            (mine.client, self.loss, self.seconds) == (theirs.client, other.loss, other.seconds)
            and mine.vector.dtype == theirs.vector.dtype
            and np.array_equal(mine.vector, theirs.vector)
        )

    def to_body(self) -> dict[str, Any]:
        return {
            "client": self.masked.client,
            "vector": encode_tensor(self.masked.vector),
            "loss": float(self.loss),
            "seconds": float(self.seconds),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggMasked:
        _fields(body, cls.kind, {"client", "vector", "loss", "seconds"})
        _check_client(body["client"], "client")
        vector = decode_tensor(body["vector"], name="masked input")
        return cls(MaskedInput(body["client"], vector), body["loss"], body["seconds"])


@dataclass(frozen=True)
class SecAggUnmask(Message):
    """Step 3: who sent a masked input and who dropped after sharing keys; answered with :class:`SecAggUnmasked`."""

    kind: ClassVar[str] = "secagg_unmask"
    session: bytes
    request: UnmaskRequest

    def __post_init__(self) -> None:
        _check_session(self.session)
        _check(isinstance(self.request, UnmaskRequest), "request must be an UnmaskRequest")

    def to_body(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "survivors": list(self.request.survivors),
            "dropped": list(self.request.dropped),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggUnmask:
        _fields(body, cls.kind, {"session", "survivors", "dropped"})
        return cls(body["session"], UnmaskRequest(body["survivors"], body["dropped"]))


@dataclass(frozen=True)
class SecAggUnmasked(Message):
    """Step 3's answer: one share per neighbour the request named, of its self-mask seed or of its mask key."""

    kind: ClassVar[str] = "secagg_unmasked"
    shares: UnmaskShares

    def __post_init__(self) -> None:
        _check(isinstance(self.shares, UnmaskShares), "shares must be UnmaskShares")

    def to_body(self) -> dict[str, Any]:
        return {
            "client": self.shares.client,
            "seed_shares": _pairs(self.shares.seed_shares),
            "key_shares": _pairs(self.shares.key_shares),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SecAggUnmasked:
        _fields(body, cls.kind, {"client", "seed_shares", "key_shares"})
        seed_shares = _by_client(body["seed_shares"], "self-mask seed shares")
        key_shares = _by_client(body["key_shares"], "mask key shares")
        return cls(UnmaskShares(body["client"], seed_shares, key_shares))


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


#: A streamed message starts with these four bytes. 0xC7 opens a msgpack
#: extension, which a single-frame message can never start with (it is a map,
#: and extensions are refused), so the two formats cannot be confused.
STREAM_MAGIC: Final = b"\xc7SF1"
_PREFIX: Final = struct.Struct(">4sI")  # the magic, then the header's length
#: Messages larger than this go streamed, in fragments of at most this many bytes.
DEFAULT_CHUNK_SIZE: Final = 4 * 2**20

Buffer = bytes | memoryview


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


def _unpack(data: bytes) -> Any:
    return unpacking.unpack(data)


def _open(envelope: Any) -> tuple[int, str, dict[str, Any]]:
    """Check an unpacked envelope up to its body's fields: the id, version and kind."""
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
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    return request_id, kind, body


def _build(request_id: int, kind: str, body: dict[str, Any]) -> Envelope:
    try:
        message = _KINDS[kind].from_body(body)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # a field of the wrong type reached a constructor
        raise ProtocolError(f"{kind} has an invalid field: {str(exc)[:200]}", request_id=request_id) from None
    return Envelope(request_id, message)


def _decode_frame(data: bytes) -> Envelope:
    return _build(*_open(_unpack(data)))


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
            ProtocolError: if the body is invalid; ``request_id`` holds the id.
        """
        return _build(self.id, self.kind, self.body)


def decode(data: bytes, *, max_size: int | None = None) -> Envelope:
    """Parse and validate one message, single-frame or streamed.

    Single-frame tensors are read-only views of ``data``; streamed ones are
    copied out of it (:class:`MessageDecoder` reads them as they arrive).

    Raises:
        MessageTooLarge: if ``data`` is longer than ``max_size``.
        ProtocolError: if the message is invalid; ``request_id`` holds the id
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
    into them. :meth:`feed` never raises: once a message is too large or
    invalid, the rest is only counted, so the caller reads it to its end and
    the connection goes on. :meth:`finish` raises what was found.
    """

    def __init__(self, *, max_size: int | None = None) -> None:
        self.max_size = max_size
        #: Bytes fed so far.
        self.size = 0
        self._state = _State.START
        self._kept: list[bytes] = []
        self._header = bytearray()
        self._header_size = 0
        self._expected = 0  # the streamed message's total size, once its header is read
        self._opened: tuple[int, str, dict[str, Any]] | None = None
        self._entries: list[tuple[str, dict[str, Any]]] = []
        self._buffers: list[np.ndarray] = []
        self._current = 0  # the tensor being filled
        self._filled = 0  # its bytes so far
        self._error: ProtocolError | None = None
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
                if self._current == len(self._buffers):
                    return
                buffer = self._buffers[self._current]
                take = min(buffer.size - self._filled, len(view))
                buffer[self._filled : self._filled + take] = np.frombuffer(view[:take], dtype=np.uint8)
                view = view[take:]
                self._filled += take
                self._next_tensor()

    def _open_header(self) -> None:
        """Check the header and allocate the tensors' buffers, or discard the message."""
        header, self._header = bytes(self._header), bytearray()
        try:
            self._opened = _open(_unpack(header))
            request_id, _, body = self._opened
            self._entries = _detached(body)
            try:
                sizes = [tensor_nbytes(entry, name=name) for name, entry in self._entries]
            except ProtocolError as exc:
                exc.request_id = request_id
                raise
        except ProtocolError as exc:
            self._error = exc
            self._discard()
            return
        self._expected += sum(sizes)
        if self.max_size is not None and self._expected > self.max_size:
            self._discard()
            return
        self._buffers = [np.empty(size, dtype=np.uint8) for size in sizes]
        self._state = _State.PAYLOAD
        self._next_tensor()

    def _next_tensor(self) -> None:
        while self._current < len(self._buffers) and self._filled == self._buffers[self._current].size:
            self._current += 1
            self._filled = 0

    def _discard(self) -> None:
        if self._state in (_State.START, _State.FRAME):
            self._head = b"".join(itertools.islice(self._kept, unpacking.HEAD_SIZE))[: unpacking.HEAD_SIZE]
        self._state = _State.DISCARD
        self._kept, self._header, self._buffers = [], bytearray(), []

    def _readable_id(self) -> int | None:
        """The id of a dropped message, when its envelope was read or its first bytes hold it."""
        if self._opened is not None:
            return self._opened[0]
        return unpacking.peek_id(self._head) if self._head else None

    def finish(self) -> Envelope:
        """Decode the message, once its last fragment was fed: :meth:`open`, then build it.

        Raises:
            MessageTooLarge: if it was longer than ``max_size`` (it was counted, not kept).
            ProtocolError: if it is invalid; ``request_id`` holds the id when the envelope was readable.
        """
        return self.open().build()

    def open(self) -> Opened:
        """Read the message's envelope, once its last fragment was fed, leaving its body a plain map.

        Decoding is bounded by the message's size (see :mod:`syncfed.unpacking`);
        building the message from its body is left to :meth:`Opened.build`.

        Raises:
            MessageTooLarge: if it was longer than ``max_size`` (it was counted, not kept); ``request_id``
                holds the id when the envelope's id was among the first bytes, or in a streamed header.
            ProtocolError: if it is invalid; ``request_id`` holds the id when the envelope was readable.
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
            return Opened(*_open(_unpack(self._frame)))
        if self._opened is None:  # still in the prefix or the header, or the header declares too much
            raise ProtocolError(f"streamed message ends after {self.size} bytes, inside its header")
        request_id, kind, body = self._opened
        if self.size != self._expected:
            raise ProtocolError(
                f"streamed message has {self.size} bytes, not the {self._expected} its header declares",
                request_id=request_id,
            )
        for (_, entry), buffer in zip(self._entries, self._buffers, strict=True):
            del entry["nbytes"]
            entry["data"] = buffer
        self._buffers = []
        return Opened(request_id, kind, body)
