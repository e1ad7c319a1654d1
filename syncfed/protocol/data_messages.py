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
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from ..exceptions import describe
from .base import MAX_CLASSES, _check, _check_name, _fields, _is_int, _is_number

__all__ = [
    "DATA_KINDS",
    "FEATURE_TYPES",
    "MAX_TABLE_FEATURES",
    "MAX_CATEGORIES",
    "MAX_VOCABULARY",
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


def _check_names(value: Any, what: str, limit: int) -> None:
    _check(
        isinstance(value, (list, tuple)) and len(value) <= limit,
        f"{what} must be a list of at most {limit} names, not {describe(value)}",
    )
    for name in value:
        _check_name(name, f"each of {what}")
    _check(len(set(value)) == len(value), f"{what} must be distinct")


def _check_shape(value: Any) -> None:
    _check(
        isinstance(value, (list, tuple)) and 0 < len(value) <= 8 and all(_is_int(d) and d > 0 for d in value),
        f"input_shape must be a list of 1 to 8 positive sizes, not {describe(value)}",
    )
    _check(math.prod(value) <= 2**31, f"input_shape {describe(value)} exceeds limit of 2**31 values per example")


@dataclass(frozen=True)
class Feature:
    """One column of a table: its name, its type, and for a categorical one the categories this site reveals.

    A worker lists only the categories held by at least its minimum group
    size of examples, sorted; the rarer ones stay unnamed (the plan's "other" slot).
    """

    name: str
    type: str = "numeric"
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name, "feature name")
        _check(
            self.type in FEATURE_TYPES,
            f"feature {self.name}'s type must be one of {', '.join(FEATURE_TYPES)}, not {describe(self.type)}",
        )
        _check_names(self.categories, f"categories of feature {self.name}", MAX_CATEGORIES)
        _check(self.type == "categorical" or not self.categories, f"numeric feature {self.name} has no categories")
        object.__setattr__(self, "categories", tuple(self.categories))

    def to_body(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            **({"categories": list(self.categories)} if self.categories else {}),
        }

    @classmethod
    def from_body(cls, body: Any) -> Feature:
        _check(isinstance(body, Mapping), "a feature must be a map")
        _fields(body, "feature", {"name", "type"}, frozenset({"categories"}))
        return cls(body["name"], body["type"], tuple(body.get("categories", ())))


@dataclass(frozen=True)
class DataSchema:
    """What a worker's own data looks like, as hello's ``info`` describes it.

    - ``input_shape``: one example as read, before encoding: ``(C, H, W)`` for
      images, ``(number of feature columns,)`` for a table, ``x.shape[1:]`` for arrays;
    - ``features``: a table's feature columns in the file's order (named arrays may list them too);
    - ``classes``: the site's class names (folder names, or label values as
      text), in the order of ``info``'s histogram; ``None`` for a continuous label.
    """

    kind: str
    input_shape: tuple[int, ...]
    classes: tuple[str, ...] | None
    features: tuple[Feature, ...] = ()

    def __post_init__(self) -> None:
        _check(self.kind in DATA_KINDS, f"data kind must be one of {', '.join(DATA_KINDS)}, not {describe(self.kind)}")
        _check_shape(self.input_shape)
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.classes is not None:
            _check_names(self.classes, "classes", MAX_CLASSES)
            _check(len(self.classes) > 0, "classes must not be empty (a continuous label has none: null)")
        _check(
            isinstance(self.features, (list, tuple))
            and len(self.features) <= MAX_TABLE_FEATURES
            and all(isinstance(feature, Feature) for feature in self.features),
            f"features must be a list of at most {MAX_TABLE_FEATURES} features",
        )
        names = [feature.name for feature in self.features]
        _check(len(set(names)) == len(names), "feature names must be distinct")
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
            "classes": None if self.classes is None else list(self.classes),
            **({"features": [feature.to_body() for feature in self.features]} if self.features else {}),
        }

    @classmethod
    def from_body(cls, body: Any) -> DataSchema:
        _check(isinstance(body, Mapping), "schema must be a map")
        _fields(body, "schema", {"kind", "input_shape", "classes"}, frozenset({"features"}))
        features = body.get("features", [])
        _check(
            isinstance(features, list) and len(features) <= MAX_TABLE_FEATURES,
            f"features must be a list of at most {MAX_TABLE_FEATURES} features",
        )
        classes = body["classes"]
        return cls(
            body["kind"],
            body["input_shape"],
            None if classes is None else tuple(classes) if isinstance(classes, list) else classes,
            tuple(Feature.from_body(feature) for feature in features),
        )


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
      (``prod(input_shape)``), or both empty for none.
    """

    kind: str
    input_shape: tuple[int, ...]
    classes: tuple[str, ...] | None
    features: tuple[str, ...] = ()
    categories: Mapping[str, tuple[str, ...]] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _check(self.kind in DATA_KINDS, f"data kind must be one of {', '.join(DATA_KINDS)}, not {describe(self.kind)}")
        _check_shape(self.input_shape)
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
        for name, vocabulary in categories.items():
            _check(name in self.features, f"categories name {describe(name)}, which is not a feature")
            _check_names(vocabulary, f"categories of feature {name}", MAX_CATEGORIES)
        _check(
            sum(len(vocabulary) for vocabulary in categories.values()) <= MAX_VOCABULARY,
            f"the vocabularies exceed limit of {MAX_VOCABULARY} categories",
        )
        object.__setattr__(
            self, "categories", {name: tuple(categories[name]) for name in self.features if name in categories}
        )
        if self.kind == "table":
            width = encoded_width(self.features, self.categories or {})
            _check(
                self.input_shape == (width,),
                f"a table plan's input_shape must be ({width},), its encoded width, not {describe(self.input_shape)}",
            )
        else:
            _check(not categories, f"{self.kind} have no categorical features")
        for what in ("mean", "std"):
            values = getattr(self, what)
            _check(
                isinstance(values, (list, tuple))
                and len(values) <= MAX_STATISTICS
                and all(_is_number(v) for v in values),
                f"{what} must be a list of at most {MAX_STATISTICS} finite numbers",
            )
            object.__setattr__(self, what, tuple(float(v) for v in values))
        _check(len(self.mean) == len(self.std), "mean and std must have the same length")
        expected = self.input_shape[0] if self.kind == "images" else math.prod(self.input_shape)
        per = "one per channel" if self.kind == "images" else "one per input value"
        _check(
            not self.mean or len(self.mean) == expected,
            f"mean and std must hold {expected} values ({per}), not {len(self.mean)}",
        )
        _check(all(s > 0 for s in self.std), "std values must be positive")

    @property
    def num_classes(self) -> int:
        """The model's outputs for classes; 1 for a continuous label."""
        return 1 if self.classes is None else len(self.classes)

    def to_body(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "classes": None if self.classes is None else list(self.classes),
            **({"features": list(self.features)} if self.features else {}),
            **({"categories": {name: list(v) for name, v in self.categories.items()}} if self.categories else {}),
            **({"mean": list(self.mean), "std": list(self.std)} if self.mean else {}),
        }

    @classmethod
    def from_body(cls, body: Any) -> DataPlan:
        _check(isinstance(body, Mapping), "data plan must be a map")
        _fields(
            body, "data plan", {"kind", "input_shape", "classes"}, frozenset({"features", "categories", "mean", "std"})
        )
        categories = body.get("categories", {})
        _check(isinstance(categories, Mapping), "categories must be a map")
        classes = body["classes"]
        return cls(
            body["kind"],
            body["input_shape"],
            None if classes is None else tuple(classes) if isinstance(classes, list) else classes,
            tuple(body.get("features", [])) if isinstance(body.get("features", []), list) else body["features"],
            {name: tuple(v) if isinstance(v, list) else v for name, v in categories.items()},
            tuple(body.get("mean", [])) if isinstance(body.get("mean", []), list) else body["mean"],
            tuple(body.get("std", [])) if isinstance(body.get("std", []), list) else body["std"],
        )

    def digest(self) -> str:
        """A digest of the plan: a worker caches the examples it prepared under it."""
        packed = msgpack.packb(self.to_body(), use_bin_type=True)
        return hashlib.sha256(packed).hexdigest()[:32]

    def without_statistics(self) -> DataPlan:
        """The plan before standardisation: what a normalisation query is asked over."""
        return DataPlan(self.kind, self.input_shape, self.classes, self.features, self.categories)


def plan_from(body: Mapping[str, Any]) -> DataPlan | None:
    """A request's optional ``data`` field: the plan of a run over a user's own data, or ``None``."""
    return DataPlan.from_body(body["data"]) if body.get("data") is not None else None


def plan_field(plan: DataPlan | None) -> dict[str, Any]:
    """The ``data`` field of a request body; absent without a plan, so a bundled-data request reads as before."""
    return {"data": plan.to_body()} if plan is not None else {}
