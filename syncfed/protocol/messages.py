"""The session's own messages: the greeting, liveness, a model's layout and error replies.

``hello`` opens a session and ``info`` answers with what the worker holds
(never the data); ``ping``/``pong`` check liveness while the worker trains;
``describe``/``model_layout`` let a client in any language build initial
weights; ``error`` is every failed request's reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from ..exceptions import describe
from ..tensors import DTYPES
from ..tensors import MAX_DIM as MAX_TENSOR_DIM
from ..tensors import MAX_DIMS as MAX_TENSOR_DIMS
from ..tensors import MAX_NAME as MAX_TENSOR_NAME
from .base import (
    ERROR_CODES,
    MAX_CLASSES,
    MAX_SHARD,
    PROTOCOL_VERSION,
    Message,
    _check,
    _check_counts,
    _check_name,
    _fields,
    _is_int,
)
from .data_messages import DataPlan, DataSchema, plan_field, plan_from
from .task_messages import Recipe, check_recipe, recipe_field, recipe_from

__all__ = [
    "Hello",
    "DATA_SPLITS",
    "MAX_DATASETS",
    "DatasetInfo",
    "Info",
    "Ping",
    "Pong",
    "MAX_LAYOUT_TENSORS",
    "Describe",
    "ModelLayout",
    "Error",
]


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
    schema: DataSchema | None = None  # a user's own data (``syncfed.data``); None: a bundled data set

    def __post_init__(self) -> None:
        _check_name(self.key, "data set key")
        _check_name(self.dataset, "dataset")
        _check(self.split in DATA_SPLITS, f"split must be train or test, not {describe(self.split)}")
        _check_name(self.version, "version")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, not {describe(self.dtype)}")
        _check_schema(self.input_shape, self.num_classes, self.histogram, self.max_examples)
        _check_validation_size(self.validation_size)
        _check_own_schema(self.schema, self.input_shape, self.num_classes)
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
            **({"schema": self.schema.to_body()} if self.schema is not None else {}),
        }

    @classmethod
    def from_body(cls, body: Any) -> DatasetInfo:
        _check(isinstance(body, Mapping), "a data set entry must be a map")
        _fields(
            body,
            "data set entry",
            {"key", "dataset", "split", "version", "input_shape", "dtype", "num_classes"},
            frozenset({"histogram", "validation_size", "max_examples", "schema"}),
        )
        return cls(**{"histogram": None, **body, "schema": _schema_from(body)})


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
    schema: DataSchema | None = None  # the default data set's, when it is the worker's own (``syncfed.data``)

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
        _check_own_schema(self.schema, self.input_shape, self.num_classes)
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
            **({"schema": self.schema.to_body()} if self.schema is not None else {}),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Info:
        _fields(
            body,
            cls.kind,
            {"worker_id", "role", "dataset", "input_shape", "num_classes", "models", "protocol_version"},
            frozenset({"histogram", "validation_size", "datasets", "max_examples", "schema"}),
        )
        entries = body.get("datasets", [])
        _check(
            isinstance(entries, list) and len(entries) <= MAX_DATASETS,
            f"datasets must be a list of at most {MAX_DATASETS} data set entries",
        )
        return cls(
            **{
                "histogram": None,
                **body,
                "datasets": tuple(DatasetInfo.from_body(entry) for entry in entries),
                "schema": _schema_from(body),
            }
        )


def _check_own_schema(schema: Any, input_shape: tuple[int, ...], num_classes: int) -> None:
    """A schema, when given, describes the same shape and class count as the entry's own fields."""
    if schema is None:
        return
    _check(isinstance(schema, DataSchema), "schema must be a DataSchema")
    _check(
        tuple(input_shape) == schema.input_shape,
        f"input_shape {describe(input_shape)} differs from the schema's {describe(schema.input_shape)}",
    )
    _check(
        num_classes == schema.num_classes, f"num_classes {num_classes} differs from the schema's {schema.num_classes}"
    )


def _schema_from(body: Mapping[str, Any]) -> DataSchema | None:
    return DataSchema.from_body(body["schema"]) if body.get("schema") is not None else None


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


#: The most tensors a model layout may list (as many as weights may hold).
MAX_LAYOUT_TENSORS: Final = 100_000


@dataclass(frozen=True)
class Describe(Message):
    """Ask for the parameter layout of a named model, so a client in any language can build its initial weights."""

    kind: ClassVar[str] = "describe"
    model: str
    data: DataPlan | None = None  # a model built from the agreed data plan (own data) has its layout only with it
    recipe: Recipe | None = None  # the task, which sizes a shaped model's output and hidden layers

    def __post_init__(self) -> None:
        _check_name(self.model, "model")
        _check(self.data is None or isinstance(self.data, DataPlan), "data must be a DataPlan")
        check_recipe(self.recipe, self.data)

    def to_body(self) -> dict[str, Any]:
        return {"model": self.model, **plan_field(self.data), **recipe_field(self.recipe)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Describe:
        _fields(body, cls.kind, {"model"}, frozenset({"data", "recipe"}))
        return cls(body["model"], plan_from(body), recipe_from(body))


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
