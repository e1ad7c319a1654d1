"""A user's own data on the wire: what a worker says its data looks like, and what the federation agreed.

A worker that holds its own data (an image folder, a table, arrays; see
``syncfed.data``) describes it in hello's ``info`` with a :class:`DataSchema`:
the kind, the input shape, for tables each feature's name and type, and its
class names (or a continuous label). Never a row, and only the categories of
a column that at least ``--min-group-size`` of its examples hold.

Before round 1 the coordinator unites the workers' schemas into one
:class:`DataPlan` (``syncfed.data.agreement``): one sorted list of class
names, one feature order, one vocabulary per categorical column, and the
statistics every site standardises with. The plan travels in every fit,
evaluate and query request, so a worker holds no per-coordinator state and a
coordinator written in another language needs only this module's fields.

On the wire a list of names is one ``bin`` of UTF-8 names joined by nul
bytes, a table's column types and vocabulary sizes are ``bin`` too, and the
statistics are float64 tensors: an array of strings or floats costs the
bounded decoder (:mod:`syncfed.protocol.unpacking`) far more than its bytes,
so the documented limits could not be reached. :meth:`DataPlan.to_json`
is the readable form a saved model and a checkpoint record.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import msgpack
import numpy as np

from ..exceptions import LocalProtocolError, describe
from ..tensors import decode_tensor, encode_tensor
from .base import MAX_CLASSES, MAX_NAME, _check, _check_name, _fields, _is_int

__all__ = [
    "DATA_KINDS",
    "FEATURE_TYPES",
    "MAX_TABLE_FEATURES",
    "MAX_CATEGORIES",
    "MAX_VOCABULARY",
    "MAX_STATISTICS",
    "SEPARATOR",
    "Feature",
    "DataSchema",
    "DataPlan",
    "encoded_width",
    "plan_from",
    "plan_field",
]

#: What a worker's own data is: an image folder, a table, or arrays (``.npz`` or a Python loader).
DATA_KINDS: Final = ("images", "table", "arrays")
#: A table column is a number, or a category one-hot encoded over the agreed vocabulary.
FEATURE_TYPES: Final = ("numeric", "categorical")
#: The most features (table columns, or named array features) a schema or a plan may list.
MAX_TABLE_FEATURES: Final = 65_536
#: The most categories one categorical column may reveal (a schema) or agree on (a plan).
MAX_CATEGORIES: Final = 10_000
#: The most categories of all columns together, and so the most one-hot slots.
MAX_VOCABULARY: Final = 200_000
#: The most numbers a plan's mean or standard deviation may hold (one per input feature or channel).
MAX_STATISTICS: Final = 2**22


#: Separates the names of a list on the wire (one ``bin`` of UTF-8 names), so no name may contain it.
SEPARATOR: Final = "\x00"
#: A feature's type on the wire: one byte per feature in ``types``.
_TYPE_CODES: Final = {"numeric": 0, "categorical": 1}
_TYPES: Final = tuple(_TYPE_CODES)
#: ``category_counts``: one little-endian uint32 per categorical feature.
_COUNT: Final = np.dtype("<u4")


def _check_names(value: Any, what: str, limit: int) -> None:
    _check(
        isinstance(value, (list, tuple)) and len(value) <= limit,
        f"{what} must be a list of at most {limit} names, not {describe(value)}",
    )
    for name in value:
        if not _is_plain_name(name):  # the reasons are formatted for the first bad name only
            _check_name(name, f"each of {what}")
            raise LocalProtocolError(f"each of {what} must not contain a nul character, not {describe(name)}")
    _check(_distinct(value), f"{what} must be distinct")


def _check_label(value: Any) -> None:
    """An optional label column name: ``None``, or a name as a feature's (1 to 256 characters, no nul)."""
    if value is not None and not _is_plain_name(value):
        _check_name(value, "label")
        raise LocalProtocolError(f"label must not contain a nul character, not {describe(value)}")


def _distinct(names: Iterable[str]) -> bool:
    """No name twice; by sorting, which holds a list of references where a set of 65,536 names holds 4 MiB."""
    return all(a != b for a, b in itertools.pairwise(sorted(names)))


def _is_plain_name(name: Any) -> bool:
    """A name of 1 to MAX_NAME characters without the wire's separator."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and SEPARATOR not in name


def _names_bin(names: Iterable[str]) -> bytes:
    """Names on the wire: their UTF-8 joined by nul bytes; no names, no bytes."""
    return SEPARATOR.join(names).encode()


def _names_from(value: Any, what: str, limit: int) -> tuple[str, ...]:
    """A peer's names ``bin`` as names, counted before a string is built (the constructor checks each)."""
    _check(isinstance(value, bytes), f"{what} must be a bin of names separated by nul bytes, not {describe(value)}")
    count = value.count(0) + 1 if value else 0
    _check(count <= limit, f"{what} must be a list of at most {limit} names, not {count} names")
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise LocalProtocolError(f"{what} must be utf-8 names separated by nul bytes") from None
    return tuple(text.split(SEPARATOR)) if text else ()


def _columns_body(names: Sequence[str], types: Sequence[str], vocabularies: Sequence[Sequence[str]]) -> dict[str, Any]:
    """A table's columns on the wire: ``features``, and when one is categorical ``types`` (a byte per feature),
    ``categories`` (every vocabulary in feature order, in one names ``bin``) and ``category_counts``."""
    if not names:
        return {}
    if "categorical" not in types:
        return {"features": _names_bin(names)}
    return {
        "features": _names_bin(names),
        "types": bytes(_TYPE_CODES[kind] for kind in types),
        "categories": _names_bin(itertools.chain.from_iterable(vocabularies)),
        "category_counts": np.array([len(v) for v in vocabularies], dtype=_COUNT).tobytes(),
    }


def _columns_from(body: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...], list[tuple[str, ...]]]:
    """A peer's columns: names, types, and one vocabulary per categorical feature, in order."""
    names = _names_from(body.get("features", b""), "features", MAX_TABLE_FEATURES)
    given = {"types", "categories", "category_counts"} & set(body)
    if not given:
        return names, ("numeric",) * len(names), []
    _check(len(given) == 3, "types, categories and category_counts go together")
    codes, counts = body["types"], body["category_counts"]
    _check(
        isinstance(codes, bytes) and len(codes) == len(names) and not codes.translate(None, b"\x00\x01"),
        f"types must be a bin of one byte (0 numeric, 1 categorical) for each of the {len(names)} features",
    )
    categorical = codes.count(1)
    _check(
        isinstance(counts, bytes) and len(counts) == _COUNT.itemsize * categorical,
        f"category_counts must be a bin of one uint32 for each of the {categorical} categorical features",
    )
    sizes = np.frombuffer(counts, dtype=_COUNT).astype(np.int64)
    vocabulary = _names_from(body["categories"], "categories", MAX_VOCABULARY)
    _check(
        int(sizes.sum()) == len(vocabulary),
        f"category_counts add up to {int(sizes.sum())}, but categories holds {len(vocabulary)}",
    )
    ends = np.cumsum(sizes).tolist()
    vocabularies = [vocabulary[end - size : end] for end, size in zip(ends, sizes.tolist(), strict=True)]
    return names, tuple(_TYPES[code] for code in codes), vocabularies


def _check_shape(value: Any, kind: str) -> None:
    _check(
        isinstance(value, (list, tuple)) and 0 < len(value) <= 8 and all(_is_int(d) and d > 0 for d in value),
        f"input_shape must be a list of 1 to 8 positive sizes, not {describe(value)}",
    )
    _check(math.prod(value) <= 2**31, f"input_shape {describe(value)} exceeds limit of 2**31 values per example")
    _check(
        kind != "images" or len(value) == 3,
        f"images' input_shape must be (channels, height, width), not {describe(value)}",
    )


def _list(value: Any) -> Any:
    """A JSON list as a tuple; anything else as it came, for the constructor's checks to refuse
    (``tuple()`` would split a string into characters, or a map into its keys)."""
    return tuple(value) if isinstance(value, list) else value


def _statistics(value: Any, what: str) -> np.ndarray:
    """A mean or std given as numbers (or a 1-D array of them) as float64, every value finite."""
    reason = f"{what} must be a list of at most {MAX_STATISTICS} finite numbers"
    if isinstance(value, np.ndarray):
        _check(value.ndim == 1 and value.dtype.kind in "fiu" and len(value) <= MAX_STATISTICS, reason)
        values = value.astype(np.float64, copy=False)
    else:
        _check(
            isinstance(value, (list, tuple))
            and len(value) <= MAX_STATISTICS
            and set(map(type, value)) <= {int, float},  # no bools, strings numpy would parse, or objects
            reason,
        )
        try:
            values = np.array(value, dtype=np.float64)
        except OverflowError:  # an int too large for a float
            raise LocalProtocolError(reason) from None
    _check(bool(np.isfinite(values).all()), reason)
    return values


def _statistics_from(body: Mapping[str, Any]) -> tuple[np.ndarray | tuple[()], np.ndarray | tuple[()]]:
    """A peer's mean and std: float64 tensors of one dimension, or both absent."""
    given = {"mean", "std"} & set(body)
    if not given:
        return (), ()
    _check(len(given) == 2, "mean and std go together")
    arrays = []
    for what in ("mean", "std"):
        array = decode_tensor(body[what], name=what)
        _check(array.dtype == np.float64 and array.ndim == 1, f"{what} must be a float64 tensor of one dimension")
        arrays.append(array)
    return arrays[0], arrays[1]


@dataclass(frozen=True, slots=True)
class Feature:
    """One column of a table: its name, its type, and for a categorical one the categories this site reveals.

    A worker lists only the categories held by at least its minimum group
    size of examples, sorted; the rarer ones stay unnamed (the plan's "other" slot).
    """

    name: str
    type: str = "numeric"
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_plain_name(self.name):
            _check_name(self.name, "feature name")
            raise LocalProtocolError(f"feature name must not contain a nul character, not {describe(self.name)}")
        if self.type not in FEATURE_TYPES:
            raise LocalProtocolError(
                f"feature {self.name}'s type must be one of {', '.join(FEATURE_TYPES)}, not {describe(self.type)}"
            )
        _check_names(self.categories, f"categories of feature {self.name}", MAX_CATEGORIES)
        _check(self.type == "categorical" or not self.categories, f"numeric feature {self.name} has no categories")
        object.__setattr__(self, "categories", tuple(self.categories))


@dataclass(frozen=True)
class DataSchema:
    """What a worker's own data looks like, as hello's ``info`` describes it.

    - ``input_shape``: one example as read, before encoding: ``(C, H, W)`` for
      images, ``(number of feature columns,)`` for a table, ``x.shape[1:]`` for arrays;
    - ``features``: a table's feature columns in the file's order (named arrays may list them too);
    - ``classes``: the site's class names (folder names, or label values as
      text), in the order of ``info``'s histogram; ``None`` for a continuous label;
    - ``label``: the label column's name, where the data have one (a table's ``--label-column``).
    """

    kind: str
    input_shape: tuple[int, ...]
    classes: tuple[str, ...] | None
    features: tuple[Feature, ...] = ()
    label: str | None = None

    def __post_init__(self) -> None:
        _check(self.kind in DATA_KINDS, f"data kind must be one of {', '.join(DATA_KINDS)}, not {describe(self.kind)}")
        _check_shape(self.input_shape, self.kind)
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.classes is not None:
            _check_names(self.classes, "classes", MAX_CLASSES)
            _check(len(self.classes) > 0, "classes must not be empty (a continuous label has none: null)")
        _check_label(self.label)
        _check(
            isinstance(self.features, (list, tuple))
            and len(self.features) <= MAX_TABLE_FEATURES
            and all(isinstance(feature, Feature) for feature in self.features),
            f"features must be a list of at most {MAX_TABLE_FEATURES} features",
        )
        _check(_distinct(feature.name for feature in self.features), "feature names must be distinct")
        _check(
            sum(len(feature.categories) for feature in self.features) <= MAX_VOCABULARY,
            f"the features' categories exceed limit of {MAX_VOCABULARY}",
        )
        if self.kind == "table":
            _check(
                self.input_shape == (len(self.features),),
                f"a table's input_shape must be (number of features,), not {describe(self.input_shape)}",
            )
        elif self.features:
            _check(self.kind == "arrays", "images have no named features")
            _check(
                math.prod(self.input_shape) == len(self.features)
                and all(feature.type == "numeric" for feature in self.features),
                "named array features must be numeric, one per input value",
            )
        object.__setattr__(self, "features", tuple(self.features))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def num_classes(self) -> int:
        """The length of ``info``'s histogram: the class count, or 1 for a continuous label."""
        return 1 if self.classes is None else len(self.classes)

    def to_body(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "classes": None if self.classes is None else _names_bin(self.classes),
            **_columns_body(
                [f.name for f in self.features],
                [f.type for f in self.features],
                [f.categories for f in self.features if f.type == "categorical"],
            ),
            **_label_body(self.label),
        }

    @classmethod
    def from_body(cls, body: Any) -> DataSchema:
        _check(isinstance(body, Mapping), "schema must be a map")
        _fields(body, "schema", {"kind", "input_shape", "classes"}, _COLUMNS | {"label"})
        names, types, vocabularies = _columns_from(body)
        held = iter(vocabularies)
        return cls(
            body["kind"],
            _list(body["input_shape"]),
            _classes_from(body),
            tuple(
                Feature(name, kind, next(held) if kind == "categorical" else ())
                for name, kind in zip(names, types, strict=True)
            ),
            body.get("label"),
        )


#: A body's optional fields that describe a table's columns.
_COLUMNS: Final = frozenset({"features", "types", "categories", "category_counts"})


def _label_body(label: str | None) -> dict[str, Any]:
    """The optional ``label`` field: absent without a name, so a body reads as before."""
    return {} if label is None else {"label": label}


def _classes_from(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    return None if body["classes"] is None else _names_from(body["classes"], "classes", MAX_CLASSES)


def encoded_width(features: tuple[str, ...], categories: Mapping[str, tuple[str, ...]]) -> int:
    """A table row's width once encoded: one value per numeric feature, and per categorical one
    a one-hot slot for each category of its vocabulary plus one for "other"."""
    return sum(len(categories[name]) + 1 if name in categories else 1 for name in features)


@dataclass(frozen=True)
class DataPlan:
    """What the federation agreed about its data before round 1; every request over own data carries it.

    - ``input_shape``: what the model takes: for a table the encoded row
      (:func:`encoded_width`), otherwise the schema's input shape;
    - ``classes``: the union of every site's class names, sorted (numbers in
      numeric order); a site maps its labels to their index here. ``None``: a continuous label;
    - ``features``: a table's feature columns in the order the model reads them, matched by name;
    - ``categories``: each categorical feature's vocabulary (it gets one more slot, "other");
    - ``mean`` and ``std``: the standardisation every site applies, per
      channel for images (``C`` numbers) and per model input value otherwise
      (``prod(input_shape)``), or both empty for none. A table's one-hot and
      "other" slots keep mean 0 and std 1: a plan that scaled them could weigh
      a slot to read a rare category's count out of pooled sums;
    - ``label``: the label column's name when every site names it the same, else ``None``
      (a console names a regression's errors by it).
    """

    kind: str
    input_shape: tuple[int, ...]
    classes: tuple[str, ...] | None
    features: tuple[str, ...] = ()
    categories: Mapping[str, tuple[str, ...]] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    label: str | None = None

    def __post_init__(self) -> None:
        _check(self.kind in DATA_KINDS, f"data kind must be one of {', '.join(DATA_KINDS)}, not {describe(self.kind)}")
        _check_label(self.label)
        _check_shape(self.input_shape, self.kind)
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.classes is not None:
            _check_names(self.classes, "classes", MAX_CLASSES)
            _check(len(self.classes) > 0, "classes must not be empty (a continuous label has none: null)")
            object.__setattr__(self, "classes", tuple(self.classes))
        _check_names(self.features, "features", MAX_TABLE_FEATURES)
        object.__setattr__(self, "features", tuple(self.features))
        categories = {} if self.categories is None else self.categories
        _check(
            isinstance(categories, Mapping) and len(categories) <= len(self.features),
            "categories must map categorical features to their vocabularies",
        )
        features = set(self.features)  # a peer picks both lengths: no scan of one per entry of the other
        for name, vocabulary in categories.items():
            _check(name in features, f"categories name {describe(name)}, which is not a feature")
            _check_names(vocabulary, f"categories of feature {name}", MAX_CATEGORIES)
        _check(
            sum(len(vocabulary) for vocabulary in categories.values()) <= MAX_VOCABULARY,
            f"the vocabularies exceed limit of {MAX_VOCABULARY} categories",
        )
        # Read-only, as the rest of a frozen message: a plan's digest keys the worker's cache.
        object.__setattr__(
            self,
            "categories",
            MappingProxyType({name: tuple(categories[name]) for name in self.features if name in categories}),
        )
        if self.kind == "table":
            width = encoded_width(self.features, self.categories or {})
            _check(
                self.input_shape == (width,),
                f"a table plan's input_shape must be ({width},), its encoded width, not {describe(self.input_shape)}",
            )
        else:
            _check(not categories, f"{self.kind} have no categorical features")
            _check(
                not self.features or (self.kind == "arrays" and math.prod(self.input_shape) == len(self.features)),
                "only arrays name their features, one per input value",
            )
        mean, std = _statistics(self.mean, "mean"), _statistics(self.std, "std")
        _check(len(mean) == len(std), "mean and std must have the same length")
        expected = self.input_shape[0] if self.kind == "images" else math.prod(self.input_shape)
        per = "one per channel" if self.kind == "images" else "one per input value"
        _check(
            not len(mean) or len(mean) == expected,
            f"mean and std must hold {expected} values ({per}), not {len(mean)}",
        )
        _check(bool((std > 0).all()), "std values must be positive")
        if self.kind == "table" and len(mean):
            self._check_one_hot(mean, std)
        object.__setattr__(self, "mean", tuple(mean.tolist()))
        object.__setattr__(self, "std", tuple(std.tolist()))

    def _check_one_hot(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Statistics apply to numeric columns only: every one-hot and "other" slot has mean 0 and std 1."""
        scaled = (mean != 0) | (std != 1)
        scaled[self.numeric_slots()] = False
        if not scaled.any():
            return
        slot = int(np.flatnonzero(scaled)[0])
        categories, start = self.categories or {}, 0
        for name in self.features:
            width = len(categories[name]) + 1 if name in categories else 1
            if slot < start + width:
                break
            start += width
        raise LocalProtocolError(
            f"one-hot slot {slot - start} of feature {name} has mean {float(mean[slot])!r} and std"
            f" {float(std[slot])!r}, not 0 and 1: a plan standardises numeric features only"
        )

    def numeric_slots(self) -> np.ndarray:
        """The positions of a table's numeric features in the encoded row (the values a plan standardises)."""
        categories = self.categories or {}
        positions, start = [], 0
        for feature in self.features:
            if feature in categories:
                start += len(categories[feature]) + 1  # its one-hot slots and "other"
            else:
                positions.append(start)
                start += 1
        return np.array(positions, dtype=np.int64)

    @property
    def num_classes(self) -> int:
        """The model's outputs for classes; 1 for a continuous label."""
        return 1 if self.classes is None else len(self.classes)

    def to_body(self) -> dict[str, Any]:
        categories = self.categories or {}
        statistics = {what: encode_tensor(np.array(getattr(self, what), dtype=np.float64)) for what in ("mean", "std")}
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "classes": None if self.classes is None else _names_bin(self.classes),
            **_columns_body(
                self.features,
                ["categorical" if name in categories else "numeric" for name in self.features],
                list(categories.values()),
            ),
            **(statistics if self.mean else {}),
            **_label_body(self.label),
        }

    @classmethod
    def from_body(cls, body: Any) -> DataPlan:
        _check(isinstance(body, Mapping), "data plan must be a map")
        _fields(body, "data plan", {"kind", "input_shape", "classes"}, _COLUMNS | {"mean", "std", "label"})
        names, types, vocabularies = _columns_from(body)
        categorical = (name for name, kind in zip(names, types, strict=True) if kind == "categorical")
        mean, std = _statistics_from(body)
        return cls(
            body["kind"],
            _list(body["input_shape"]),
            _classes_from(body),
            names,
            dict(zip(categorical, vocabularies, strict=True)),
            mean,  # type: ignore[arg-type]  # checked and stored as a tuple on construction
            std,  # type: ignore[arg-type]
            body.get("label"),
        )

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON values, names and numbers in lists: what a saved model and a checkpoint record."""
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "classes": None if self.classes is None else list(self.classes),
            **({"features": list(self.features)} if self.features else {}),
            **({"categories": {name: list(v) for name, v in self.categories.items()}} if self.categories else {}),
            **({"mean": list(self.mean), "std": list(self.std)} if self.mean else {}),
            **_label_body(self.label),
        }

    @classmethod
    def from_json(cls, value: Any) -> DataPlan:
        """The plan :meth:`to_json` recorded.

        Raises:
            LocalProtocolError: if it is not a valid plan.
        """
        _check(isinstance(value, Mapping), "data plan must be a map")
        _fields(
            value,
            "data plan",
            {"kind", "input_shape", "classes"},
            frozenset({"features", "categories", "mean", "std", "label"}),
        )
        categories = value.get("categories", {})
        _check(isinstance(categories, Mapping), "categories must be a map")
        return cls(
            value["kind"],
            _list(value["input_shape"]),
            _list(value["classes"]),
            _list(value.get("features", [])),
            {name: _list(vocabulary) for name, vocabulary in categories.items()},
            _list(value.get("mean", [])),
            _list(value.get("std", [])),
            value.get("label"),
        )

    def digest(self) -> str:
        """A digest of the plan: a worker caches the examples it prepared under it."""
        packed = msgpack.packb(self.to_body(), use_bin_type=True)
        return hashlib.sha256(packed).hexdigest()[:32]

    def without_statistics(self) -> DataPlan:
        """The plan before standardisation: what a normalisation query is asked over."""
        return DataPlan(self.kind, self.input_shape, self.classes, self.features, self.categories, label=self.label)


def plan_from(body: Mapping[str, Any]) -> DataPlan | None:
    """A request's optional ``data`` field: the plan of a run over a user's own data, or ``None``."""
    return DataPlan.from_body(body["data"]) if body.get("data") is not None else None


def plan_field(plan: DataPlan | None) -> dict[str, Any]:
    """The ``data`` field of a request body; absent without a plan, so a bundled-data request reads as before."""
    return {"data": plan.to_body()} if plan is not None else {}
